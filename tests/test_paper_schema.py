"""The paper's published schema (six panel_k image columns) as a first-class strip source."""

import pytest
import torch
from datasets import Dataset, Features, Image, Value

from gaze.discovery import discover
from gaze.strips import detect, open_dataset
from gaze.strips import StripError, load_strips, save_folder_strip

PAPER = Features({**{f"panel_{k}": Image() for k in range(1, 7)}, "comic_id": Value("int32"),
                  **{f"caption_{k}": Value("string") for k in range(1, 7)}, "style": Value("string"),
                  "protagonist": Value("string")})


def replica(strips, folder, broken: int | None = None):
    """A local replica of baulab/openai-comic-strips built from our strips, saved to disk."""
    rows = []
    for i, s in enumerate(strips):
        row = {f"panel_{k + 1}": s.image.crop(box) for k, box in enumerate(s.panels)}
        if i == broken:
            row["panel_4"] = None
        row.update({"comic_id": i + 1, "style": "flat", "protagonist": "a cat"})
        row.update({f"caption_{k + 1}": c for k, c in enumerate(s.captions)})
        rows.append(row)
    Dataset.from_list(rows, features=PAPER).save_to_disk(str(folder))
    return folder


def test_paper_schema_gives_the_same_scores_as_the_folder_layout(loaded_qwen3, strip_for, tmp_path):
    strips = [strip_for(32, seed=s) for s in range(3)]
    src = replica(strips, tmp_path / "paper")
    assert detect(open_dataset(str(src)).column_names) == "paper"
    for i, s in enumerate(strips):
        save_folder_strip(s, tmp_path / "comics" / f"comic{i + 1}")
    from_paper = list(load_strips(src, align=32))
    from_folders = list(load_strips(tmp_path / "comics", align=32))
    assert [s.captions for s in from_paper] == [s.captions for s in strips]  # captions travel with the strip
    assert [s.strip_id for s in from_paper] == ["1", "2", "3"]
    a = discover(loaded_qwen3, from_paper, tmp_path / "a", progress=False)
    b = discover(loaded_qwen3, from_folders, tmp_path / "b", progress=False)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.matrices, b.matrices)
    # a row range
    assert [s.strip_id for s in load_strips(src, start=1, n_strips=2)] == ["2", "3"]
    with pytest.raises(StripError, match="outside"):
        list(load_strips(src, start=5))


def test_list_column_captions_and_unknown_schema(tmp_path, strip_for):
    s = strip_for(32)
    row = {f"panel_{k + 1}": s.image.crop(b) for k, b in enumerate(s.panels)}
    row.update({"comic_id": 7, "captions": list(s.captions)})
    Dataset.from_list([row]).save_to_disk(str(tmp_path / "list"))
    (strip,) = load_strips(tmp_path / "list")
    assert strip.captions == s.captions
    Dataset.from_list([{"picture": s.image, "text": "x"}]).save_to_disk(str(tmp_path / "odd"))
    with pytest.raises(StripError, match=r"columns \['picture', 'text'\] match no known strip schema"):
        list(load_strips(tmp_path / "odd"))


def test_bad_row_is_reported_and_skipped_only_on_request(tmp_path, strip_for):
    strips = [strip_for(32, seed=s) for s in range(3)]
    src = replica(strips, tmp_path / "paper", broken=1)
    with pytest.raises(StripError, match="comic 2: panel 4"):
        list(load_strips(src))
    skipped = []
    got = list(load_strips(src, skip_bad=True, on_skip=lambda sid, why: skipped.append((sid, why))))
    assert [s.strip_id for s in got] == ["1", "3"]
    assert skipped and skipped[0][0] == "comic 2" and "panel 4" in skipped[0][1]


def test_hub_id_goes_to_load_dataset(monkeypatch, strip_for, tmp_path):
    """Loading by hub id: exercised up to the network boundary (the call and its arguments)."""
    import datasets

    seen = {}
    src = replica([strip_for(32)], tmp_path / "paper")

    def fake_load_dataset(path, split=None, **kw):
        seen["args"] = (path, split)
        return datasets.load_from_disk(str(src))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (strip,) = load_strips("baulab/openai-comic-strips", split="train")
    assert seen["args"] == ("baulab/openai-comic-strips", "train")
    assert strip.strip_id == "1" and strip.n_panels == 6


def test_datagen_writes_the_paper_schema(tmp_path):
    from datagen.cli import main as datagen_main

    assert datagen_main(["generate", "--out", str(tmp_path / "gen"), "--n-strips", "4", "--schema", "paper"]) == 0
    rows = open_dataset(str(tmp_path / "gen"), split="discovery")
    assert detect(rows.column_names) == "paper"
    assert {f"panel_{k}" for k in range(1, 7)} <= set(rows.column_names)
    strips = list(load_strips(tmp_path / "gen", split="discovery"))
    assert strips and all(s.n_panels == 6 and s.captions and len(set(s.captions)) == 6 for s in strips)
