"""The page: layout and wiring only. What each button does lives in `handlers` (plain functions).

    demo = build_demo(Settings.from_env())      # nothing loads until the first visitor asks
    demo.queue(default_concurrency_limit=2).launch(css=CSS)

Every widget a test (or a visitor's script) needs has an `elem_id`:
strip, panel-1..panel-6, baseline, stop, question, preset, answer, status,
gaze-map, gaze-label, trajectory, schedule, every, run-schedule, top-k,
strength, mode, max-tokens, prefill-only, example, upload, upload-as, n-panels,
box-size, box, steer-box, model-info, hover (the spotlight's bridge), hover-on,
hover-snap, hover-radius, pace, hover-now, reading.
"""

from __future__ import annotations

import functools
import inspect
import logging

import gradio as gr

from gaze.prompts import PRESETS, STRIP_QUESTION
from gaze.steering import MODES, Box, LiveTarget
from space import handlers as h
from space.render import PANEL_COLOURS, answer_html, legend_html
from space.limits import MAX_UPLOAD_PIXELS
from space.scene import (MAX_PANELS, Scene, example_names, live_scene, load_example, parse_box, point_target,
                         scene_from_upload)
from space.state import LiveAnswers, ModelHolder, SessionPrefixes, Settings, StopSwitches, default_k, on_gpu
from space.widgets import ImageUpload, Number, Slider

log = logging.getLogger("gaze.space")

TITLE = "Gaze heads: point at the image, watch the model's gaze move"
INTRO = (
    "A few attention heads of a vision-language model look at the part of the image the model is talking about. "
    "**Hover over the image**: a spotlight follows the pointer (or your finger) and the model writes about what "
    "is under it; move it mid-sentence and the very next word follows; scroll to resize it; move off to stop. "
    "Or click a **panel button** (or a point of the image) to steer one whole answer there; "
    "**Generate without steering** for the baseline; run a **schedule** to move the gaze along panels. Every span "
    "of the answer is tinted with the colour of what steered it. The heat map shows where the gaze heads "
    "look at each token; after an answer, click any word to see where it was looking."
)
MODE_INFO = ("boost: the target's image tokens +B, the rest of the image -B (the paper's default) · "
             "suppress: the rest of the image -B, the target left as it is · "
             "suppress_text: as suppress, and the prompt's text -B too, so the heads can only look at the target")
HOVER_HINT = ("<div class='hover-hint'>Spotlight: hover the image to steer (its bounding box is the target), "
              "scroll to resize, move off to stop.</div>")
UPLOAD_AS = ("strip of equal panels", "picture (steer to boxes)")

# A click on a token of the answer becomes a `click` event carrying its index (read as evt.i).
ANSWER_JS = """
element.addEventListener('click', (e) => {
  const tok = e.target.closest('.tok');
  if (tok) { trigger('click', {i: Number(tok.dataset.i)}); }
});
"""

CSS = "\n".join(
    [f"#panel-{k} {{ border: 3px solid {c} !important; box-shadow: inset 0 -5px 0 {c} !important; }}"
     for k, c in enumerate(PANEL_COLOURS, start=1)]
    + [
        ".answer-text { white-space: pre-wrap; overflow-wrap: anywhere; font-size: 1.05rem; line-height: 1.9; "
        "min-height: 3.5em; "
        "padding: 8px; border: 1px solid var(--border-color-primary); border-radius: 6px; }",
        ".answer-text .tok { cursor: pointer; border-radius: 3px; }",
        ".answer-text .tok:hover { outline: 2px solid #888; }",
        ".answer-text .caret { opacity: 0.5; }",
        ".swatch { display: inline-block; width: 0.9em; height: 0.9em; border-radius: 2px; margin: 0 3px -1px 6px; }",
        "#stop { max-width: 8em; }",
        ".gaze-spot { position: absolute; display: none; pointer-events: none; border-radius: 50%; z-index: 5; "
        "border: 2px solid rgba(255, 255, 255, 0.95); box-shadow: 0 0 0 4000px rgba(0, 0, 0, 0.35); }",
        "#strip img { cursor: crosshair; touch-action: none; }",
        ".hover-hint { font-size: 0.9rem; opacity: 0.8; }",
        ".gaze-error { color: #c0392b; font-weight: 600; }",
    ]
)

# The spotlight (mouse, wheel and touch on the image) and its three events; see `build_demo`.
HOVER_JS = """
// The spotlight: follows the pointer (mouse or finger) over the image (#strip); its box is the steering target.
// Entering starts an answer (after a short hover), moving re-steers it at the next token, the wheel (or the
// radius slider) sizes it, leaving stops the answer after a short grace. Events: 'hover_start', 'hover_move',
// 'hover_leave', each with {x, y, r, snap} in pixels of the displayed image.
const S = {started: false, armed: true, startTimer: null, leaveTimer: null, moveTimer: null, lastMove: 0,
           payload: null, spot: null, pct: null};
const root = () => document.getElementById('strip');
const picture = () => { const r = root(); return r ? r.querySelector('img') : null; };
const checked = (id, dflt) => { const e = document.querySelector('#' + id + ' input'); return e ? e.checked : dflt; };
const radiusInputs = () => Array.from(document.querySelectorAll('#hover-radius input'));
function pct() {
  if (S.pct === null) { const e = radiusInputs()[0]; S.pct = e ? Number(e.value) || 50 : 50; }
  return S.pct;
}
function setPct(p) {
  S.pct = Math.max(5, Math.min(100, Math.round(p)));
  for (const e of radiusInputs()) { e.value = S.pct; e.dispatchEvent(new Event('input', {bubbles: true})); }
}
function spotEl(img) {
  const host = img.parentElement;
  if (!S.spot || S.spot.parentElement !== host) {
    if (S.spot) S.spot.remove();
    S.spot = document.createElement('div');
    S.spot.className = 'gaze-spot';
    if (getComputedStyle(host).position === 'static') host.style.position = 'relative';
    host.style.overflow = 'hidden';
    host.appendChild(S.spot);
  }
  return S.spot;
}
function inside(img, cx, cy) {
  const b = img.getBoundingClientRect();
  return cx >= b.left && cx < b.right && cy >= b.top && cy < b.bottom;
}
function place(img, cx, cy) {
  const b = img.getBoundingClientRect(), host = img.parentElement.getBoundingClientRect();
  const sx = img.naturalWidth / b.width;
  const r = pct() / 100 * img.naturalHeight;  // in displayed-image pixels
  const rs = r / sx;  // on screen
  const spot = spotEl(img);
  spot.style.display = 'block';
  spot.style.width = spot.style.height = (2 * rs) + 'px';
  spot.style.left = (cx - host.left - rs) + 'px';
  spot.style.top = (cy - host.top - rs) + 'px';
  S.payload = {x: (cx - b.left) * sx, y: (cy - b.top) * (img.naturalHeight / b.height), r: r,
               snap: checked('hover-snap', false)};
  element.dataset.x = S.payload.x.toFixed(1);
  element.dataset.y = S.payload.y.toFixed(1);
}
function sendMove() {
  S.moveTimer = null;
  S.lastMove = performance.now();
  if (S.started && S.payload) trigger('hover_move', S.payload);
}
function moved(cx, cy, immediate) {
  const img = picture();
  if (!img || !checked('hover-on', true)) return;
  if (!inside(img, cx, cy)) { left(); return; }
  place(img, cx, cy);
  if (S.leaveTimer) { clearTimeout(S.leaveTimer); S.leaveTimer = null; }
  if (!S.started && S.armed && !S.startTimer) {
    S.startTimer = setTimeout(() => {
      S.startTimer = null;
      if (S.armed && S.payload) { S.started = true; S.armed = false; element.dataset.state = 'started';
                                  trigger('hover_start', S.payload); }
    }, immediate ? 0 : 150);
  } else if (S.started && !S.moveTimer) {
    const wait = Math.max(0, 50 - (performance.now() - S.lastMove));  // at most 20 moves a second
    S.moveTimer = setTimeout(sendMove, wait);
  }
}
function left() {
  if (S.spot) S.spot.style.display = 'none';
  if (S.startTimer) { clearTimeout(S.startTimer); S.startTimer = null; }
  if (S.started && !S.leaveTimer) {
    S.leaveTimer = setTimeout(() => {  // a grace: brushing past the edge does not end the answer
      S.leaveTimer = null; S.started = false; S.armed = true; element.dataset.state = 'left';
      trigger('hover_leave', {});
    }, 400);
  } else if (!S.started) { S.armed = true; }
}
document.addEventListener('mousemove', (e) => {
  const img = picture();
  if (img && inside(img, e.clientX, e.clientY)) moved(e.clientX, e.clientY, false);
  else if (S.payload && (S.started || S.startTimer || (S.spot && S.spot.style.display === 'block'))) left();
});
document.addEventListener('mousedown', (e) => {  // a click on the image steers by itself: no hover answer
  const img = picture();
  if (img && inside(img, e.clientX, e.clientY)) {
    if (S.startTimer) { clearTimeout(S.startTimer); S.startTimer = null; }
    S.armed = false;
  }
}, true);
document.addEventListener('wheel', (e) => {
  const img = picture();
  if (!img || !inside(img, e.clientX, e.clientY) || !checked('hover-on', true)) return;
  e.preventDefault();
  setPct(pct() + (e.deltaY < 0 ? 5 : -5));
  moved(e.clientX, e.clientY, false);
}, {passive: false});
document.addEventListener('input', (e) => {  // the radius slider moved by hand
  if (e.target.closest && e.target.closest('#hover-radius') && e.isTrusted) S.pct = Number(e.target.value) || S.pct;
}, true);
const touch = (e) => e.touches && e.touches.length ? e.touches[0] : null;
document.addEventListener('touchstart', (e) => {
  const t = touch(e), img = picture();
  if (t && img && inside(img, t.clientX, t.clientY) && checked('hover-on', true)) { S.armed = true;
    moved(t.clientX, t.clientY, true); }
}, {passive: true});
document.addEventListener('touchmove', (e) => {
  const t = touch(e), img = picture();
  if (t && img && (S.started || S.startTimer) && checked('hover-on', true)) {
    e.preventDefault();  // dragging over the image steers instead of scrolling
    moved(t.clientX, t.clientY, false);
  }
}, {passive: false});
document.addEventListener('touchend', () => { if (S.started || S.startTimer) left(); }, {passive: true});
document.addEventListener('touchcancel', () => { if (S.started || S.startTimer) left(); }, {passive: true});
"""


TOAST_S = 6  # s an error toast stays: they leave by themselves instead of piling up


def error_line(e: BaseException, where: str = "handler") -> str:
    """The one line a visitor sees for an error: the input's fault as is; ours short (and logged)."""
    if isinstance(e, gr.Error):
        return str(e.message if hasattr(e, "message") else e)
    if isinstance(e, (ValueError, FileNotFoundError, ImportError)):  # InputError, RegionError, RankingError ...
        return str(e)
    log.exception("%s failed", where)
    return f"something went wrong on the server ({type(e).__name__}); try again or reload the page"


def readable(fn):
    """Errors become `gr.Error` messages in the page (the input's fault: as is; ours: a short line, logged)."""

    def convert(e: BaseException) -> gr.Error:
        if isinstance(e, gr.Error):
            return e
        return gr.Error(error_line(e, fn.__name__), print_exception=False, duration=TOAST_S)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                raise convert(e) from None
        return gen

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise convert(e) from None
    return call


def build_demo(settings: Settings | None = None) -> gr.Blocks:
    """The whole page. The model is not loaded here: the holder loads it on first use."""
    settings = settings or Settings.from_env()
    holder = ModelHolder(settings)
    switches = StopSwitches()
    prefixes = SessionPrefixes()  # each visitor's images' prompt prefixes: the first word comes fast
    hovers = LiveAnswers()  # each visitor's running hover answer (its moving target)
    first = load_example(example_names()[0])

    ttl = settings.session_ttl
    # Uploaded files and rendered images in Gradio's cache are deleted once older than a session lives.
    with gr.Blocks(title="Gaze heads", delete_cache=(max(60, int(ttl) // 4), max(60, int(ttl)))) as demo:
        demo.holder = holder  # app.py preloads through it when asked (GAZE_PRELOAD=1)
        demo.settings = settings
        # Per-visitor state, dropped `ttl` s after its last change (and, beyond `max_sessions` visitors, least
        # recently used first: `launch_options`). The scene starts empty and is set when the page loads, so a
        # dropped one is a readable "session expired" (`live_scene`) rather than a silent switch to the example.
        scene_state = gr.State(None, time_to_live=ttl)
        record_state = gr.State(None, time_to_live=ttl)

        gr.Markdown(f"# {TITLE}\n{INTRO}")
        model_info = gr.Markdown("*The model loads on first use...*", elem_id="model-info")
        with gr.Row():
            with gr.Column(scale=3):
                # no floating labels over the images: they covered panel 1 (and the trajectory's title)
                gr.Markdown("**The image**: hover to steer with the spotlight, or click a point", elem_id="strip-title")
                strip = gr.Image(h.scene_view(first), label="The image", show_label=False,
                                 interactive=False, format="png", elem_id="strip", buttons=[])
                hover = gr.HTML(HOVER_HINT, js_on_load=HOVER_JS, elem_id="hover")
                with gr.Row():
                    hover_on = gr.Checkbox(True, label="Hover to steer", elem_id="hover-on", min_width=100)
                    hover_snap = gr.Checkbox(False, label="Snap to panels", elem_id="hover-snap", min_width=100)
                    hover_radius = Slider(5, 100, value=50, step=1, label="Spotlight radius (% of image height)",
                                          elem_id="hover-radius", min_width=160)
                    pace = Slider(0, h.MAX_PACE_MS, value=120, step=10, label="Pace (ms per token, hover)",
                                  elem_id="pace", min_width=160)
                hover_now = gr.Markdown("", elem_id="hover-now")
                with gr.Row():
                    panel_buttons = [gr.Button(f"Panel {k}", elem_id=f"panel-{k}", size="sm", min_width=60)
                                     for k in range(1, MAX_PANELS + 1)]
                captions = gr.Markdown(h.captions_markdown(first), elem_id="captions")
                reading = gr.Markdown("", elem_id="reading")
                gr.Markdown("**What the gaze heads look at** (newest token, or the word you click)")
                gaze = gr.Image(None, label="Gaze", show_label=False,
                                interactive=False, format="png", elem_id="gaze-map", buttons=[])
                gaze_label = gr.Markdown("", elem_id="gaze-label")
                trajectory = gr.Image(None, label="Trajectory: region x generated token", show_label=False,
                                      interactive=False, format="png", elem_id="trajectory", buttons=[])
            with gr.Column(scale=2):
                question = gr.Textbox(STRIP_QUESTION, label="Question", lines=2, max_length=h.MAX_QUESTION,
                                      elem_id="question")
                preset = gr.Radio(list(PRESETS), label="The paper's prompts", elem_id="preset")
                with gr.Row():
                    baseline = gr.Button("Generate without steering", variant="primary", elem_id="baseline")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                gr.HTML(legend_html(MAX_PANELS, box=True))
                answer = gr.HTML(answer_html([], [], []), js_on_load=ANSWER_JS, elem_id="answer")
                status = gr.Markdown("", elem_id="status")
                with gr.Accordion("Schedule: move the gaze mid-sentence", open=True):
                    with gr.Row():
                        schedule = gr.Textbox("4,2,1,6,5,3", label="Panels in order", max_lines=1,
                                              info="the answer to the question above moves between them "
                                                   "(try the narrate prompt)", elem_id="schedule", scale=3)
                        every = Number(8, label="Switch every (tokens)", precision=0, minimum=1,
                                          maximum=h.MAX_EVERY, elem_id="every", scale=1)
                    run_schedule = gr.Button("Run this schedule", elem_id="run-schedule")
                with gr.Accordion("Steering controls", open=True):
                    top_k = Slider(1, 64, value=settings.default_k or 4, step=1, label="K gaze heads",
                                      elem_id="top-k")
                    strength = Number(1e4, label="Strength (bias before softmax)", minimum=0,
                                         maximum=h.MAX_STRENGTH, elem_id="strength")
                    mode = gr.Radio(list(MODES), value="boost", label="Mode", info=MODE_INFO, elem_id="mode")
                    max_tokens = Slider(1, h.MAX_NEW_TOKENS, value=64, step=1, label="Max new tokens",
                                           elem_id="max-tokens")
                    prefill = gr.Checkbox(bool(settings.prefill_only),
                                          label="Steer the prompt only: a panel or box biases the prompt's rows, the "
                                                "answer then runs unsteered (schedules steer every row)",
                                          elem_id="prefill-only")
                with gr.Accordion("Image: examples, upload, boxes", open=True):
                    example = gr.Dropdown(example_names(), value=first.name, label="Example", elem_id="example")
                    upload = ImageUpload(None, type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                           label=f"Or upload an image (at most {settings.max_upload_mb} MB, "
                                                 f"{MAX_UPLOAD_PIXELS // 1_000_000} megapixels)",
                                      elem_id="upload", height=160)
                    with gr.Row():
                        upload_as = gr.Radio(list(UPLOAD_AS), value=UPLOAD_AS[0], label="Use it as",
                                             elem_id="upload-as")
                        n_panels = Slider(1, MAX_PANELS, value=6, step=1, label="Panels", elem_id="n-panels")
                    box_size = Slider(16, 512, value=96, step=8, label="Box size for a click on a picture (px)",
                                         elem_id="box-size")
                    with gr.Row():
                        box = gr.Textbox("", label="Or a box: x0, y0, x1, y1 (px)", max_lines=1, elem_id="box",
                                         scale=3)
                        steer_box = gr.Button("Steer to box", elem_id="steer-box", scale=1)

        controls = [top_k, strength, mode, max_tokens, prefill]
        inputs = [scene_state, question, *controls]
        stream_outputs = [strip, scene_state, answer, gaze, gaze_label, status, trajectory, record_state]
        common = dict(outputs=stream_outputs, concurrency_id="generate", show_progress="minimal",
                      show_progress_on=[status])

        def stream(scene: Scene, target, question_text: str, k, strength_, mode_, n_tokens, prefill_, request,
                   pace_ms=0):
            """Run one answer and map its frames onto the page (the first frame also redraws the image)."""
            scene = live_scene(scene)
            ready = holder.get()
            session = getattr(request, "session_hash", None) or "anonymous"
            stop_event = switches.start(session)  # also stops this visitor's previous answer, if still running
            first_target = target.targets[0] if isinstance(target, h.Schedule) else \
                target.target if isinstance(target, LiveTarget) else target
            highlight = getattr(first_target, "k", None) if float(strength_ or 0) > 0 else None
            if isinstance(target, LiveTarget):
                hovers.start(session, target, stop_event)
            try:
                frames = h.answer(ready, scene, question_text, target,
                                  h.Controls(k, strength_, mode_, n_tokens, prefill_, pace_ms), stop_event,
                                  prefix_cache=prefixes.get(session))
                for i, f in enumerate(frames):
                    start, end = i == 0, f.done
                    redraw = start and not isinstance(target, LiveTarget)  # the spotlight shows a hover's target
                    yield (h.scene_view(scene, highlight) if redraw else gr.skip(),
                           scene if start else gr.skip(),
                           f.answer,
                           f.gaze if f.gaze is not None or start else gr.skip(),
                           "" if start else gr.skip(),
                           f.status,
                           f.trajectory if start or end else gr.skip(),
                           f.record if start or end else gr.skip())
            except Exception as e:  # noqa: BLE001 - the error replaces the answer and status: no stale answer
                yield (gr.skip(), gr.skip(), answer_html([], [], []), None, "",
                       f"**Error:** {error_line(e, 'stream')}", None, None)
            finally:
                switches.finish(session, stop_event)
                if isinstance(target, LiveTarget):
                    hovers.finish(session, target)

        def failed(e: BaseException):
            """The page after a request refused before its answer started: the answer cleared, the error shown."""
            return (gr.skip(), gr.skip(), answer_html([], [], []), None, "", f"**Error:** {error_line(e, 'request')}",
                    None, None)

        def streamed(fn):
            """A stream handler whose errors (bad input, or ours) replace the answer and status with one line."""
            @functools.wraps(fn)
            def gen(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as e:  # noqa: BLE001
                    yield failed(e)
            return gen

        def panel_handler(k: int):
            @on_gpu
            @streamed
            def on_panel(scene, question_text, k_heads, strength_, mode_, n_tokens, prefill_, request: gr.Request):
                target = h.panel_target(k, live_scene(scene))
                yield from stream(scene.with_mark(None), target, question_text, k_heads, strength_, mode_, n_tokens,
                                  prefill_, request)
            on_panel.__name__ = f"panel_{k}"
            return on_panel

        for k, button in enumerate(panel_buttons, start=1):
            button.click(panel_handler(k), inputs=inputs, api_name=f"panel_{k}", **common)

        @on_gpu
        @streamed
        def unsteered(scene, question_text, k_heads, strength_, mode_, n_tokens, prefill_, request: gr.Request):
            yield from stream(scene, None, question_text, k_heads, strength_, mode_, n_tokens, prefill_, request)

        baseline.click(unsteered, inputs=inputs, api_name="unsteered", **common)

        @on_gpu
        @streamed
        def on_schedule(scene, question_text, k_heads, strength_, mode_, n_tokens, prefill_, text, interval,
                        request: gr.Request):
            target = h.schedule_target(text, interval, live_scene(scene))
            yield from stream(scene, target, question_text, k_heads, strength_, mode_, n_tokens, prefill_, request)

        run_schedule.click(on_schedule, inputs=inputs + [schedule, every], api_name="schedule", **common)

        @on_gpu
        @streamed
        def on_box(scene, question_text, k_heads, strength_, mode_, n_tokens, prefill_, text, request: gr.Request):
            b = parse_box(text, live_scene(scene).image.size)
            yield from stream(scene.with_mark(b), Box(tuple(float(v) for v in b)), question_text, k_heads,
                              strength_, mode_, n_tokens, prefill_, request)

        steer_box.click(on_box, inputs=inputs + [box], api_name="box", **common)

        @on_gpu
        @streamed
        def on_point(scene, question_text, k_heads, strength_, mode_, n_tokens, prefill_, size, evt: gr.SelectData,
                     request: gr.Request):
            x, y = evt.index  # pixels of the displayed (upscaled) image
            scene = live_scene(scene)
            scene, target = point_target(scene, x / scene.scale, y / scene.scale, int(size))
            yield from stream(scene, target, question_text, k_heads, strength_, mode_, n_tokens, prefill_, request)

        strip.select(on_point, inputs=inputs + [box_size], api_name="point", **common)

        # ---- the spotlight: hover_start streams an answer to a LiveTarget, hover_move moves it (at the next
        # token), hover_leave (after the page's grace) stops it. Coordinates are pixels of the displayed image.
        def spot(scene: Scene, evt: gr.EventData) -> tuple:
            data = evt._data if isinstance(evt._data, dict) else {}
            try:
                x, y, r = (float(data.get(key)) for key in ("x", "y", "r"))
            except (TypeError, ValueError):
                raise h.InputError("the spotlight sent no position") from None
            return x / scene.scale, y / scene.scale, r / scene.scale, bool(data.get("snap"))

        @on_gpu
        @streamed
        def on_hover_start(scene, question_text, k_heads, strength_, mode_, n_tokens, prefill_, pace_,
                           evt: gr.EventData, request: gr.Request):
            scene = live_scene(scene)
            live = LiveTarget(h.hover_target(scene, *spot(scene, evt)))
            yield from stream(scene.with_mark(None), live, question_text, k_heads, strength_, mode_, n_tokens,
                              prefill_, request, pace_ms=pace_)

        hover.hover_start(on_hover_start, inputs=inputs + [pace], api_name="hover", **common)

        def on_hover_move(scene, evt: gr.EventData, request: gr.Request):
            try:
                scene = live_scene(scene)
                session = getattr(request, "session_hash", None) or "anonymous"
                return h.retarget(hovers.get(session), scene, *spot(scene, evt))
            except ValueError as e:
                return str(e)

        hover.hover_move(on_hover_move, inputs=[scene_state], outputs=[hover_now], queue=False,
                         api_visibility="private", show_progress="hidden")

        def on_hover_leave(request: gr.Request):
            hovers.leave(getattr(request, "session_hash", None) or "anonymous")
            return ""

        hover.hover_leave(on_hover_leave, inputs=None, outputs=[hover_now], queue=False, api_visibility="private",
                          show_progress="hidden")

        def on_stop(request: gr.Request):
            switches.stop(getattr(request, "session_hash", None) or "anonymous")

        stop.click(on_stop, inputs=None, outputs=None, queue=False, api_visibility="private")

        @readable
        def on_word(record, evt: gr.EventData):
            data = evt._data if isinstance(evt._data, dict) else {}
            return h.word_view(record, int(data.get("i", -1)))

        answer.click(on_word, inputs=[record_state], outputs=[gaze, gaze_label], api_visibility="private",
                     show_progress="hidden")

        presets = dict(PRESETS)  # replaced by the model's own prompts (its prompts.json) once it is loaded

        preset.change(lambda name: presets.get(name, gr.skip()) if name else gr.skip(), inputs=preset,
                      outputs=question, api_visibility="private", queue=False)

        # ---- choosing the image
        scene_outputs = [scene_state, strip, captions, *panel_buttons, answer, gaze, gaze_label, trajectory,
                         record_state, status, reading]

        def show(scene: Scene, note: bool = True):
            buttons = [gr.update(interactive=k <= scene.n_panels) for k in range(1, MAX_PANELS + 1)]
            reading_line = h.reading_note(holder.get(), scene) if note and holder.is_loaded else ""
            return (scene, h.scene_view(scene), h.captions_markdown(scene), *buttons, answer_html([], [], []),
                    None, "", None, None, "", reading_line)

        @readable
        def on_example(name):
            # an example replaces an upload: the upload widget is cleared and "use it as" back to a strip
            return (*show(load_example(name)), None, UPLOAD_AS[0])

        example.change(on_example, inputs=example, outputs=scene_outputs + [upload, upload_as],
                       api_visibility="private")

        @readable
        def on_upload(image, use_as, n):
            if image is None:
                return tuple(gr.skip() for _ in scene_outputs)
            scene = scene_from_upload(image, use_as == UPLOAD_AS[0], n, max_bytes=settings.max_upload_bytes)
            holder.get()  # an upload is read by the model's processor: say how (panels, tokens per panel)
            return show(scene)

        for event in (upload.upload, upload_as.change, n_panels.release):
            event(on_upload, inputs=[upload, upload_as, n_panels], outputs=scene_outputs, api_visibility="private")

        def on_load():
            try:
                ready = holder.get()
            except Exception as e:  # noqa: BLE001 - shown in the page; every later request says the same
                log.exception("model failed to load")
                return f"**Model not loaded:** {e}", gr.skip(), gr.skip(), gr.skip()
            k = default_k(settings, ready)
            own = h.presets_for(settings.model)
            choices = gr.skip()
            if own != PRESETS:  # every page starts with the paper's presets: show this model's instead
                presets.clear()
                presets.update(own)
                choices = gr.update(choices=list(own), value=None)
            return (h.model_markdown(ready, k), gr.update(maximum=ready.n_heads_total, value=k),
                    h.reading_note(ready, first), choices)

        demo.load(lambda: first, outputs=scene_state, queue=False, api_visibility="private")  # the example shown
        demo.load(on_load, outputs=[model_info, top_k, reading, preset], api_visibility="private")
    return demo

