"""words.png, the per-word heat-map grid of `gaze inspect`: it says so when it shows only the first words."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from gaze import plots
from gaze.tracking import Word


def _inspection(n_words: int):
    words = [Word(f"w{i}", (i,)) for i in range(n_words)]
    return SimpleNamespace(words=lambda: words, token_maps=lambda: torch.ones(n_words, 4),
                           region_of=lambda tokens: (0, 1.0), regions=SimpleNamespace(names=["panel 1"]),
                           generation=SimpleNamespace(layout=None))


@pytest.mark.parametrize("n_words, noted", [(plots.MAX_GRID_WORDS, False), (plots.MAX_GRID_WORDS + 6, True)])
def test_the_grid_says_when_it_stops_at_max_words(n_words, noted, monkeypatch):
    monkeypatch.setattr(plots, "heatmap", lambda image, layout, weights: image)
    image = Image.new("RGB", (96, 16), "white")
    sheet = plots.word_grid(_inspection(n_words), image)
    grid_h = plots.MAX_GRID_WORDS // 4 * (16 + 16)  # 4 columns; each cell: a caption line over the image
    assert sheet.size == (4 * 96, grid_h + (16 if noted else 0))
    if noted:  # the last line holds text (dark pixels) below the grid
        below = sheet.crop((0, grid_h, sheet.size[0], sheet.size[1])).convert("L")
        assert below.getextrema()[0] < 128
