"""One call that asks, steers, tracks and judges its own output for degeneracy.

    out = generate(loaded, image, "What is the main action ...?", heads=ranking.top(8),
                   target=Panel(3), panels=strip.panels, track=True)
    out.text, out.targets, out.trajectory(regions), out.degenerate

With no heads (or strength 0) it is plain greedy generation, token for token.
Hard biases can make greedy decoding loop: `repetition_penalty` and
`no_repeat_ngram_size` are passed to `generate`, and every result carries its
repetition rate and a `degenerate` flag (empty, or mostly repeated 3-grams).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from gaze.attention import active
from gaze.errors import GazeError
from gaze.models import Loaded
from gaze.prompts import Inputs, chat_text
from gaze.ranking import Head
from gaze.regions import ImageLayout, RegionMap, equal_panel_regions, panel_regions
from gaze.steering import DEFAULT_STRENGTH, Mode, Phase, Schedule, Steering, steer
from gaze.tracking import Tracker

DEGENERATE_REPETITION = 0.5  # above this share of repeated 3-grams an answer is degenerate


def repetition_rate(ids: Sequence[int], n: int = 3) -> float:
    """Share of n-grams that repeat an earlier n-gram (0 = none, -> 1 = a loop)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


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
            attention = self.tracker.at(t) if self.tracker is not None else None
            self.on_token(TokenEvent(t, int(token_id), target, None if attention is None else attention.mean(0),
                                     self.layout))
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
    targets: list[int] | None  # schedule target index in force when each token was produced
    layout: ImageLayout
    tracker: Tracker | None
    repetition: float
    degenerate: bool

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
) -> Generation:
    """Greedy generation, optionally steered (`heads` + `target`/`schedule`, at `phase`) and tracked.

    `track=True` tracks the steered heads (or pass a list of heads to track).
    `on_token(event)` is called for each generated token while the answer is
    written (from the generating thread), with the schedule target that
    steered it and the tracked heads' attention over the image at that step:
    what a live view needs (`TokenEvent`). `streamer` is any transformers
    streamer, passed through; `stop` ends the generation at its next token.
    """
    model, tok = loaded.model, loaded.processor.tokenizer
    inputs, layout = prepare_inputs(loaded, image, question)
    prompt_len = int(inputs["input_ids"].shape[1])
    tracked = list(heads) if track is True else list(track or [])
    tracker = Tracker(tracked, layout, value_weighted=value_weighted) if tracked else None
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    if repetition_penalty is not None:
        kwargs["repetition_penalty"] = repetition_penalty
    if no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = no_repeat_ngram_size
    if stop is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnEvent(stop)])
    steering = None
    steered = bool(heads) and (target is not None or schedule is not None)
    with contextlib.ExitStack() as stack:
        if tracker is not None:
            stack.enter_context(active(tracker))
        if steered:
            steering = stack.enter_context(
                steer(model, heads, target, inputs=inputs, panels=panels, schedule=schedule, strength=strength,
                      mode=mode, phase=phase, tokenizer=tok)
            )
        if on_token is not None:
            kwargs["streamer"] = _TokenStreamer(on_token, layout, steering, tracker, inner=streamer)
        elif streamer is not None:
            kwargs["streamer"] = streamer
        out = model.generate(**inputs, **kwargs)
    ids = out[0, prompt_len:].tolist()
    specials = set(tok.all_special_ids)
    while ids and ids[-1] in specials:
        ids.pop()
    text = tok.decode(ids, skip_special_tokens=True)
    rate = repetition_rate(ids)
    return Generation(
        text=text.strip(),
        token_ids=ids,
        pieces=[tok.decode([i]) for i in ids],
        targets=steering.applied[: len(ids)] if steering is not None else None,
        layout=layout,
        tracker=tracker,
        repetition=rate,
        degenerate=not text.strip() or rate > DEGENERATE_REPETITION,
    )


def regions_for(layout: ImageLayout, panels: Sequence | None = None, n_panels: int = 6) -> RegionMap:
    """Panel regions from boxes, or `n_panels` equal panels when no boxes are known."""
    return panel_regions(layout, panels) if panels is not None else equal_panel_regions(layout, n_panels)
