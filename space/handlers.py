"""What the page's buttons do, as plain functions (no Gradio here): each wraps one `gaze` call.

    for frame in answer(ready, scene, question, Panel(3), Controls(k=4)):   # gaze.generation.generate
        frame.answer, frame.gaze, frame.status                              # tinted HTML, heat map, status line
    schedule = schedule_target("4,2,1,6,5,3", 8, scene)                     # gaze.steering.parse_schedule
    image, label = word_view(frame.record, 5)                               # the recorded attention, no model call

`answer` runs `generate` in a worker thread with an `on_token` callback: every
token arrives (a `gaze.generation.TokenEvent`) with the schedule target that
produced it and the tracked heads' attention over the image at that step, so the text is tinted
and the heat map moves while the model writes. The per-token attention (mean
of the tracked heads, float16) is kept in the final `Record`, which is what a
click on a word reads. Bad input raises `InputError` (a ValueError) with a
message meant for the page; `ui` turns it into `gr.Error`.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from PIL import Image

from gaze.generation import generate
from gaze.regions import ImageLayout, RegionError, RegionMap, box_regions, panel_regions, region_mass
from gaze.steering import MODES, PHASES, Box, Panel, Schedule, Target, parse_schedule
from gaze.strips import equal_panels
from space.render import (BOX_COLOUR, answer_html, heatmap_image, panel_colour, scene_image,
                          trajectory_image)
from space.scene import InputError, Scene
from space.state import Ready

MAX_NEW_TOKENS = 256  # per answer
MAX_SCHEDULE = 32  # schedule entries
MAX_EVERY = 256  # switch interval, tokens
MAX_QUESTION = 500  # characters
MAX_STRENGTH = 1e6
AREA_NAMES = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
AREA_COLOUR = "#BBBBBB"


@dataclass(frozen=True)
class Controls:
    """The steering controls of the page."""

    k: int = 4  # top-K gaze heads steered (and tracked)
    strength: float = 1e4  # bias B added before the softmax
    mode: str = "boost"  # gaze.steering.MODES
    max_new_tokens: int = 64
    phase: str | bool = "all"  # gaze.steering.PHASES; "prefill" (or True, the page's "steer the prompt only"
    # box): a panel or box biases the prompt's rows only, the answer then runs unsteered (a schedule, which
    # switches targets while the answer is written, always steers every row)


def check_controls(ready: Ready, c: Controls) -> Controls:
    """The controls, validated against the model; a readable error for each bad value."""
    total = ready.n_heads_total
    try:
        k, strength, n = int(c.k), float(c.strength), int(c.max_new_tokens)
    except (TypeError, ValueError):
        raise InputError("K, strength and max tokens must be numbers") from None
    if not 1 <= k <= total:
        raise InputError(f"K = {k}: choose 1 to {total} heads (this model has {total})")
    if not (math.isfinite(strength) and 0 <= strength <= MAX_STRENGTH):
        raise InputError(f"strength {c.strength}: choose a number from 0 to {MAX_STRENGTH:g}")
    if c.mode not in MODES:
        raise InputError(f"unknown mode {c.mode!r}; choose one of {', '.join(MODES)}")
    if not 1 <= n <= MAX_NEW_TOKENS:
        raise InputError(f"max new tokens = {n}: choose 1 to {MAX_NEW_TOKENS}")
    phase = c.phase
    if phase is None or isinstance(phase, bool):  # the page's "steer the prompt only" checkbox
        phase = "prefill" if phase else "all"
    if phase not in PHASES:
        raise InputError(f"unknown phase {c.phase!r}; choose one of {', '.join(PHASES)}")
    return Controls(k, strength, c.mode, n, phase)


def check_question(question: str) -> str:
    q = (question or "").strip()
    if not q:
        raise InputError("the question is empty: type one, or pick a preset")
    if len(q) > MAX_QUESTION:
        raise InputError(f"the question is {len(q)} characters long; keep it under {MAX_QUESTION}")
    return q


def schedule_target(text: str, every, scene: Scene) -> Schedule:
    """'4,2,1,6,5,3' + a switch interval -> a Schedule over this strip's panels (gaze.steering.parse_schedule)."""
    if not scene.is_strip:
        raise InputError("a schedule moves between panels: pick a strip, or use an upload as a strip of N panels")
    try:
        n = int(every)
    except (TypeError, ValueError):
        raise InputError(f"switch interval {every!r}: give a whole number of tokens") from None
    if not 1 <= n <= MAX_EVERY:
        raise InputError(f"switch interval {n}: choose 1 to {MAX_EVERY} tokens")
    try:
        return parse_schedule(text or "", every=n, n_panels=scene.n_panels, max_len=MAX_SCHEDULE)
    except ValueError as e:
        raise InputError(str(e)) from None


def panel_target(k: int, scene: Scene) -> Panel:
    if not scene.is_strip:
        raise InputError("this picture has no panels: click a point on it, or type a box")
    if not 1 <= k <= scene.n_panels:
        raise InputError(f"panel {k} does not exist: this strip has panels 1..{scene.n_panels}")
    return Panel(k)


# ---------------------------------------------------------------- streaming


_DONE = object()


@dataclass
class Record:
    """One finished answer, kept per session so that a click on a word needs no new generation."""

    image: Image.Image
    scale: int
    panels: tuple | None
    box: tuple | None
    layout: ImageLayout
    regions: RegionMap | None
    pieces: list[str]
    labels: list[str | None]  # what steered each token ("panel 3", "box") or None
    colours: list[str | None]
    attention: torch.Tensor  # [tokens, T] float16: mean of the tracked heads per token


@dataclass
class Frame:
    """One update of the page while (and after) an answer streams."""

    answer: str  # tinted HTML
    gaze: Image.Image | None  # heat map of the newest token
    status: str
    trajectory: Image.Image | None = None  # at the end only
    record: Record | None = None  # at the end only
    done: bool = False


def target_label(target: Target) -> tuple[str, str]:
    """(label, colour) of one schedule target."""
    if isinstance(target, Panel):
        return f"panel {target.k}", panel_colour(target.k)
    if isinstance(target, Box):
        return "box", BOX_COLOUR
    return "tokens", BOX_COLOUR


def describe(schedule: Schedule | None) -> str:
    if schedule is None:
        return "unsteered"
    names = [target_label(t)[0] for t in schedule.targets]
    if len(names) == 1:
        return f"steered to {names[0]}"
    order = ",".join(str(t.k) if isinstance(t, Panel) else "box" for t in schedule.targets)
    return f"schedule {order}, switching every {schedule.every} tokens"


def regions_of(scene: Scene, layout: ImageLayout, box=None) -> tuple[RegionMap | None, list[str]]:
    """Regions for the trajectory and word labels: a strip's panels; a picture's box and nine areas."""
    try:
        if scene.is_strip:
            regions = panel_regions(layout, scene.panels)
            return regions, [panel_colour(k) for k in range(1, regions.n_regions + 1)]
        boxes = list(equal_panels(scene.image.size, 9, rows=3))
        names = [f"{n} area" for n in AREA_NAMES]
        colours = [AREA_COLOUR] * 9
        if box is not None:
            boxes, names, colours = [box] + boxes, ["steered box"] + names, [BOX_COLOUR] + colours
        return box_regions(layout, boxes, names), colours
    except RegionError:
        return None, []  # too few tokens for nine areas: no trajectory, heat maps still work


def answer(ready: Ready, scene: Scene, question: str, target: Target | Schedule | None, controls: Controls,
           stop: threading.Event | None = None, refresh: float = 0.1) -> Iterator[Frame]:
    """Stream an answer (steered to `target`, along a schedule, or unsteered when None) as page frames.

    Tracks the top-K gaze heads in every case, so even the baseline shows
    where they look. Yields at most every `refresh` seconds, then a final
    frame with the trajectory and the `Record` for word clicks.
    """
    question = check_question(question)
    controls = check_controls(ready, controls)
    heads = ready.ranking.top(controls.k)
    schedule = None if target is None else target if isinstance(target, Schedule) else Schedule.static(target)
    phase = "all" if schedule is not None and len(schedule.targets) > 1 and controls.phase == "prefill" \
        else controls.phase  # a schedule switches while the answer is written: it steers every row
    box = next((t.box for t in (schedule.targets if schedule else ()) if isinstance(t, Box)), None)
    labels_of = [target_label(t) for t in schedule.targets] if schedule else []
    what = describe(schedule)
    stop = stop or threading.Event()
    events: queue.Queue = queue.Queue()
    outcome: dict = {}

    def work():
        try:
            outcome["result"] = generate(
                ready.loaded, scene.image, question, heads=heads if schedule else (), schedule=schedule,
                panels=scene.panels, strength=controls.strength, mode=controls.mode,
                phase=phase, max_new_tokens=controls.max_new_tokens, track=heads, on_token=events.put, stop=stop)
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread, which raises it
            outcome["error"] = e
        finally:
            events.put(_DONE)

    tok = ready.loaded.processor.tokenizer
    specials = set(tok.all_special_ids)
    pieces: list[str] = []
    labels: list[str | None] = []
    colours: list[str | None] = []
    attention: list[torch.Tensor] = []
    layout: ImageLayout | None = None  # the prompt's image layout, from the first token
    started = time.monotonic()
    worker = threading.Thread(target=work, name="gaze-generate", daemon=True)
    worker.start()
    try:
        yield Frame(answer_html([], [], [], streaming=True), None, f"{what}: reading the image...")
        last, done = 0.0, False
        while not done:
            items = [events.get()]
            while not events.empty():
                items.append(events.get_nowait())
            for item in items:
                if item is _DONE:
                    done = True
                    break
                if item.token_id in specials:
                    continue
                pieces.append(tok.decode([item.token_id]))
                label, colour = labels_of[item.target] if item.target is not None else (None, None)
                labels.append(label)
                colours.append(colour)
                attention.append(item.attention if item.attention is not None else torch.zeros(0))
                layout = item.layout
            if done or not pieces or time.monotonic() - last < refresh:
                continue
            last = time.monotonic()
            gaze = heatmap_image(scene.image, layout, attention[-1], scene.scale, scene.panels, box) \
                if attention[-1].numel() else None
            yield Frame(answer_html(pieces, colours, labels, streaming=True), gaze,
                        f"{what}: {len(pieces)} tokens, {time.monotonic() - started:.1f} s")
        worker.join()
        if "error" in outcome:
            raise outcome["error"]
        out = outcome["result"]
        n = len(pieces)
        layout = out.layout
        att = torch.stack(attention).to(torch.float16) if attention and all(a.numel() for a in attention) \
            else torch.zeros((n, layout.n_tokens), dtype=torch.float16)  # [tokens, T]
        regions, region_colours = regions_of(scene, layout, box)
        traj_image = None
        if regions is not None and n:
            traj = region_mass(att.float(), regions)  # [tokens, R]
            rows = None
            if schedule is not None:
                row_of = {name: i for i, name in enumerate(regions.names)}
                rows = [row_of.get(l if l != "box" else "steered box") for l in labels]
            traj_image = trajectory_image(traj, att.float().sum(-1), regions.names, region_colours, rows)
        record = Record(scene.image, scene.scale, scene.panels, box, layout, regions, pieces, labels, colours, att)
        status = f"{what}: {n} tokens in {time.monotonic() - started:.1f} s"
        if stop.is_set() and n < controls.max_new_tokens:
            status += " (stopped)"
        if out.degenerate and n:
            status += " (the answer repeats itself: try steering the prompt only, fewer heads or a lower strength)"
        gaze = heatmap_image(scene.image, layout, att[-1].float(), scene.scale, scene.panels, box) if n else None
        yield Frame(answer_html(pieces, colours, labels), gaze, status + ". Click a word to see where it looked.",
                    traj_image, record, done=True)
    finally:
        stop.set()  # a page that went away (or a new question) ends the worker at its next token
        worker.join(timeout=5)


# ---------------------------------------------------------------- inspection


def word_view(record: Record | None, i: int) -> tuple[Image.Image, str]:
    """The heat map of token `i` of the last answer over its image, and a label saying where it looked."""
    if record is None or not record.pieces:
        raise InputError("no answer yet: ask something first, then click a word of the answer")
    if not 0 <= i < len(record.pieces):
        raise InputError(f"token {i} is not in the answer (it has {len(record.pieces)} tokens)")
    weights = record.attention[i].float()  # [T]
    image = heatmap_image(record.image, record.layout, weights, record.scale, record.panels, record.box)
    word = record.pieces[i].strip() or repr(record.pieces[i])
    parts = [f'token {i + 1} "{word}"', record.labels[i] and f"steered to {record.labels[i]}" or "unsteered"]
    if record.regions is not None:
        mass = region_mass(weights, record.regions)  # [R]
        share = float(mass.max() / weights.sum().clamp_min(1e-12))
        parts.append(f"gaze on {record.regions.names[int(mass.argmax())]} ({share:.0%} of the heads' image attention)")
    return image, " · ".join(parts)


def scene_view(scene: Scene, highlight: int | None = None) -> Image.Image:
    return scene_image(scene, highlight)


def captions_markdown(scene: Scene) -> str:
    """What is really in each panel (ground truth), to judge the answers by."""
    if scene.captions:
        rows = [f"<span class='swatch' style='background:{panel_colour(k)}'></span> **{k}** {c}"
                + (f" (letter {scene.letters[k - 1]})" if scene.letters else "")
                for k, c in enumerate(scene.captions, start=1)]
        return f"**{scene.name}**, what each panel shows:<br>" + "<br>".join(rows)
    if scene.objects:
        objs = ", ".join(f"{label} at {tuple(box)}" for label, box in scene.objects)
        w, h = scene.image.size
        return f"**{scene.name}** ({w}x{h} px): {objs}. Click a point to steer there."
    kind = f"{scene.n_panels} equal panels" if scene.is_strip else "a picture: click a point or type a box to steer"
    return f"**{scene.name}** ({scene.image.size[0]}x{scene.image.size[1]} px), {kind}."


def model_markdown(ready: Ready, k: int | None = None) -> str:
    """The model in use and its ranking, for the page's header."""
    loaded, ranking = ready.loaded, ready.ranking
    model = loaded.model
    k = k or 8
    top = ", ".join(f"L{l}·H{h} {float(ranking.scores[l, h]):.2f}" for l, h in ranking.top(min(k, 8)))
    organism = " (the project's model organism: a tiny Qwen3-VL trained on procedural strips, not a pretrained VLM)" \
        if loaded.model_id == "organism" else ""
    return (f"**Model** `{loaded.model_id}`{organism}: {loaded.family.name}, {loaded.n_layers} layers x "
            f"{loaded.n_heads} heads, {model.device}, {str(model.dtype).replace('torch.', '')}.  \n"
            f"**Ranking** {ready.ranking_source}; {ranking.n_strips} strips. Top gaze heads (layer·head score): {top}.")

