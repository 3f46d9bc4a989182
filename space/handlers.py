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

Hover: `answer(..., target=LiveTarget(...))` streams an answer whose target
the page moves while it is written (`retarget`, from the spotlight's
position: `hover_target`); each span is tinted by the target that steered
it. Every answer goes through the visitor's `PrefixCache`: the image's
prompt prefix is computed once per image and reused by every click, hover
and question on it. To make that exact, the page's default (steer every row)
steers every row after the image (phase "after_image"): the image tokens'
own rows are read once, unsteered, as the paper's own demo does; on the
bundled organism the answers are the same as steering the image rows too.
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

from gaze.generation import PrefixCache, generate
from gaze.regions import ImageLayout, RegionError, RegionMap, box_regions, panel_regions, region_mass
from gaze.steering import MODES, PHASES, Box, LiveTarget, Panel, Schedule, Target, parse_schedule
from gaze.strips import equal_panels
from space.render import (BOX_COLOUR, answer_html, heatmap_image, panel_colour, scene_image,
                          trajectory_image)
from space.scene import InputError, Scene, panel_at
from space.state import Ready

MAX_NEW_TOKENS = 256  # per answer
MAX_SCHEDULE = 32  # schedule entries
MAX_EVERY = 256  # switch interval, tokens
MAX_QUESTION = 500  # characters
MAX_STRENGTH = 1e6
AREA_NAMES = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
AREA_COLOUR = "#BBBBBB"
MAX_PACE_MS = 2000  # ms per token at most
ROWS_PHASE = "after_image"  # what the page's default "steer every row" runs: every row after the (cached) image


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
    pace_ms: float = 0  # ms per token at least (reading pace); 0: as fast as the model goes


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
    try:
        pace = float(c.pace_ms or 0)
    except (TypeError, ValueError):
        raise InputError(f"pace {c.pace_ms!r}: give milliseconds per token") from None
    if not (math.isfinite(pace) and 0 <= pace <= MAX_PACE_MS):
        raise InputError(f"pace {c.pace_ms} ms per token: choose 0 to {MAX_PACE_MS}")
    return Controls(k, strength, c.mode, n, phase, pace)


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


def target_label(target: Target, scene: Scene | None = None, spotlight: bool = False) -> tuple[str, str]:
    """(label, colour) of one target. A spotlight's box on a strip is named and tinted after the panel under
    its centre ("spotlight on panel 2"), as the visitor sees it."""
    if isinstance(target, Panel):
        return f"panel {target.k}", panel_colour(target.k)
    if isinstance(target, Box):
        if spotlight:
            k = _panel_under(scene, target.box) if scene is not None and scene.is_strip else None
            return (f"spotlight on panel {k}", panel_colour(k)) if k else ("spotlight", BOX_COLOUR)
        return "box", BOX_COLOUR
    return "tokens", BOX_COLOUR


def _panel_under(scene: Scene, box) -> int | None:
    """The panel containing the centre of `box`, else the nearest one (the centre fell in a gap)."""
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    k = panel_at(scene.panels, x, y)
    if k is None:
        k = 1 + min(range(scene.n_panels), key=lambda i: abs((scene.panels[i][0] + scene.panels[i][2]) / 2 - x)
                    + abs((scene.panels[i][1] + scene.panels[i][3]) / 2 - y))
    return k


def describe(schedule: Schedule | None, live: bool = False) -> str:
    if live:
        return "following the spotlight"
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


def _region_name(label: str | None) -> str | None:
    """The trajectory row a token's label steered: 'panel 3', 'steered box'; None for a moving spotlight on a
    picture (its box changes) or unsteered."""
    if label is None:
        return None
    if label.startswith("spotlight on "):
        return label[len("spotlight on "):]
    return {"box": "steered box", "spotlight": None}.get(label, label)


def answer(ready: Ready, scene: Scene, question: str, target: Target | Schedule | LiveTarget | None,
           controls: Controls, stop: threading.Event | None = None, refresh: float = 0.1, *,
           prefix_cache: PrefixCache | None = None) -> Iterator[Frame]:
    """Stream an answer (steered to `target`, along a schedule, following a `LiveTarget` that the page moves,
    or unsteered when None) as page frames.

    Tracks the top-K gaze heads in every case, so even the baseline shows
    where they look. Strength 0 is exactly the baseline, and is shown as
    such. Yields at most every `refresh` seconds, then a final frame with the
    trajectory and the `Record` for word clicks. `prefix_cache` (the visitor's)
    serves the image prefix once per image.
    """
    question = check_question(question)
    controls = check_controls(ready, controls)
    heads = ready.ranking.top(controls.k)
    live = target if isinstance(target, LiveTarget) else None
    if controls.strength == 0 and live is None:
        target = None  # strength 0 adds nothing: it is the baseline, labelled and tinted as such
    tint = controls.strength > 0
    schedule = None if target is None or live is not None else target if isinstance(target, Schedule) \
        else Schedule.static(target)
    moving = live is not None or (schedule is not None and len(schedule.targets) > 1)
    phase = controls.phase
    if phase == "all" or (moving and phase == "prefill"):
        phase = ROWS_PHASE  # a schedule or a spotlight moves while the answer is written: it steers every row
    box = next((t.box for t in (schedule.targets if schedule else ()) if isinstance(t, Box)), None)
    what = describe(schedule, live=live is not None)
    if not tint:
        what = "unsteered (strength 0)"
    label_memo: dict = {}

    def label_of(t: Target | None) -> tuple[str | None, str | None]:
        if t is None or not tint:
            return None, None
        if t not in label_memo:
            label_memo[t] = target_label(t, scene, spotlight=live is not None)
        return label_memo[t]

    stop = stop or threading.Event()
    events: queue.Queue = queue.Queue()
    outcome: dict = {}
    steer_to = live if live is not None else None

    def work():
        try:
            outcome["result"] = generate(
                ready.loaded, scene.image, question, heads=heads if (schedule or live) else (),
                target=steer_to, schedule=schedule, panels=scene.panels, strength=controls.strength,
                mode=controls.mode, phase=phase, max_new_tokens=controls.max_new_tokens, track=heads,
                on_token=events.put, stop=stop, prefix_cache=prefix_cache,
                pace=controls.pace_ms / 1000 if controls.pace_ms else None)
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread, which raises it
            outcome["error"] = e
        finally:
            events.put(_DONE)

    tok = ready.loaded.processor.tokenizer
    specials = set(tok.all_special_ids)
    pieces: list[str] = []
    labels: list[str | None] = []
    colours: list[str | None] = []
    boxes: list = []  # the box that steered each token (moving spotlight), or None
    attention: list[torch.Tensor] = []
    layout: ImageLayout | None = None  # the prompt's image layout, from the first token
    started = time.monotonic()
    first_token: float | None = None
    worker = threading.Thread(target=work, name="gaze-generate", daemon=True)
    worker.start()

    def now_box():
        return box if live is None else next((b for b in reversed(boxes) if b is not None), None)

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
                if first_token is None:
                    first_token = time.monotonic() - started
                pieces.append(tok.decode([item.token_id]))
                label, colour = label_of(item.steered_by)
                labels.append(label)
                colours.append(colour)
                boxes.append(item.steered_by.box if isinstance(item.steered_by, Box) and tint else None)
                attention.append(item.attention if item.attention is not None else torch.zeros(0))
                layout = item.layout
            if done or not pieces or time.monotonic() - last < refresh:
                continue
            last = time.monotonic()
            gaze = heatmap_image(scene.image, layout, attention[-1], scene.scale, scene.panels, now_box()) \
                if attention[-1].numel() else None
            now = f" (now: {labels[-1] or 'unsteered'})" if live is not None else ""
            yield Frame(answer_html(pieces, colours, labels, streaming=True), gaze,
                        f"{what}{now}: {len(pieces)} tokens, {time.monotonic() - started:.1f} s")
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
            if any(l is not None for l in labels):
                row_of = {name: i for i, name in enumerate(regions.names)}
                rows = [row_of.get(_region_name(l)) for l in labels]
            traj_image = trajectory_image(traj, att.float().sum(-1), regions.names, region_colours, rows)
        record = Record(scene.image, scene.scale, scene.panels, now_box(), layout, regions, pieces, labels, colours,
                        att)
        status = f"{what}: {n} tokens in {time.monotonic() - started:.1f} s"
        if first_token is not None:
            status += f", first word after {first_token * 1000:.0f} ms" + (" (image cached)" if out.prefix_cached
                                                                             else "")
        if stop.is_set() and n < controls.max_new_tokens:
            status += " (stopped)"
        if out.degenerate and n:
            status += " (the answer repeats itself: try steering the prompt only, fewer heads or a lower strength)"
        gaze = heatmap_image(scene.image, layout, att[-1].float(), scene.scale, scene.panels, now_box()) if n else None
        yield Frame(answer_html(pieces, colours, labels), gaze, status + ". Click a word to see where it looked.",
                    traj_image, record, done=True)
    finally:
        stop.set()  # a page that went away (or a new question) ends the worker at its next token
        worker.join(timeout=5)


# ---------------------------------------------------------------- hover


def hover_target(scene: Scene, x: float, y: float, radius: float, snap: bool) -> Target:
    """Where a spotlight of `radius` image px centred on image pixel (x, y) steers: the bounding box of the
    circle (inside the image), or with `snap` on a strip the panel under its centre (the nearest panel when
    the centre is in a gap)."""
    w, h = scene.image.size
    try:
        x, y, radius = float(x), float(y), float(radius)
    except (TypeError, ValueError):
        raise InputError("the spotlight position must be numbers") from None
    if not all(math.isfinite(v) for v in (x, y, radius)):
        raise InputError("the spotlight position must be finite numbers")
    x, y = min(max(x, 0.0), w - 1e-3), min(max(y, 0.0), h - 1e-3)
    if snap and scene.is_strip:
        return Panel(_panel_under(scene, (x, y, x, y)))
    r = max(radius, 1.0)
    return Box((max(0.0, x - r), max(0.0, y - r), min(float(w), x + r), min(float(h), y + r)))


def retarget(live: LiveTarget | None, scene: Scene, x, y, radius, snap: bool) -> str:
    """Move a running hover answer's spotlight (gaze.steering.LiveTarget.retarget); a line saying where it steers.

    A spotlight box over no token centre (too small) keeps the previous target."""
    target = hover_target(scene, x, y, radius, snap)
    if live is None:
        return ""
    try:
        live.retarget(target)
    except RegionError:
        return "the spotlight is too small to cover an image token: scroll up to widen it"
    return target_label(target, scene, spotlight=True)[0]


def reading_note(ready: Ready, scene: Scene) -> str:
    """How the model reads this image: its token grid and tokens per panel (no model run), with a warning when a
    panel gets less than one token (the model cannot tell it apart)."""
    from gaze.generation import prepare_inputs

    try:
        _, layout = prepare_inputs(ready.loaded, scene.image, "?")
    except Exception:  # noqa: BLE001 - the note is optional; a failing image errors when asked about
        return ""
    w, h = scene.image.size
    grid = f"a {layout.grid[1]}x{layout.grid[0]} grid" if layout.grid else "a layout"
    text = f"The model reads this {w}x{h} px image as {grid} of {layout.n_tokens} image tokens"
    if not scene.is_strip:
        return text + "."
    try:
        regions = panel_regions(layout, scene.panels)
        counts = [len(regions.token_indices(i)) for i in range(regions.n_regions)]
    except RegionError:
        counts = [int(target_membership_count(layout, p)) for p in scene.panels]
    per = sorted(set(counts))
    text += (f": {scene.n_panels} panels of {', '.join(str(c) for c in per)} token{'s' if per != [1] else ''} each"
             if len(per) == 1 else f": {scene.n_panels} panels, tokens per panel {', '.join(map(str, counts))}")
    low = [k for k, c in enumerate(counts, start=1) if c < 1]
    if low:
        text += (f". **Warning:** panel{'s' if len(low) > 1 else ''} {', '.join(map(str, low))} "
                 f"{'get' if len(low) > 1 else 'gets'} less than one image token: the model cannot tell "
                 "such a panel apart, so answers about it (and steering to it) are not meaningful; use fewer panels "
                 "or a wider image")
    return text + "."


def target_membership_count(layout: ImageLayout, box) -> int:
    from gaze.regions import box_membership

    try:
        return int(box_membership(layout, box).sum())
    except RegionError:
        return 0


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
    top = ", ".join(f"L{l}·H{h} {float(ranking.scores[l, h]):.3g}" for l, h in ranking.top(min(k, 8)))
    organism = " (the project's model organism: a tiny Qwen3-VL trained on procedural strips, not a pretrained VLM)" \
        if loaded.model_id == "organism" else ""
    return (f"**Model** `{loaded.model_id}`{organism}: {loaded.family.name}, {loaded.n_layers} layers x "
            f"{loaded.n_heads} heads, {model.device}, {str(model.dtype).replace('torch.', '')}.  \n"
            f"**Ranking** {ready.ranking_source}; {ranking.n_strips} strips. Top gaze heads (layer·head score): {top}.")



def presets_for(model: str) -> dict[str, str]:
    """The question presets: the model folder's own `prompts.json` when it has one (an organism trained on its
    own prompts), else the paper's (`gaze.prompts.PRESETS`).

    `prompts.json` may map names to questions ({"narrate": "..."}), hold them under "presets" or "prompts", or
    list them (strings, or {"name": ..., "text"/"prompt"/"question": ...}); templates with {ordinal} / {k} are
    filled for panel 1 (the panel buttons ask the current question as it is)."""
    import json
    from pathlib import Path

    from gaze.models import resolve
    from gaze.prompts import PRESETS, panel_question

    path = Path(resolve(model)) / "prompts.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return dict(PRESETS)
    if isinstance(data, dict):
        data = data.get("presets", data.get("prompts", data))
    out: dict[str, str] = {}
    items = data.items() if isinstance(data, dict) else enumerate(data if isinstance(data, list) else [])
    for name, value in items:
        if isinstance(value, dict):
            name = value.get("name", name)
            value = value.get("text") or value.get("prompt") or value.get("question")
        if isinstance(value, str) and value.strip():
            try:
                text = panel_question(1, value) if "{" in value else value
            except (KeyError, IndexError, ValueError):
                continue
            out[str(name) if not isinstance(name, int) else text[:40]] = text
    return out or dict(PRESETS)
