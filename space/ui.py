"""The page: layout and wiring only. What each button does lives in `handlers` (plain functions).

    demo = build_demo(Settings.from_env())      # nothing loads until the first visitor asks
    demo.queue(default_concurrency_limit=2).launch(css=CSS)

Every widget a test (or a visitor's script) needs has an `elem_id`:
strip, panel-1..panel-6, baseline, stop, question, preset, answer, status,
gaze-map, gaze-label, trajectory, schedule, every, run-schedule, top-k,
strength, mode, max-tokens, prefill-only, example, upload, upload-as, n-panels,
box-size, box, steer-box, model-info.
"""

from __future__ import annotations

import functools
import inspect
import logging

import gradio as gr

from gaze.prompts import PRESETS, STRIP_QUESTION
from gaze.steering import MODES, Box
from space import handlers as h
from space.render import PANEL_COLOURS, answer_html, legend_html
from space.limits import MAX_UPLOAD_PIXELS
from space.scene import (MAX_PANELS, Scene, example_names, live_scene, load_example, parse_box, point_target,
                         scene_from_upload)
from space.state import ModelHolder, Settings, StopSwitches, default_k, on_gpu
from space.widgets import Number, Slider

log = logging.getLogger("gaze.space")

TITLE = "Gaze heads: click a panel, watch the model's gaze move"
INTRO = (
    "A few attention heads of a vision-language model look at the part of the image the model is talking about. "
    "Click a **panel button** (or a point of the image) to steer those heads there and watch the answer follow; "
    "**Generate without steering** for the baseline. Run a **schedule** to move the gaze mid-sentence: every span "
    "of the answer is tinted with the colour of the panel that steered it. The heat map shows where the gaze heads "
    "look at each token; after an answer, click any word to see where it was looking."
)
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
    ]
)


def readable(fn):
    """Errors become `gr.Error` messages in the page (the input's fault: as is; ours: a short line, logged)."""

    def convert(e: BaseException) -> gr.Error:
        if isinstance(e, gr.Error):
            return e
        if isinstance(e, (ValueError, FileNotFoundError, ImportError)):  # InputError, RegionError, RankingError ...
            return gr.Error(str(e), print_exception=False)
        log.exception("handler %s failed", fn.__name__)
        return gr.Error(f"something went wrong on the server ({type(e).__name__}); try again or reload the page",
                        print_exception=False)

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
                strip = gr.Image(h.scene_view(first), label="The image (click a point to steer there)",
                                 interactive=False, format="png", elem_id="strip", buttons=[])
                with gr.Row():
                    panel_buttons = [gr.Button(f"Panel {k}", elem_id=f"panel-{k}", size="sm", min_width=60)
                                     for k in range(1, MAX_PANELS + 1)]
                captions = gr.Markdown(h.captions_markdown(first), elem_id="captions")
                gaze = gr.Image(None, label="What the gaze heads look at (newest token, or the word you click)",
                                interactive=False, format="png", elem_id="gaze-map", buttons=[])
                gaze_label = gr.Markdown("", elem_id="gaze-label")
                trajectory = gr.Image(None, label="Trajectory: region x generated token", interactive=False,
                                      format="png", elem_id="trajectory", buttons=[])
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
                    mode = gr.Radio(list(MODES), value="boost", label="Mode", elem_id="mode")
                    max_tokens = Slider(1, h.MAX_NEW_TOKENS, value=64, step=1, label="Max new tokens",
                                           elem_id="max-tokens")
                    prefill = gr.Checkbox(bool(settings.prefill_only),
                                          label="Steer the prompt only: a panel or box biases the prompt's rows, the "
                                                "answer then runs unsteered (schedules steer every row)",
                                          elem_id="prefill-only")
                with gr.Accordion("Image: examples, upload, boxes", open=True):
                    example = gr.Dropdown(example_names(), value=first.name, label="Example", elem_id="example")
                    upload = gr.Image(None, type="filepath", image_mode=None, sources=["upload", "clipboard"],
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

        def stream(scene: Scene, target, question_text: str, k, strength_, mode_, n_tokens, prefill_, request):
            """Run one answer and map its frames onto the page (the first frame also redraws the image)."""
            scene = live_scene(scene)
            ready = holder.get()
            session = getattr(request, "session_hash", None) or "anonymous"
            stop_event = switches.start(session)  # also stops this visitor's previous answer, if still running
            first_target = target.targets[0] if isinstance(target, h.Schedule) else target
            highlight = getattr(first_target, "k", None)
            try:
                frames = h.answer(ready, scene, question_text, target,
                                  h.Controls(k, strength_, mode_, n_tokens, prefill_), stop_event)
                for i, f in enumerate(frames):
                    start, end = i == 0, f.done
                    yield (h.scene_view(scene, highlight) if start else gr.skip(),
                           scene if start else gr.skip(),
                           f.answer,
                           f.gaze if f.gaze is not None or start else gr.skip(),
                           "" if start else gr.skip(),
                           f.status,
                           f.trajectory if start or end else gr.skip(),
                           f.record if start or end else gr.skip())
            finally:
                switches.finish(session, stop_event)

        def panel_handler(k: int):
            @on_gpu
            @readable
            def on_panel(scene, question_text, k_heads, strength_, mode_, n_tokens, prefill_, request: gr.Request):
                target = h.panel_target(k, live_scene(scene))
                yield from stream(scene.with_mark(None), target, question_text, k_heads, strength_, mode_, n_tokens,
                                  prefill_, request)
            on_panel.__name__ = f"panel_{k}"
            return on_panel

        for k, button in enumerate(panel_buttons, start=1):
            button.click(panel_handler(k), inputs=inputs, api_name=f"panel_{k}", **common)

        @on_gpu
        @readable
        def unsteered(scene, question_text, k_heads, strength_, mode_, n_tokens, prefill_, request: gr.Request):
            yield from stream(scene, None, question_text, k_heads, strength_, mode_, n_tokens, prefill_, request)

        baseline.click(unsteered, inputs=inputs, api_name="unsteered", **common)

        @on_gpu
        @readable
        def on_schedule(scene, question_text, k_heads, strength_, mode_, n_tokens, prefill_, text, interval,
                        request: gr.Request):
            target = h.schedule_target(text, interval, live_scene(scene))
            yield from stream(scene, target, question_text, k_heads, strength_, mode_, n_tokens, prefill_, request)

        run_schedule.click(on_schedule, inputs=inputs + [schedule, every], api_name="schedule", **common)

        @on_gpu
        @readable
        def on_box(scene, question_text, k_heads, strength_, mode_, n_tokens, prefill_, text, request: gr.Request):
            b = parse_box(text, live_scene(scene).image.size)
            yield from stream(scene.with_mark(b), Box(tuple(float(v) for v in b)), question_text, k_heads,
                              strength_, mode_, n_tokens, prefill_, request)

        steer_box.click(on_box, inputs=inputs + [box], api_name="box", **common)

        @on_gpu
        @readable
        def on_point(scene, question_text, k_heads, strength_, mode_, n_tokens, prefill_, size, evt: gr.SelectData,
                     request: gr.Request):
            x, y = evt.index  # pixels of the displayed (upscaled) image
            scene = live_scene(scene)
            scene, target = point_target(scene, x / scene.scale, y / scene.scale, int(size))
            yield from stream(scene, target, question_text, k_heads, strength_, mode_, n_tokens, prefill_, request)

        strip.select(on_point, inputs=inputs + [box_size], api_name="point", **common)

        def on_stop(request: gr.Request):
            switches.stop(getattr(request, "session_hash", None) or "anonymous")

        stop.click(on_stop, inputs=None, outputs=None, queue=False, api_visibility="private")

        @readable
        def on_word(record, evt: gr.EventData):
            data = evt._data if isinstance(evt._data, dict) else {}
            return h.word_view(record, int(data.get("i", -1)))

        answer.click(on_word, inputs=[record_state], outputs=[gaze, gaze_label], api_visibility="private",
                     show_progress="hidden")

        preset.change(lambda name: PRESETS.get(name, gr.skip()) if name else gr.skip(), inputs=preset,
                      outputs=question, api_visibility="private", queue=False)

        # ---- choosing the image
        scene_outputs = [scene_state, strip, captions, *panel_buttons, answer, gaze, gaze_label, trajectory,
                         record_state, status]

        def show(scene: Scene):
            buttons = [gr.update(interactive=k <= scene.n_panels) for k in range(1, MAX_PANELS + 1)]
            return (scene, h.scene_view(scene), h.captions_markdown(scene), *buttons, answer_html([], [], []),
                    None, "", None, None, "")

        example.change(readable(lambda name: show(load_example(name))), inputs=example, outputs=scene_outputs,
                       api_visibility="private")

        @readable
        def on_upload(image, use_as, n):
            if image is None:
                return tuple(gr.skip() for _ in scene_outputs)
            return show(scene_from_upload(image, use_as == UPLOAD_AS[0], n, max_bytes=settings.max_upload_bytes))

        for event in (upload.upload, upload_as.change, n_panels.release):
            event(on_upload, inputs=[upload, upload_as, n_panels], outputs=scene_outputs, api_visibility="private")

        def on_load():
            try:
                ready = holder.get()
            except Exception as e:  # noqa: BLE001 - shown in the page; every later request says the same
                log.exception("model failed to load")
                return f"**Model not loaded:** {e}", gr.skip()
            k = default_k(settings, ready)
            return h.model_markdown(ready, k), gr.update(maximum=ready.n_heads_total, value=k)

        demo.load(lambda: first, outputs=scene_state, queue=False, api_visibility="private")  # the example shown
        demo.load(on_load, outputs=[model_info, top_k], api_visibility="private")
    return demo

