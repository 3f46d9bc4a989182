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
    "after_image"  the prompt's rows after the image prefix (system text and
               image tokens, up to the vision end token) and every decode
               step: the image prefix is read unsteered, which is exactly what
               a cached image prefix (`gaze.generation.PrefixCache`) serves

Per-generation state (decode step, target in force, tokens since the last
switch) is reset at every prefill, so each `model.generate` call inside one
`with steer(...)` block is steered the same way from its first token.

A `Schedule` switches the target during generation: every N tokens, at the
first sentence boundary after N tokens, or at explicit steps; targets may
repeat. Static steering is a one-entry schedule: there is one bias builder.

A `LiveTarget` is a target that another thread may move while the answer
is written: `live.retarget(Panel(5))` (or a `Box`, or None for no steering)
takes effect at the next forward (decode step) of every generation steered
to it; the hook records the target in force at each forward, so the stream
says which target steered each token. A re-target before forward n gives
the tokens of a schedule switching at step n (tested).

The steering state lives in a `Steering` hook activated for the calling
thread only; it is gone when the block exits, even on an exception.
"""

from __future__ import annotations

import contextlib
import numbers
import re
import threading
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
Phase = Literal["all", "prefill", "decode", "after_image"]
PHASES: tuple[str, ...] = ("all", "prefill", "decode", "after_image")
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


class LiveTarget:
    """A steering target that may be moved, from any thread, while a generation runs.

        live = LiveTarget(Panel(2))                      # or None: start unsteered
        threading.Thread(target=generate, args=(loaded, image, q),
                         kwargs=dict(heads=heads, target=live, panels=panels)).start()
        live.retarget(Panel(5))                          # the next token is steered to panel 5
        live.retarget(None)                              # ... and the one after that is not steered

    `retarget` takes a panel number, a box, a `Panel`/`Box`/`Tokens` or None,
    and checks it against every generation currently steered to this handle
    (a `RegionError` in the caller's thread, e.g. for a box over no image
    token; the target in force is then unchanged). Each generation reads the
    handle once per forward, so a change lands between two decode steps,
    never inside one. Several generations may share a handle; usually each
    has its own.
    """

    def __init__(self, target=None):
        self._lock = threading.Lock()
        self._target: Target | None = None if target is None else as_target(target)
        self._hooks: list["Steering"] = []
        self.changes = 0  # retargets so far

    @property
    def target(self) -> Target | None:
        return self._target

    def retarget(self, target) -> None:
        """Steer to `target` (None: no steering) from the next decode step on."""
        new = None if target is None else as_target(target)
        with self._lock:
            hooks = list(self._hooks)
        for hook in hooks:
            hook.membership_of(new)  # raises for a target that this image cannot take; memoised for the hook
        with self._lock:
            self._target = new
            self.changes += 1

    def _bind(self, hook: "Steering") -> None:
        with self._lock:
            self._hooks.append(hook)

    def _unbind(self, hook: "Steering") -> None:
        with self._lock:
            self._hooks = [h for h in self._hooks if h is not hook]

    def __repr__(self) -> str:
        return f"LiveTarget({self._target!r})"


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


def _index(v, h) -> int:
    """An integer layer or head index; floats (3.7, even 3.0), bools and strings are refused, never truncated."""
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point() and v.dtype != torch.bool:
        return int(v)
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return int(v)
    raise SteeringError(f"head {h!r}: layer and head must be whole numbers (layer, head), e.g. (3, 1); got {v!r}")


def check_heads(heads: Sequence[Head], n_layers: int, n_heads: int) -> list[Head]:
    """The heads as (layer, head) int pairs inside the model, or a SteeringError naming the bad one."""
    out = []
    for h in heads:
        try:
            n = len(h)
        except TypeError:
            n = -1
        if n != 2:
            raise SteeringError(f"a head is (layer, head), got {h!r}")
        l, i = _index(h[0], h), _index(h[1], h)
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
    """The hook that applies a schedule (or a `LiveTarget`) to chosen heads.

    Its state is per generation: every prefill (the first forward, or any
    forward fed more than one token) starts the schedule again at its first
    target, so two `generate` calls in one `steer` block are steered alike.
    A live target is read afresh at every forward instead.

    `targets` lists every target that steered (the schedule's, or each new
    value of the live target as it came, None for "not steered");
    `applied[f]` is the index into it of the target in force at forward f.
    """

    heads: dict[int, torch.Tensor]  # layer -> head indices
    n_heads: int
    memberships: list[torch.Tensor]  # per schedule target: [T] bool over the layout's image tokens
    schedule: Schedule | None
    layout: ImageLayout
    prompt_len: int | None = None  # None: the length of each prefill (used by mode "suppress_text")
    strength: float = DEFAULT_STRENGTH
    mode: Mode = "boost"
    phase: Phase = "all"
    is_boundary: Callable[[int], bool] | None = None  # token id -> ends a sentence
    live: LiveTarget | None = None  # read at every forward instead of the schedule
    panels: Sequence | None = None  # panel boxes, for live panel targets
    image_end: int = 0  # phase "after_image": sequence positions before this are the (unsteered) image prefix
    # state, per generation (reset at each prefill):
    step: int = -1  # forwards of this generation - 1: 0 is the prefill, -1 before any
    current: int = 0  # index into `targets`
    since_switch: int = 0  # tokens generated under the current target
    applied: list[int] = field(default_factory=list)  # target index in force at each forward of this generation
    generations: int = 0  # prefills seen inside the block
    targets: list = field(default_factory=list)  # Target | None per index (filled from the schedule)
    _prefill_len: int = 0
    _row: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict)
    _members: dict = field(default_factory=dict)  # target -> membership (live targets, memoised)

    def __post_init__(self):
        if self.schedule is not None and not self.targets:
            self.targets = list(self.schedule.targets)
            if len(self.memberships) == len(self.targets):
                for t, m in zip(self.targets, self.memberships):
                    self._members.setdefault(t, m)

    def membership_of(self, target: Target | None) -> torch.Tensor | None:
        """[T] bool membership of `target` in this prompt's image tokens (None for None), memoised; raises a
        RegionError for a target this image cannot take."""
        if target is None:
            return None
        m = self._members.get(target)
        if m is None:
            m = self._members[target] = target_membership(target, self.layout, self.panels)
        return m

    def _index_of(self, target: Target | None) -> int:
        for i, t in enumerate(self.targets):
            if t == target:
                return i
        member = self.membership_of(target)
        self.memberships = self.memberships + [member]  # a new list: a reader in another thread sees old or new
        self.targets = self.targets + [target]
        return len(self.targets) - 1

    def on_forward(self, input_ids: torch.Tensor) -> None:
        n = int(input_ids.shape[-1])
        if self.step < 0 or n > 1:  # a new prefill: a new generation starts from the first target
            self.step, self.current, self.since_switch, self.applied = 0, 0, 0, []
            self.generations += 1
            self._prefill_len = n
        else:
            self.step += 1
            self.since_switch += 1
            if self.live is None:
                self._advance(int(input_ids.reshape(-1)[-1]))
        if self.live is not None:
            current = self._index_of(self.live.target)  # one read per forward: a retarget lands between steps
            if current != self.current:
                self.since_switch = 0
            self.current = current
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
        """Index into `targets` of the target that steered generated token `token` (0-based) of the current
        generation, or None when that token was produced unsteered (phase, or a live target of None) or is not
        out yet.

        Token t is produced by forward t (forward 0 is the prefill)."""
        if not 0 <= token < len(self.applied) or not self.steers(token):
            return None
        i = self.applied[token]
        return None if self.targets[i] is None else i

    def target_of(self, token: int) -> Target | None:
        """The target (Panel, Box, Tokens) that steered generated token `token`, or None (unsteered)."""
        i = self.target_at(token)
        return None if i is None else self.targets[i]

    def bias(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        heads = self.heads.get(layer)
        if heads is None or self.strength == 0 or not self.steers(max(self.step, 0)):
            return None
        membership = self.memberships[self.current] if self.current < len(self.memberships) else None
        if membership is None:  # a live target of None: this forward is not steered
            return None
        q, kv = query.shape[2], key.shape[2]
        skip = 0  # leading query rows left unsteered: the image prefix under phase "after_image"
        if self.phase == "after_image" and q > 1:
            skip = max(0, min(q, self.image_end - (kv - q)))
        cached = self._cache.get((layer, kv, skip, query.device, query.dtype))
        if cached is not None:
            return cached
        if self._row is None or self._row.shape[0] != kv:
            prompt_len = self.prompt_len if self.prompt_len is not None else (self._prefill_len or query.shape[2])
            self._row = key_bias(membership, self.layout, prompt_len, kv, self.strength, self.mode)
        row = self._row.to(query.device, query.dtype)
        if skip:
            b = torch.zeros((1, self.n_heads, q, kv), dtype=query.dtype, device=query.device)  # [1, H, q, kv]
            b[0, heads.to(query.device), skip:] = row
        else:
            b = torch.zeros((1, self.n_heads, 1, kv), dtype=query.dtype, device=query.device)  # [1, H, 1, kv]
            b[0, heads.to(query.device), 0] = row
        self._cache[(layer, kv, skip, query.device, query.dtype)] = b
        return b


def image_prefix_len(model, input_ids: torch.Tensor, layout: ImageLayout) -> int:
    """Tokens of the prompt's image prefix: up to and including the vision end token after the last image
    token (Qwen-VL's <|vision_end|>), or up to the last image token when the family has no end token."""
    end = int(layout.positions[-1]) + 1
    end_id = getattr(model.config, "vision_end_token_id", None)
    ids = input_ids.reshape(-1)
    if end_id is not None and end < ids.numel() and int(ids[end]) == int(end_id):
        end += 1
    return end


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
    image_end: int | None = None,
) -> Iterator[Steering]:
    """Steer `heads` of `model` to `target` (or along `schedule`) inside the block.

    `target` may be a `LiveTarget`, which another thread moves while the
    block runs (`live.retarget(...)`). `inputs` are the prompt's model inputs
    as `gaze.generation.prepare_inputs` returns them: they carry the image
    layout, so a caller never computes geometry. `panels` are the panel boxes
    when targets are panels. (A plain dict of inputs needs `layout=` instead;
    `prompt_len` overrides the length read at each prefill, and `image_end`
    the image prefix length that phase "after_image" leaves unsteered.)
    `tokenizer` is needed for `Schedule(at_sentence=True)`.

    The block yields the `Steering` hook: `target_at(t)` says which target
    (index into `hook.targets`) steered generated token t, `target_of(t)` the
    target itself (None: unsteered). Two `generate` calls in the block are
    steered alike (the schedule restarts at each prefill).
    """
    live = target if isinstance(target, LiveTarget) else None
    if (target is None) == (schedule is None):
        raise SteeringError("steer needs exactly one of `target` or `schedule`")
    if mode not in MODES:
        raise SteeringError(f"unknown steering mode {mode!r}; use one of {MODES}")
    if phase not in PHASES:
        raise SteeringError(f"unknown steering phase {phase!r}; use one of {PHASES}")
    try:
        strength = float(strength)
    except (TypeError, ValueError):
        raise SteeringError(f"strength {strength!r} is not a number") from None
    if layout is None:
        layout = getattr(inputs, "layout", None)
    if layout is None:
        raise SteeringError("steer needs the prompt's inputs from `gaze.generation.prepare_inputs` (or `layout=`)")
    if live is not None and phase == "prefill":
        raise SteeringError("a live target moves while the answer is written: steer it with phase 'all', 'decode' "
                            "or 'after_image'")
    if live is None:
        schedule = schedule or Schedule.static(target)
        if phase == "prefill" and len(schedule.targets) > 1:
            raise SteeringError("a schedule switches targets while the answer is written: steer it with phase 'all'")
    cfg = model.config.get_text_config()
    heads = check_heads(heads, cfg.num_hidden_layers, cfg.num_attention_heads)
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    memberships = [] if live is not None else [target_membership(t, layout, panels) for t in schedule.targets]
    if schedule is not None and schedule.at_sentence and tokenizer is None:
        raise SteeringError("switching at sentence boundaries needs the tokenizer")
    if image_end is None:
        ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
        image_end = image_prefix_len(model, ids, layout) if ids is not None else int(layout.positions[-1]) + 1
    prepare(model)
    hook = Steering(
        heads={l: torch.tensor(sorted(set(hs))) for l, hs in by_layer.items()},
        n_heads=cfg.num_attention_heads,
        memberships=memberships,
        schedule=schedule,
        layout=layout,
        prompt_len=prompt_len,
        strength=strength,
        mode=mode,
        phase=phase,
        is_boundary=sentence_boundary_fn(tokenizer) if tokenizer is not None else None,
        live=live,
        panels=panels,
        image_end=int(image_end),
    )
    if live is not None:
        hook.membership_of(live.target)  # the starting target is checked here, in the caller's thread
        live._bind(hook)
    try:
        with active(hook):
            yield hook
    finally:
        if live is not None:
            live._unbind(hook)
