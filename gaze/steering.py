"""Steering: one additive, pre-softmax attention bias on the chosen heads.

    inputs, _ = prepare_inputs(loaded, strip.image, question)     # gaze.generation
    with steer(model, heads, Panel(3), inputs=inputs, panels=strip.panels):
        model.generate(**inputs)

The image layout (which sequence positions are image tokens, and the pixel
cell of each) comes with `inputs`; the prompt length is read at each prefill.

At every attention call of the chosen heads, keys are biased by image-token
membership of the target region (`mode`):

    "boost"          +B on target image tokens, -B on the other image tokens (paper default)
    "suppress"        0 on target image tokens, -B on the other image tokens
    "suppress_text"   as "suppress", and -B on the prompt's text tokens too

Text keys (and generated tokens) are otherwise untouched, other heads are
untouched, no weight changes. B = `strength` (default 1e4, which saturates
the softmax; any float works, 0 is exactly no steering). The bias rides on
the fused SDPA kernel as its float mask (see `attention`). `phase` says when:

    "all"      prefill and every decode step (the published default)
    "prefill"  the prompt's rows only: the last one picks the answer's first
               token; the answer then goes on unsteered, reading the prompt's
               cache as the steered pass left it (static targets only)
    "decode"   decode steps only: the prompt is read unsteered

Per-generation state (decode step, target in force, tokens since the last
switch) is reset at every prefill, so each `model.generate` call inside one
`with steer(...)` block is steered the same way from its first token.

A `Schedule` switches the target during generation: every N tokens, at the
first sentence boundary after N tokens, or at explicit steps; targets may
repeat. Static steering is a one-entry schedule: there is one bias builder.

The steering state lives in a `Steering` hook activated for the calling
thread only; it is gone when the block exits, even on an exception.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Sequence, Union

import torch

from gaze.attention import Hook, active, prepare
from gaze.errors import SteeringError
from gaze.ranking import Head
from gaze.regions import ImageLayout, RegionError, box_membership, panel_regions
from gaze.strips import Rect

Mode = Literal["boost", "suppress", "suppress_text"]
MODES: tuple[str, ...] = ("boost", "suppress", "suppress_text")
Phase = Literal["all", "prefill", "decode"]
PHASES: tuple[str, ...] = ("all", "prefill", "decode")
DEFAULT_STRENGTH = 1e4


@dataclass(frozen=True)
class Panel:
    """Panel k of the strip, 1-based in reading order."""

    k: int


@dataclass(frozen=True)
class Box:
    """A pixel box (x0, y0, x1, y1) of the original image."""

    box: Rect  # (x0, y0, x1, y1)


@dataclass(frozen=True)
class Tokens:
    """Explicit sequence positions of image tokens."""

    positions: tuple[int, ...]


Target = Union[Panel, Box, Tokens]


def as_target(target) -> Target:
    """Accept an int (panel, 1-based), a 4-tuple box, or a Target."""
    if isinstance(target, (Panel, Box, Tokens)):
        return target
    if isinstance(target, int):
        return Panel(target)
    if isinstance(target, (tuple, list)) and len(target) == 4:
        return Box(tuple(float(v) for v in target))
    raise SteeringError(f"cannot steer to {target!r}: give a panel number, a box (x0, y0, x1, y1), Panel, Box or Tokens")


@dataclass(frozen=True)
class Schedule:
    """Targets in order, and when to move to the next one.

    Exactly one of `every` (switch every N generated tokens) or `steps`
    (explicit decode steps at which targets 2, 3, ... start) is set, unless
    there is a single target. With `at_sentence`, a switch due after `every`
    tokens waits for the next sentence boundary. After the last target the
    schedule stays on it.
    """

    targets: tuple[Target, ...]
    every: int | None = None  # switch every N generated tokens
    steps: tuple[int, ...] | None = None  # explicit switch steps, len(targets) - 1 ascending values
    at_sentence: bool = False  # wait for a sentence end once the `every` budget is spent

    def __post_init__(self):
        if not self.targets:
            raise SteeringError("a schedule needs at least one target")
        if len(self.targets) > 1 and (self.every is None) == (self.steps is None):
            raise SteeringError("a schedule with several targets needs either `every` (tokens) or `steps`, not both")
        if self.every is not None and self.every < 1:
            raise SteeringError(f"switch interval must be >= 1 token, got {self.every}")
        if self.steps is not None:
            if len(self.steps) != len(self.targets) - 1:
                raise SteeringError(f"{len(self.steps)} switch steps for {len(self.targets)} targets: give one fewer step than targets")
            if list(self.steps) != sorted(set(self.steps)) or self.steps[0] < 1:
                raise SteeringError(f"switch steps must be strictly increasing and >= 1, got {list(self.steps)}")
        if self.at_sentence and self.every is None:
            raise SteeringError("switching at sentence boundaries needs `every` (the minimum tokens per target)")

    @classmethod
    def static(cls, target) -> "Schedule":
        return cls((as_target(target),))


def parse_schedule(text: str, every: int | None = None, *, steps: str | Sequence[int] | None = None,
                   at_sentence: bool = False, n_panels: int | None = None, max_len: int = 64) -> Schedule:
    """"4,2,1,6,5,3" (1-based panels) -> Schedule; a readable ValueError for bad input."""
    if re.search(r"(^|[,;])\s*([,;]|$)", text.strip()) and text.strip():
        raise SteeringError(f"schedule {text!r} has an empty entry: give panel numbers separated by single commas, "
                         "e.g. 4,2,1,6,5,3")
    items = [t for t in re.split(r"[\s,;]+", text.strip()) if t]
    if not items:
        raise SteeringError("empty schedule: give panel numbers separated by commas, e.g. 4,2,1,6,5,3")
    if len(items) > max_len:
        raise SteeringError(f"schedule too long ({len(items)} entries, at most {max_len})")
    panels = []
    for t in items:
        if not t.isdigit():
            raise SteeringError(f"bad schedule entry {t!r}: give panel numbers separated by commas, e.g. 4,2,1,6,5,3")
        k = int(t)
        if k < 1 or (n_panels is not None and k > n_panels):
            raise SteeringError(f"panel {k} is out of range: panels are 1..{n_panels or 'N'}")
        panels.append(Panel(k))
    if isinstance(steps, str):
        try:
            steps = [int(s) for s in re.split(r"[\s,;]+", steps.strip()) if s]
        except ValueError:
            raise SteeringError(f"bad switch steps {steps!r}: give integers separated by commas") from None
    if len(panels) > 1 and every is None and steps is None:
        raise SteeringError("a schedule of several panels needs a switch interval in tokens (every=N)")
    return Schedule(tuple(panels), every=None if steps else every, steps=tuple(steps) if steps else None,
                    at_sentence=at_sentence)


def target_membership(target: Target, layout: ImageLayout, panels: Sequence | None) -> torch.Tensor:
    """[T] bool: the image tokens of `target` (raises a RegionError with the fix)."""
    if isinstance(target, Panel):
        if panels is None:
            raise RegionError("a panel target needs the panel boxes (a strip, or --panels N to split the image)")
        if not 1 <= target.k <= len(panels):
            raise RegionError(f"panel {target.k} is out of range: this image has panels 1..{len(panels)}")
        return panel_regions(layout, panels).membership[target.k - 1].bool()
    if isinstance(target, Box):
        return box_membership(layout, target.box)
    if isinstance(target, Tokens):
        member = torch.isin(layout.positions, torch.tensor(target.positions, dtype=torch.long))
        if int(member.sum()) != len(set(target.positions)):
            raise RegionError("some target positions are not image tokens of this prompt")
        if not bool(member.any()):
            raise RegionError("the token target is empty")
        return member
    raise SteeringError(f"unknown target {target!r}")


def check_heads(heads: Sequence[Head], n_layers: int, n_heads: int) -> list[Head]:
    out = []
    for h in heads:
        if len(h) != 2:
            raise SteeringError(f"a head is (layer, head), got {h!r}")
        l, i = int(h[0]), int(h[1])
        if not (0 <= l < n_layers and 0 <= i < n_heads):
            raise SteeringError(f"head {(l, i)} is outside the model: layers 0..{n_layers - 1}, heads 0..{n_heads - 1}")
        out.append((l, i))
    return out


def key_bias(membership: torch.Tensor, layout: ImageLayout, prompt_len: int, kv_len: int, strength: float,
             mode: Mode) -> torch.Tensor:
    """[kv] additive bias over keys for one prompt: the single place the steering bias is defined."""
    row = torch.zeros(kv_len, dtype=torch.float32)
    pos = layout.positions
    if mode == "suppress_text":
        row[: min(prompt_len, kv_len)] = -strength
    image = torch.full((pos.numel(),), -strength)
    image[membership] = strength if mode == "boost" else 0.0
    keep = pos < kv_len
    row[pos[keep]] = image[keep]
    return row


@dataclass
class Steering(Hook):
    """The hook that applies a schedule to chosen heads.

    Its state is per generation: every prefill (the first forward, or any
    forward fed more than one token) starts the schedule again at its first
    target, so two `generate` calls in one `steer` block are steered alike.
    """

    heads: dict[int, torch.Tensor]  # layer -> head indices
    n_heads: int
    memberships: list[torch.Tensor]  # per schedule target: [T] bool over the layout's image tokens
    schedule: Schedule
    layout: ImageLayout
    prompt_len: int | None = None  # None: the length of each prefill (used by mode "suppress_text")
    strength: float = DEFAULT_STRENGTH
    mode: Mode = "boost"
    phase: Phase = "all"
    is_boundary: Callable[[int], bool] | None = None  # token id -> ends a sentence
    # state, per generation (reset at each prefill):
    step: int = -1  # forwards of this generation - 1: 0 is the prefill, -1 before any
    current: int = 0  # index into schedule.targets
    since_switch: int = 0  # tokens generated under the current target
    applied: list[int] = field(default_factory=list)  # target index in force at each forward of this generation
    generations: int = 0  # prefills seen inside the block
    _prefill_len: int = 0
    _row: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict)

    def on_forward(self, input_ids: torch.Tensor) -> None:
        n = int(input_ids.shape[-1])
        if self.step < 0 or n > 1:  # a new prefill: a new generation starts from the first target
            self.step, self.current, self.since_switch, self.applied = 0, 0, 0, []
            self.generations += 1
            self._prefill_len = n
        else:
            self.step += 1
            self.since_switch += 1
            self._advance(int(input_ids.reshape(-1)[-1]))
        self.applied.append(self.current)
        self._row = None
        self._cache.clear()

    def _advance(self, last_token: int) -> None:
        s = self.schedule
        if self.current >= len(s.targets) - 1:
            return
        if s.steps is not None:
            due = self.step >= s.steps[self.current]
        else:
            due = self.since_switch >= s.every
            if due and s.at_sentence:
                due = self.is_boundary is not None and self.is_boundary(last_token)
        if due:
            self.current += 1
            self.since_switch = 0

    def steers(self, step: int) -> bool:
        """Whether forward `step` of a generation (0 = the prefill) is biased under this phase."""
        if self.phase == "prefill":
            return step == 0
        if self.phase == "decode":
            return step > 0
        return True

    def target_at(self, token: int) -> int | None:
        """Index into `schedule.targets` of the target that steered generated token `token` (0-based) of
        the current generation, or None when that token was produced unsteered (phase) or is not out yet.

        Token t is produced by forward t (forward 0 is the prefill)."""
        if not 0 <= token < len(self.applied) or not self.steers(token):
            return None
        return self.applied[token]

    def bias(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        heads = self.heads.get(layer)
        if heads is None or self.strength == 0 or not self.steers(max(self.step, 0)):
            return None
        kv = key.shape[2]
        cached = self._cache.get((layer, kv, query.device, query.dtype))
        if cached is not None:
            return cached
        if self._row is None or self._row.shape[0] != kv:
            prompt_len = self.prompt_len if self.prompt_len is not None else (self._prefill_len or query.shape[2])
            self._row = key_bias(self.memberships[self.current], self.layout, prompt_len, kv, self.strength, self.mode)
        b = torch.zeros((1, self.n_heads, 1, kv), dtype=query.dtype, device=query.device)  # [1, H, 1, kv]
        b[0, heads.to(query.device), 0] = self._row.to(query.device, query.dtype)
        self._cache[(layer, kv, query.device, query.dtype)] = b
        return b


def sentence_boundary_fn(tokenizer) -> Callable[[int], bool]:
    """token id -> whether its text ends a sentence (., !, ? or a newline)."""
    memo: dict[int, bool] = {}

    def is_boundary(token_id: int) -> bool:
        if token_id not in memo:
            text = tokenizer.decode([token_id])
            memo[token_id] = bool(re.search(r"[.!?\n]\s*$", text))
        return memo[token_id]

    return is_boundary


@contextlib.contextmanager
def steer(
    model,
    heads: Sequence[Head],
    target=None,
    *,
    inputs=None,
    panels: Sequence | None = None,
    schedule: Schedule | None = None,
    strength: float = DEFAULT_STRENGTH,
    mode: Mode = "boost",
    phase: Phase = "all",
    tokenizer=None,
    layout: ImageLayout | None = None,
    prompt_len: int | None = None,
) -> Iterator[Steering]:
    """Steer `heads` of `model` to `target` (or along `schedule`) inside the block.

    `inputs` are the prompt's model inputs as `gaze.generation.prepare_inputs`
    returns them: they carry the image layout, so a caller never computes
    geometry. `panels` are the panel boxes when targets are panels. (A plain
    dict of inputs needs `layout=` instead; `prompt_len` overrides the length
    read at each prefill.) `tokenizer` is needed for `Schedule(at_sentence=True)`.

    The block yields the `Steering` hook: `target_at(t)` says which schedule
    target steered generated token t (None: unsteered). Two `generate` calls in
    the block are steered alike (the schedule restarts at each prefill).
    """
    if (target is None) == (schedule is None):
        raise SteeringError("steer needs exactly one of `target` or `schedule`")
    if mode not in MODES:
        raise SteeringError(f"unknown steering mode {mode!r}; use one of {MODES}")
    if phase not in PHASES:
        raise SteeringError(f"unknown steering phase {phase!r}; use one of {PHASES}")
    if layout is None:
        layout = getattr(inputs, "layout", None)
    if layout is None:
        raise SteeringError("steer needs the prompt's inputs from `gaze.generation.prepare_inputs` (or `layout=`)")
    schedule = schedule or Schedule.static(target)
    if phase == "prefill" and len(schedule.targets) > 1:
        raise SteeringError("a schedule switches targets while the answer is written: steer it with phase 'all'")
    cfg = model.config.get_text_config()
    heads = check_heads(heads, cfg.num_hidden_layers, cfg.num_attention_heads)
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    memberships = [target_membership(t, layout, panels) for t in schedule.targets]
    if schedule.at_sentence and tokenizer is None:
        raise SteeringError("switching at sentence boundaries needs the tokenizer")
    prepare(model)
    hook = Steering(
        heads={l: torch.tensor(sorted(set(hs))) for l, hs in by_layer.items()},
        n_heads=cfg.num_attention_heads,
        memberships=memberships,
        schedule=schedule,
        layout=layout,
        prompt_len=prompt_len,
        strength=float(strength),
        mode=mode,
        phase=phase,
        is_boundary=sentence_boundary_fn(tokenizer) if tokenizer is not None else None,
    )
    with active(hook):
        yield hook
