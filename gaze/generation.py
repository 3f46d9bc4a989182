"""One call that asks, steers, tracks and judges its own output for degeneracy.

    out = generate(loaded, image, "What is the main action ...?", heads=ranking.top(8),
                   target=Panel(3), panels=strip.panels, track=True)
    out.text, out.targets, out.trajectory(regions), out.degenerate

With no heads (or strength 0) it is plain greedy generation, token for token.
Hard biases can make greedy decoding loop: `repetition_penalty` and
`no_repeat_ngram_size` are passed to `generate`, and every result carries its
repetition rate and a `degenerate` flag (empty, or mostly repeated 3-grams).

Live steering: pass a `gaze.steering.LiveTarget` as `target` and move it from
another thread (`live.retarget(Panel(5))`, or None); each token's event and
`Generation.steered_by` say which target steered it.

Fast first words: a `PrefixCache` keeps, per image, the KV cache of the
prompt's image prefix (system text and image tokens, up to and including the
vision end token), computed once and unsteered. `generate(...,
prefix_cache=cache)` then runs only the question's tokens (on a copy of that
cache, with the positions of the full prompt) and skips the vision tower:
the same tokens and logits as a full prefill (tested). A cached prefix is
unsteered, so it serves exactly the generations whose image rows are not
steered: unsteered ones, phase "decode", and phase "after_image" (which
steers the question's rows and the answer, i.e. everything after the image);
phases "all" and "prefill" steer the image rows too and run the full prefill.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from gaze.attention import _ACTIVE as _ACTIVE_RESET, active
from gaze.errors import GazeError
from gaze.families import QwenVL
from gaze.models import Loaded
from gaze.prompts import Inputs, chat_text
from gaze.ranking import Head
from gaze.regions import ImageLayout, RegionMap, panel_regions
from gaze.strips import equal_panels
from gaze.steering import (DEFAULT_STRENGTH, LiveTarget, Mode, Phase, Schedule, Steering, Target, check_heads,
                            image_prefix_len, steer)
from gaze.tracking import Tracker

DEGENERATE_REPETITION = 0.5  # above this share of repeated 3-grams an answer is degenerate


def repetition_rate(ids: Sequence[int], n: int = 3) -> float:
    """Share of n-grams that repeat an earlier n-gram (0 = none, -> 1 = a loop)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


class _Pace(StoppingCriteria):
    """Never stops: makes each decode step wait until `seconds` after the previous one (reading pace)."""

    def __init__(self, seconds: float):
        self.seconds, self._last = seconds, None

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        now = time.monotonic()
        if self._last is not None and now - self._last < self.seconds:
            time.sleep(self.seconds - (now - self._last))
        self._last = time.monotonic()
        return torch.zeros((input_ids.shape[0],), dtype=torch.bool, device=input_ids.device)


class _StopOnEvent(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token as it comes out of a running `generate` (see its `on_token`)."""

    index: int  # position in the answer, 0-based
    token_id: int
    target: int | None  # index into the schedule's targets of what steered it; None: produced unsteered
    attention: torch.Tensor | None  # [T] float32: the tracked heads' mean attention over the image tokens, or None
    layout: ImageLayout  # the prompt's image tokens: where each entry of `attention` lies in the image
    steered_by: Target | None = None  # the target itself (Panel, Box, Tokens); None: produced unsteered


class _TokenStreamer(BaseStreamer):
    """Calls `on_token` with each new token, its target and its attention, as `model.generate` produces it."""

    def __init__(self, on_token: Callable[[TokenEvent], None], layout: ImageLayout, steering: Steering | None,
                 tracker: Tracker | None, inner=None):
        self.on_token, self.layout, self.steering, self.tracker, self.inner = on_token, layout, steering, tracker, inner
        self._n = -1  # tokens seen; -1 until the prompt went by

    def put(self, value):
        if self.inner is not None:
            self.inner.put(value)
        if self._n < 0:  # `generate` hands the prompt over first
            self._n = 0
            return
        for token_id in value.reshape(-1).tolist():
            t = self._n
            target = self.steering.target_at(t) if self.steering is not None else None
            steered_by = self.steering.target_of(t) if self.steering is not None else None
            attention = self.tracker.at(t) if self.tracker is not None else None
            self.on_token(TokenEvent(t, int(token_id), target, None if attention is None else attention.mean(0),
                                     self.layout, steered_by))
            self._n += 1

    def end(self):
        if self.inner is not None:
            self.inner.end()


@dataclass
class Generation:
    """A generated answer, what steered it, and where the tracked heads looked."""

    text: str
    token_ids: list[int]  # generated tokens (no prompt, no end token)
    pieces: list[str]  # text of each generated token
    targets: list[int | None] | None  # index into the steering's targets in force for each token (None: none)
    layout: ImageLayout
    tracker: Tracker | None
    repetition: float
    degenerate: bool
    steered_by: list[Target | None] | None = None  # per token: the target in force (schedule or live), or None
    prefix_cached: bool = False  # the image prefix came from a PrefixCache (no vision tower, no image rows run)

    def trajectory(self, regions: RegionMap, normalise: bool = False) -> torch.Tensor:
        """[tokens, R] tracked heads' mass per region when producing each token."""
        if self.tracker is None:
            raise GazeError("generate(..., track=True) records the trajectory")
        return self.tracker.trajectory(regions, normalise)[: len(self.token_ids)]


def prepare_inputs(loaded: Loaded, image, question: str) -> tuple[Inputs, ImageLayout]:
    """Processor inputs for one image + question on the model's device (carrying their image layout), and the layout."""
    model = loaded.model
    enc = dict(loaded.processor(text=[chat_text(loaded.processor, question)], images=[image], return_tensors="pt"))
    enc = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in enc.items()}
    enc = {k: v.to(model.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in enc.items()}
    layout = loaded.family.layout(model, loaded.processor, enc, 0, image.size)
    return Inputs(enc, layout), layout


def image_key(image) -> str:
    """A digest of an image's pixels (mode, size and bytes): the same picture gives the same key."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


@dataclass
class ImagePrefix:
    """The prompt's image prefix of one image, run once: its KV cache, unsteered (never written to)."""

    length: int  # P: tokens up to and including the vision end token
    input_ids: torch.Tensor  # [1, P]: a prompt reuses the prefix only if it starts with exactly these
    cache: DynamicCache  # keys and values of the P tokens, every layer

    def fork(self) -> DynamicCache:
        """A private copy to generate on (generation appends to its cache)."""
        return copy.deepcopy(self.cache)


def cacheable(loaded: Loaded) -> bool:
    """Whether `PrefixCache` serves this model: the Qwen-VL families (their multimodal positions are passed
    explicitly); other families run the full prefill."""
    return isinstance(loaded.family, QwenVL)


def full_positions(loaded: Loaded, inputs: dict) -> torch.Tensor:
    """[4, 1, L] position ids of the whole prompt as a full forward sees them: text row, then the 3 mRoPE rows."""
    mrope = loaded.family.position_ids(loaded.model, inputs)  # [3, 1, L]
    text = torch.arange(mrope.shape[-1], device=mrope.device).view(1, 1, -1)
    return torch.cat([text, mrope], dim=0)


def _image_inputs(inputs: dict, n: int) -> dict:
    """The inputs cut to the first n tokens (per-token tensors); image tensors kept whole."""
    per_token = {k for k in inputs if k in ("input_ids", "attention_mask") or k.endswith("token_type_ids")}
    return {k: (v[:, :n] if k in per_token else v) for k, v in inputs.items()}


class PrefixCache:
    """Image prefixes kept for reuse (least recently used dropped beyond `max_entries`); thread-safe.

        cache = PrefixCache(max_entries=2)               # e.g. one per visitor
        generate(loaded, image, question, prefix_cache=cache)   # the first call runs and keeps the prefix
        generate(loaded, image, other_question, prefix_cache=cache)   # later ones start after it

    Keyed by model, the image's pixels and the prefix's tokens, so a new
    image (or a model or template whose prefix differs) is a miss, never a
    wrong hit. `hits` and `misses` count lookups.
    """

    def __init__(self, max_entries: int = 2):
        if max_entries < 1:
            raise GazeError(f"a prefix cache keeps at least 1 image, got {max_entries}")
        self.max_entries = int(max_entries)
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def nbytes(self) -> int:
        """Bytes held by the kept caches' keys and values."""
        total = 0
        with self._lock:
            entries = list(self._entries.values())
        for e in entries:
            for layer in e.cache.layers:
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                    if isinstance(t, torch.Tensor):
                        total += t.numel() * t.element_size()
        return total

    def get(self, loaded: Loaded, image, inputs: dict, layout: ImageLayout) -> ImagePrefix:
        """The image prefix of this prompt, from the cache or run now (unsteered) and kept."""
        p = image_prefix_len(loaded.model, inputs["input_ids"], layout)
        ids = inputs["input_ids"][:, :p]
        key = (id(loaded.model), image_key(image), tuple(ids.reshape(-1).tolist()))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
            self.misses += 1
        entry = compute_prefix(loaded, inputs, p)
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return entry


@torch.no_grad()
def compute_prefix(loaded: Loaded, inputs: dict, length: int) -> ImagePrefix:
    """Run the first `length` tokens of the prompt (vision tower included) with no hook, keep their KV cache."""
    model = loaded.model
    prefix = _image_inputs(inputs, length)
    prefix["position_ids"] = full_positions(loaded, inputs)[..., :length]
    cache = DynamicCache(config=model.config.get_text_config())
    token = _ACTIVE_RESET.set(())  # none of the calling thread's hooks: the prefix is unsteered and untracked
    try:
        model(**prefix, past_key_values=cache, use_cache=True, logits_to_keep=1)
    finally:
        _ACTIVE_RESET.reset(token)
    return ImagePrefix(length, inputs["input_ids"][:, :length].clone(), cache)


def _prefix_serves(steered: bool, strength: float, phase: str) -> bool:
    """Whether an unsteered image prefix gives exactly what this steering would: its image rows unsteered."""
    return not steered or float(strength) == 0 or phase in ("decode", "after_image")


@torch.no_grad()
def generate(
    loaded: Loaded,
    image,
    question: str,
    *,
    heads: Sequence[Head] = (),
    target=None,
    schedule: Schedule | None = None,
    panels: Sequence | None = None,
    strength: float = DEFAULT_STRENGTH,
    mode: Mode = "boost",
    phase: Phase = "all",
    max_new_tokens: int = 64,
    track: bool | Sequence[Head] = False,
    value_weighted: bool = False,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    streamer=None,
    on_token: Callable[[TokenEvent], None] | None = None,
    stop: threading.Event | None = None,
    prefix_cache: PrefixCache | None = None,
    pace: float | None = None,
) -> Generation:
    """Greedy generation, optionally steered (`heads` + `target`/`schedule`, at `phase`) and tracked.

    `target` may be a `LiveTarget` that another thread moves while the answer
    is written (it may start at None: unsteered until moved). `track=True`
    tracks the steered heads (or pass a list of heads to track).
    `on_token(event)` is called for each generated token while the answer is
    written (from the generating thread), with the target that steered it and
    the tracked heads' attention over the image at that step: what a live view
    needs (`TokenEvent`). `streamer` is any transformers streamer, passed
    through; `stop` ends the generation at its next token. `prefix_cache`
    reuses the image prefix where that is exact (see the module docstring);
    `pace` (seconds) makes each decode step wait until at least that long after
    the previous one (reading speed; a re-target still lands at the next step).
    """
    model, tok = loaded.model, loaded.processor.tokenizer
    heads = check_heads(heads, loaded.n_layers, loaded.n_heads)
    inputs, layout = prepare_inputs(loaded, image, question)
    prompt_len = int(inputs["input_ids"].shape[1])
    tracked = list(heads) if track is True else check_heads(track or [], loaded.n_layers, loaded.n_heads)
    tracker = Tracker(tracked, layout, value_weighted=value_weighted) if tracked else None
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    if repetition_penalty is not None:
        kwargs["repetition_penalty"] = repetition_penalty
    if no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = no_repeat_ngram_size
    criteria = []
    if stop is not None:
        criteria.append(_StopOnEvent(stop))
    if pace:
        criteria.append(_Pace(float(pace)))
    if criteria:
        kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
    steering = None
    steered = bool(heads) and (target is not None or schedule is not None)
    model_inputs: dict = inputs
    image_end = None
    cached = prefix_cache is not None and cacheable(loaded) and _prefix_serves(steered, strength, phase)
    if cached:
        prefix = prefix_cache.get(loaded, image, inputs, layout)
        image_end = prefix.length
        model_inputs = {k: v for k, v in inputs.items() if k not in ("pixel_values", "pixel_values_videos")}
        model_inputs["position_ids"] = full_positions(loaded, inputs)
        model_inputs["past_key_values"] = prefix.fork()
    with contextlib.ExitStack() as stack:
        if tracker is not None:
            stack.enter_context(active(tracker))
        if steered:
            steering = stack.enter_context(
                steer(model, heads, target, inputs=inputs, panels=panels, schedule=schedule, strength=strength,
                      mode=mode, phase=phase, tokenizer=tok, prompt_len=prompt_len, image_end=image_end)
            )
        if on_token is not None:
            kwargs["streamer"] = _TokenStreamer(on_token, layout, steering, tracker, inner=streamer)
        elif streamer is not None:
            kwargs["streamer"] = streamer
        out = model.generate(**model_inputs, **kwargs)
    ids = out[0, prompt_len:].tolist()
    specials = set(tok.all_special_ids)
    while ids and ids[-1] in specials:
        ids.pop()
    text = tok.decode(ids, skip_special_tokens=True)
    rate = repetition_rate(ids)
    targets = steered_by = None
    if steering is not None:
        targets = [None if steering.targets[i] is None else i for i in steering.applied[: len(ids)]]
        steered_by = [steering.target_of(t) for t in range(len(ids))]
    return Generation(
        text=text.strip(),
        token_ids=ids,
        pieces=[tok.decode([i]) for i in ids],
        targets=targets,
        layout=layout,
        tracker=tracker,
        repetition=rate,
        degenerate=not text.strip() or rate > DEGENERATE_REPETITION,
        steered_by=steered_by,
        prefix_cached=cached,
    )


def regions_for(layout: ImageLayout, panels: Sequence | None = None, n_panels: int = 6,
                mapping: str = "centre") -> RegionMap:
    """Panel regions from boxes (token membership by `mapping`, see `panel_regions`), or `n_panels` equal
    panels when no boxes are known."""
    if panels is None:
        panels = equal_panels(layout.image_size, n_panels)
    return panel_regions(layout, panels, mapping)


def proportional_panels(loaded, strip) -> tuple:
    """`strip`'s panels as the official code's proportional column split of this model's token grid: pixel
    boxes whose cell-centre membership is that split (`gaze.regions.proportional_boxes`; one row of panels)."""
    from gaze.regions import proportional_boxes

    _, layout = prepare_inputs(loaded, strip.image, "")
    return proportional_boxes(layout, strip.panels)
