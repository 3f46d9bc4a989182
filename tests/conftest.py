"""Shared fixtures: tiny VLMs built from configs, saved, and loaded through the real `from_pretrained`."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from PIL import Image

from dataclasses import dataclass

from gaze.attention import Hook
from gaze.strips import Strip, stitch_panels

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# family -> merged patch size in pixels
FAMILIES = {"qwen3_vl": 32, "qwen2_vl": 28}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


def _build(family: str, folder, **kw):
    from gaze.testing import build_tiny_vlm

    if not (folder / "config.json").exists():
        build_tiny_vlm(family, folder, **kw)
    return folder


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def tiny_path(request, tiny_dir):
    """A saved tiny model folder of each family (GQA: 4 heads, 2 KV heads)."""
    return _build(request.param, tiny_dir / request.param)


@pytest.fixture(scope="session")
def qwen3_path(tiny_dir):
    return _build("qwen3_vl", tiny_dir / "qwen3_vl")


@pytest.fixture(scope="session")
def loaded(tiny_path):
    from gaze.models import load

    return load(str(tiny_path), device="cpu")


@pytest.fixture(scope="session")
def loaded_qwen3(qwen3_path):
    from gaze.models import load

    return load(str(qwen3_path), device="cpu")


@pytest.fixture(scope="session")
def tiny_ranking(loaded_qwen3, tmp_path_factory):
    """A ranking folder of the tiny Qwen3-VL (discovery on 2 procedural strips), shared read-only by the tests."""
    from gaze.discovery import discover
    from gaze.eval.protocols import eval_strips

    out = tmp_path_factory.mktemp("tiny-discovery")
    discover(loaded_qwen3, eval_strips("procedural:discovery", 2), out, progress=False)
    return out


def make_strip(patch: int, seed: int = 0, n: int = 6, cell_tokens: int = 2) -> Strip:
    """Six flat, distinct panels of `cell_tokens` x `cell_tokens` merged tokens each."""
    g = torch.Generator().manual_seed(seed)
    side = patch * cell_tokens
    panels = []
    for _ in range(n):
        colour = torch.randint(0, 200, (1, 1, 3), generator=g)
        noise = torch.randint(0, 56, (side, side, 3), generator=g)
        panels.append(Image.fromarray((colour + noise).to(torch.uint8).numpy()))
    image, boxes = stitch_panels(panels)
    return Strip(image=image, panels=boxes, strip_id=f"s{seed}", captions=tuple(f"c{k}" for k in range(n)))


@pytest.fixture(scope="session")
def strip_for():
    return make_strip


@dataclass
class PlantedHead(Hook):
    """Makes one head look at the panel named by the latest digit in its context ("the 3rd panel").

    `digit_of(token_id)` gives the digit a token starts with (or None); every query
    row after a digit k gets +strength on panel k's image tokens in that head.
    """

    layer: int
    head: int
    panel_positions: list  # per panel: sequence positions of its image tokens
    digit_of: object = None
    strength: float = 8.0
    _panel: list = None  # per query row of the current forward: the panel named last (0: none)

    def on_forward(self, input_ids):
        named, current = [], 0
        for t in input_ids[0].tolist():
            d = self.digit_of(t)
            if d is not None and 1 <= d <= len(self.panel_positions):
                current = d
            named.append(current)
        self._panel = named

    def bias(self, layer, query, key):
        if layer != self.layer or not any(self._panel or []):
            return None
        b = torch.zeros((1, query.shape[1], query.shape[2], key.shape[2]), dtype=query.dtype)
        for row, k in enumerate(self._panel[-query.shape[2]:]):
            if k:
                b[0, self.head, row, self.panel_positions[k - 1]] = self.strength
        return b


def digit_reader(tokenizer):
    """token id -> the digit its text starts with, or None."""
    memo = {}

    def digit_of(token_id):
        if token_id not in memo:
            text = tokenizer.decode([token_id]).strip()
            memo[token_id] = int(text[0]) if text[:1].isdigit() else None
        return memo[token_id]

    return digit_of
