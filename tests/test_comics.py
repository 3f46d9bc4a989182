"""The COMICS strip source on a corpus replica the test writes: pages, interior windows, seeding, assembly, CLIs."""

import json

import pytest
from PIL import Image

from gaze.comics import (assemble_window, comic_pages, comics_strips, interior_pages, parse_source, sample_windows)
from gaze.strips import StripError, check_source, load_strips

# comic -> {page: number of panels}
CORPUS = {
    "1001": {p: (7 if p in (6, 8, 9) else 6 if p in (1, 2, 13, 14) else 3) for p in range(1, 15)},  # 14 pages
    "1002": {1: 2, 2: 8, 3: 1},  # a short comic: every page is interior
    "1003": {p: (9 if p <= 5 or p >= 8 else 2) for p in range(1, 13)},  # 6+ panels only on covers / back matter
}
ELIGIBLE = {("1001", 6), ("1001", 8), ("1001", 9), ("1002", 2)}


def colour(comic: str, page: int, panel: int) -> tuple[int, int, int]:
    return (int(comic) % 7 * 30, page * 15, panel * 20)


def write_corpus(root):
    for comic, pages in CORPUS.items():
        (root / comic).mkdir(parents=True)
        for page, n in pages.items():
            for panel in range(n):  # panel numbers 0.., sizes of their own: aspect 0.6 to 1.5
                w, h = 30 + 7 * panel, 40 + (page % 3) * 5
                Image.new("RGB", (w, h), colour(comic, page, panel)).save(root / comic / f"{page}_{panel}.jpg",
                                                                         quality=100)
        (root / comic / "notes.txt").write_text("not a panel")
        (root / comic / "cover.jpg").write_bytes(b"")  # not PAGE_PANEL: ignored
    return root


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "raw_panel_images")


def test_pages_are_read_by_number_and_interior_pages_drop_the_ends(corpus, tmp_path):
    pages = comic_pages(corpus / "1001")
    assert sorted(pages) == list(range(1, 15)) and [p.name for p in pages[6]] == [f"6_{k}.jpg" for k in range(7)]
    (corpus / "1002" / "2_10.jpg").write_bytes((corpus / "1002" / "2_1.jpg").read_bytes())  # 10 after 9, not 1
    assert [p.name for p in comic_pages(corpus / "1002")[2]][-2:] == ["2_7.jpg", "2_10.jpg"]
    assert interior_pages(comic_pages(corpus / "1001")) == [6, 8, 9]  # 14 pages: 1-5 and 10-14 dropped
    assert interior_pages(comic_pages(corpus / "1003")) == []  # only its ends have 6 panels
    assert interior_pages({1: [None] * 6, 2: [None] * 5}) == [1]  # a short comic keeps every page


def test_windows_are_six_consecutive_panels_of_interior_pages_seeded(corpus):
    # windows on the eligible pages: 1001 p6, p8, p9 (7 panels: 2 each) + 1002 p2 (8 panels: 3) = 9 in all
    windows = list(sample_windows(corpus, 9, seed=0))
    assert len({w.strip_id for w in windows}) == 9  # never the same window twice
    for w in windows:
        assert (w.comic, w.page) in ELIGIBLE
        numbers = [int(p.stem.split("_")[1]) for p in w.paths]
        assert numbers == list(range(w.start, w.start + 6)) and all(p.parent.name == w.comic for p in w.paths)
    assert [w.strip_id for w in sample_windows(corpus, 9, seed=0)] == [w.strip_id for w in windows]  # reproducible
    assert [w.strip_id for w in sample_windows(corpus, 5, seed=0)] == [w.strip_id for w in windows[:5]]  # a prefix
    assert [w.strip_id for w in sample_windows(corpus, 9, seed=1)] != [w.strip_id for w in windows]
    with pytest.raises(StripError, match="no new window of 6 consecutive panels"):
        list(sample_windows(corpus, 10, seed=0))


def test_the_paper_assembly_keeps_each_panels_aspect_at_one_height(corpus):
    w = next(sample_windows(corpus, 1, seed=3))
    sizes = [Image.open(p).size for p in w.paths]
    s = assemble_window(w, height=64, gap=6)
    widths = [round(x * 64 / y) for x, y in sizes]
    x0 = [sum(widths[:k]) + 6 * k for k in range(6)]
    assert s.panels == tuple((x, 0, x + wd, 64) for x, wd in zip(x0, widths))
    assert s.image.size == (sum(widths) + 30, 64) and s.strip_id == w.strip_id
    for k, (box, path) in enumerate(zip(s.panels, w.paths)):
        page, panel = (int(v) for v in path.stem.split("_"))
        got = s.image.getpixel(((box[0] + box[2]) // 2, 32))
        assert max(abs(a - b) for a, b in zip(got, colour(w.comic, page, panel))) <= 3, k
        if k:
            assert s.image.getpixel((box[0] - 3, 32)) == (255, 255, 255)  # the gap
    a = assemble_window(w, height=70, gap=6, align=32)  # on the token grid: gutters painted over the borders
    assert a.image.size[1] == 64 and all(b[0] % 32 == 0 and b[2] % 32 == 0 for b in a.panels)
    assert all(a.panels[k][2] == a.panels[k + 1][0] for k in range(5))
    assert all(a.image.getpixel((b[0] + d, 10)) == (255, 255, 255) for b in a.panels[1:] for d in (-3, 2))
    assert a.meta["panel_files"] == [p.name for p in w.paths] and a.meta["page"] == w.page


def test_comics_is_a_strip_source(corpus):
    assert parse_source(f"comics:{corpus}@7") == (corpus, 7) and parse_source(f"comics:{corpus}") == (corpus, 0)
    got = list(load_strips(f"comics:{corpus}@7", n_strips=3, start=1, align=32))
    want = list(comics_strips(corpus, 4, seed=7, align=32))[1:]
    assert [s.strip_id for s in got] == [s.strip_id for s in want]
    assert all(a.content_hash() == b.content_hash() for a, b in zip(got, want))
    check_source(f"comics:{corpus}")
    with pytest.raises(StripError, match="not found"):
        check_source(f"comics:{corpus / 'nowhere'}")
    (corpus.parent / "empty").mkdir()
    with pytest.raises(StripError, match="holds no comic folders"):
        check_source(f"comics:{corpus.parent / 'empty'}")


def test_discover_and_eval_read_comics(qwen3_path, loaded_qwen3, corpus, tmp_path, capsys):
    from gaze.cli import main
    from gaze.eval.protocols import eval_strips

    rc = main(["discover", "--model", str(qwen3_path), "--strips", f"comics:{corpus}", "--n-strips", "2",
               "--out", str(tmp_path / "d"), "--quiet", "--top", "2"])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "d" / "ranking.json").read_text())
    assert data["n_strips"] == 2
    ids = [s.strip_id for s in eval_strips(f"comics:{corpus}", 2, align=32)]
    assert ids == [w.strip_id for w in sample_windows(corpus, 2)]


def test_datagen_import_comics_writes_the_sampled_strips(corpus, tmp_path, capsys):
    from datagen.cli import main

    out = tmp_path / "ds"
    rc = main(["import-comics", "--comics", str(corpus), "--out", str(out), "--n-strips", "5", "--seed", "2",
               "--height", "64"])
    assert rc == 0, capsys.readouterr().err
    back = [s for split in ("discovery", "evaluation") for s in load_strips(str(out / "disk"), split=split)]
    want = {s.strip_id: s for s in comics_strips(corpus, 5, seed=2, height=64)}
    assert sorted(s.strip_id for s in back) == sorted(want)
    for s in back:
        assert s.panels == want[s.strip_id].panels and s.image.tobytes() == want[s.strip_id].image.tobytes()
    assert main(["import-comics", "--comics", str(tmp_path / "none"), "--out", str(tmp_path / "ds2")]) == 2
    assert "not found" in capsys.readouterr().err
