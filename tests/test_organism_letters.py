"""Stage 0 of the organism's recipe (letter sheets) and stage 1's letter readout over the ink."""

import random

import pytest
import torch
from PIL import Image

from gaze.organism.letters import SHEET, glyph, letter_sheet, letter_stage, pooled_letter_logits
from gaze.organism.train import OrganismConfig, PanelPool, check_config, ink_cover, letter_logits, prepare


def white(n=3):
    return [Image.new("RGB", (64, 64), (255, 255, 255)) for _ in range(n)]


def test_a_sheet_is_a_grid_of_token_cells_one_glyph_each_centred_without_jitter():
    from datagen.letters import LETTERS

    sheet, labels, boxes = letter_sheet(white(), random.Random(0), token=32, jitter=0.0)
    rows, cols = SHEET
    assert sheet.size == (cols * 32, rows * 32) and len(labels) == len(boxes) == rows * cols
    assert all(0 <= k < len(LETTERS) for k in labels)
    ink = torch.tensor(list(sheet.convert("L").getdata())).view(rows * 32, cols * 32) < 250  # not white
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        r, c = divmod(i, cols)
        assert abs((x0 + x1) / 2 - (c + 0.5) * 32) <= 1 and abs((y0 + y1) / 2 - (r + 0.5) * 32) <= 1
        assert 12 <= y1 - y0 <= 32 and ink[max(0, y0):y1, max(0, x0):x1].sum() > 20  # a glyph is drawn there
    # seeded: the same draw again, another seed another sheet
    again, labels2, _ = letter_sheet(white(), random.Random(0), token=32, jitter=0.0)
    assert labels2 == labels and list(again.getdata()) == list(sheet.getdata())
    assert letter_sheet(white(), random.Random(1), token=32)[1] != labels


def test_jitter_moves_glyphs_off_their_cells_centres_by_at_most_its_share_of_half_a_cell():
    for jitter in (0.25, 1.0):
        _, _, boxes = letter_sheet(white(), random.Random(5), token=32, jitter=jitter)
        off = [max(abs((x0 + x1) / 2 - (i % SHEET[1] + 0.5) * 32), abs((y0 + y1) / 2 - (i // SHEET[1] + 0.5) * 32))
               for i, (x0, y0, x1, y1) in enumerate(boxes)]
        assert max(off) <= jitter * 16 + 1 and max(off) > jitter * 8


def test_a_glyph_has_its_fill_inside_its_outline_and_stretches_wide():
    ink, fill = glyph("M", 24, 1.0)
    wide, _ = glyph("M", 24, 1.5)
    assert ink.size == fill.size and wide.height == ink.height
    assert abs(wide.width - 1.5 * ink.width) <= 1
    i, f = torch.tensor(list(ink.getdata())), torch.tensor(list(fill.getdata()))
    assert (f > 128).sum() > 20 and bool(((f > 128) <= (i > 0)).all())  # the fill lies within the ink
    assert (i > 128).sum() > (f > 128).sum()  # the outline adds ink around it


def test_the_pooled_letter_readout_is_the_readout_of_the_mean_covering_token():
    torch.manual_seed(0)
    readout = torch.nn.Linear(16, 24)
    x = torch.randn(10, 16)
    cover = torch.zeros(3, 10, dtype=torch.bool)
    cover[0, [1, 2]] = True
    cover[1, [5]] = True
    cover[2, [0, 4, 9]] = True
    got = pooled_letter_logits(readout(x), cover)
    want = torch.stack([readout(x[row].mean(0)) for row in cover])
    assert torch.allclose(got, want, atol=1e-6)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from gaze.organism.train import build
    from transformers import AutoProcessor

    from gaze.families import register_image_only_processors

    register_image_only_processors()
    cfg = OrganismConfig(num_layers=1, num_heads=2, num_kv_heads=1, hidden_size=32, head_dim=16, vision_depth=1,
                         vision_hidden=32)
    out = tmp_path_factory.mktemp("letters") / "org"
    build(cfg, out)
    proc = AutoProcessor.from_pretrained(out)
    proc.image_processor.size = {"shortest_edge": 8 * 1024, "longest_edge": 64 * 1024}
    return out, proc


def test_ink_cover_is_every_token_whose_cell_overlaps_the_letters_ink(processor):
    _, proc = processor
    cfg = OrganismConfig(pool_per_combo=1, rescale_share=0.5, grid_share=0.5)
    pool, rng = PanelPool(cfg), random.Random(2)
    for _ in range(6):
        prep = prepare(proc, pool.strip(rng))
        cover = ink_cover(prep)
        cells = prep.layout(0).cells.tolist()
        for k, (x0, y0, x1, y1) in enumerate(prep.strip.meta["letter_boxes"]):
            want = [cx0 < x1 and x0 < cx1 and cy0 < y1 and y0 < cy1 for cx0, cy0, cx1, cy1 in cells]
            assert cover[k].tolist() == want and any(want)  # every letter covers some token
        logits, target = letter_logits(torch.randn(len(cells), 24), prep)
        assert logits.shape == (6, 24) and target.tolist() == [l for _, _, l in prep.strip.meta["labels"]]


def test_letter_stage_trains_the_tower_on_fresh_sheets_and_returns_its_readout(processor):
    from transformers import AutoModelForImageTextToText

    out, proc = processor
    model = AutoModelForImageTextToText.from_pretrained(out)
    visual = model.model.visual
    before = {k: v.clone() for k, v in visual.state_dict().items()}
    logs = []
    readout, record = letter_stage(visual, proc, white(), steps=3, batch=2, lr=1e-3, jitter=0.5, seed=0,
                                   log=logs.append)
    assert readout.out_features == 24 and readout.in_features == model.config.vision_config.out_hidden_size
    assert set(record) == {"letter_minutes", "letter_sheet_accuracy"} and 0 <= record["letter_sheet_accuracy"] <= 1
    changed = [k for k, v in visual.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and logs and not visual.training
    # a processor whose budget would resize a sheet is refused before any step
    with pytest.raises(ValueError, match="max-image-tokens"):
        check_config(OrganismConfig(max_image_tokens=16))


def test_mean_colour_is_imagestats_mean_to_the_last_bit_and_the_drawings_do_not_change(monkeypatch):
    """The letter's colour is chosen from the mean colour under it: `mean_colour` (numpy sums) gives
    ImageStat's means exactly, on any mode and on boxes partly off the image, so sheets and strips are the
    pixels they were."""
    from PIL import ImageStat

    import datagen.letters as dl
    from datagen.procedural import draw_panel

    rng = random.Random(3)
    panel = draw_panel("cat", "runs", "ball", "park", 64, random.Random(0)).image
    for mode in ("RGB", "RGBA", "L"):
        image = panel.convert(mode)
        for _ in range(50):
            x0, y0 = rng.randint(-10, 60), rng.randint(-10, 60)
            box = (x0, y0, x0 + rng.randint(1, 30), y0 + rng.randint(1, 30))
            assert dl.mean_colour(image, box) == ImageStat.Stat(image.crop(box)).mean[:3]
    backgrounds = [panel, panel.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    fast = letter_sheet(backgrounds, random.Random(7), token=32, jitter=0.6)
    strip_fast = panel.copy()
    box_fast = dl.draw_letter(strip_fast, "K", random.Random(8))
    monkeypatch.setattr(dl, "mean_colour", lambda image, box: ImageStat.Stat(image.crop(tuple(box))).mean[:3])
    slow = letter_sheet(backgrounds, random.Random(7), token=32, jitter=0.6)
    strip_slow = panel.copy()
    assert dl.draw_letter(strip_slow, "K", random.Random(8)) == box_fast
    assert fast[1:] == slow[1:] and list(fast[0].getdata()) == list(slow[0].getdata())
    assert list(strip_fast.getdata()) == list(strip_slow.getdata())
