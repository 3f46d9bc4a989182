"""Tracking: where the chosen heads look at every generation step.

A `Tracker` hook keeps, at each forward (the prefill's last prompt token, then
each decoded token), the chosen heads' post-softmax attention over the image
tokens: [steps, heads, T] at float16 on CPU, never all heads. From it:

- `trajectory(regions)`: [steps, R] mean raw mass per region (and normalised
  over regions): during free narration a staircase, panel by panel;
- `heatmap(step)`: [rows, cols] mass over the image-token grid;
- `image_share()`: [steps] share of attention on the image at all.

`value_weighted=True` multiplies each key's attention by the norm of its
value vector (what actually gets moved), then records that instead.

Per-token inspection (`Inspection`, what `gaze inspect` writes): for a
generated answer, every token's map over the image tokens, its share of
attention on the image, and its most-attended region; words are runs of
tokens (a token starting with a space or after punctuation starts a word),
a word's map the mean of its tokens' maps.
Memory: steps x heads x T x 2 bytes (e.g. 512 steps x 100 heads x 1,000
image tokens = 100 MB); `memory_bytes` tells before you generate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from gaze.attention import Hook
from gaze.errors import GazeError
from gaze.ranking import Head
from gaze.regions import ImageLayout, RegionMap, region_mass

if TYPE_CHECKING:
    from gaze.generation import Generation


def memory_bytes(steps: int, n_heads: int, n_image_tokens: int) -> int:
    """Bytes a Tracker keeps for `steps` steps of `n_heads` heads over `n_image_tokens` (float16)."""
    return steps * n_heads * n_image_tokens * 2


@dataclass
class Tracker(Hook):
    """Records chosen heads' attention over the image tokens at every forward."""

    heads: list[Head]
    layout: ImageLayout
    value_weighted: bool = False
    row: int = 0  # batch row to track
    steps: list[torch.Tensor] = field(default_factory=list)  # per forward: [heads, T] float16
    image_total: list[torch.Tensor] = field(default_factory=list)  # per forward: [heads] image share
    _by_layer: dict[int, list[int]] = field(default_factory=dict)
    _order: dict[Head, int] = field(default_factory=dict)
    _pending: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        for i, (l, h) in enumerate(self.heads):
            self._by_layer.setdefault(l, []).append(h)
            self._order[(l, h)] = i

    def on_forward(self, input_ids: torch.Tensor) -> None:
        self._flush()

    def wants(self, layer: int) -> bool:
        return layer in self._by_layer

    def record(self, layer: int, rows: torch.Tensor, value: torch.Tensor) -> None:
        heads = self._by_layer[layer]
        r = rows[self.row, heads]  # [h, kv]
        if self.value_weighted:
            rep = rows.shape[1] // value.shape[1]
            norms = value[self.row].float().norm(dim=-1).repeat_interleave(rep, dim=0)[heads]  # [h, kv]
            r = r * norms
        for h, vec in zip(heads, r):
            self._pending[self._order[(layer, h)]] = vec
        if len(self._pending) == len(self.heads):
            self._flush()  # the step is complete: visible to a streamer as soon as its token is out

    def _flush(self) -> None:
        if not self._pending:
            return
        if len(self._pending) != len(self.heads):
            raise RuntimeError("tracked heads missing from a forward: every tracked layer must run each step")
        full = torch.stack([self._pending[i] for i in range(len(self.heads))])  # [heads, kv]
        image = full[:, self.layout.positions.to(full.device)]  # [heads, T]
        self.steps.append(image.to("cpu", torch.float16))
        self.image_total.append(image.sum(-1).to("cpu", torch.float32))
        self._pending = {}

    def at(self, step: int) -> torch.Tensor | None:
        """[heads, T] float32 attention over the image tokens at forward `step` (0 = the prompt's last token),
        or None while that step is not complete; safe to call from another thread during generation."""
        steps = self.steps
        return steps[step].float() if 0 <= step < len(steps) else None

    def attention(self) -> torch.Tensor:
        """[steps, heads, T] float32 over image tokens (step 0 = last prompt token)."""
        self._flush()
        if not self.steps:
            return torch.zeros((0, len(self.heads), self.layout.n_tokens))
        return torch.stack(self.steps).float()

    def trajectory(self, regions: RegionMap, normalise: bool = False) -> torch.Tensor:
        """[steps, R]: mean over tracked heads of the mass on each region."""
        mass = region_mass(self.attention(), regions)  # [steps, heads, R]
        traj = mass.mean(1)  # [steps, R]
        if normalise:
            traj = traj / traj.sum(-1, keepdim=True).clamp_min(1e-12)
        return traj

    def image_share(self) -> torch.Tensor:
        """[steps]: mean over tracked heads of the attention on the image at all (raw)."""
        self._flush()
        return torch.stack(self.image_total).mean(-1) if self.image_total else torch.zeros(0)

    def heatmap(self, step: int, normalise: bool = False) -> torch.Tensor:
        """[rows, cols] mean attention over the token grid at one step (layout must be a grid)."""
        if self.layout.grid is None:
            raise GazeError("this image's tokens do not form one grid: use `attention()` and the layout's cells")
        grid = self.attention()[step].mean(0).reshape(self.layout.grid)  # [rows, cols]
        if normalise:
            grid = grid / grid.sum().clamp_min(1e-12)
        return grid


# ---------------------------------------------------------------- per-token inspection

@dataclass(frozen=True)
class Word:
    text: str
    tokens: tuple[int, ...]  # indices into the generated tokens


def words_of(pieces: list[str]) -> list[Word]:
    """Group token pieces into words (a piece starting with whitespace starts a new word)."""
    words: list[Word] = []
    text, tokens = "", []
    for i, piece in enumerate(pieces):
        starts = piece[:1].isspace() or (text and not text[-1:].isalnum() and piece[:1].isalnum())
        if tokens and starts:
            words.append(Word(text.strip(), tuple(tokens)))
            text, tokens = "", []
        text += piece
        tokens.append(i)
    if tokens:
        words.append(Word(text.strip(), tuple(tokens)))
    return [w for w in words if w.text]


@dataclass(frozen=True)
class Inspection:
    """Per generated token: the chosen heads' attention over the image."""

    generation: "Generation"  # gaze.generation.Generation, tracked
    regions: RegionMap

    def token_maps(self, normalise: bool = False) -> torch.Tensor:
        """[tokens, T]: mean over the chosen heads of each token's attention on each image token."""
        att = self.generation.tracker.attention()[: len(self.generation.token_ids)].mean(1)  # [tokens, T]
        if normalise:
            att = att / att.sum(-1, keepdim=True).clamp_min(1e-12)
        return att

    def heatmap(self, token: int, normalise: bool = False) -> torch.Tensor:
        """[rows, cols] map of one token over the image-token grid."""
        grid = self.generation.layout.grid
        if grid is None:
            raise GazeError("this image's tokens do not form one grid: use token_maps() with the layout's cells")
        return self.token_maps(normalise)[token].reshape(grid)

    def image_share(self) -> torch.Tensor:
        """[tokens]: share of each token's attention (chosen heads, mean) on the image at all."""
        return self.token_maps().sum(-1)

    def region_of(self, tokens) -> tuple[int, float]:
        """(most-attended region, its share of the image mass) for a token or a run of tokens."""
        maps = self.token_maps()[list(tokens)].mean(0)  # [T]
        mass = region_mass(maps, self.regions)  # [R]
        k = int(mass.argmax())
        return k, float(mass[k] / maps.sum().clamp_min(1e-12))

    def words(self) -> list[Word]:
        return words_of(self.generation.pieces)
