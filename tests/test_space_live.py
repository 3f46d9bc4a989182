"""The Space's hover (a spotlight moving a running answer), cached image prefixes and the new user's trip-ups,
as plain handler calls on a tiny random Qwen3-VL (no browser; tests/test_space_browser.py drives the page)."""

from __future__ import annotations

import threading

import pytest
from PIL import Image

gr = pytest.importorskip("gradio")

from gaze.generation import PrefixCache, generate  # noqa: E402
from gaze.steering import Box, LiveTarget, Panel  # noqa: E402
from space import handlers as h  # noqa: E402
from space.render import PANEL_COLOURS, panel_colour  # noqa: E402
from space.scene import InputError, Scene, example_names, load_example  # noqa: E402
from space.state import LiveAnswers, ModelHolder, SessionPrefixes, Settings  # noqa: E402

NARRATE = "Describe this comic strip panel by panel."


@pytest.fixture(scope="module")
def ready(qwen3_path, tmp_path_factory):
    cache = tmp_path_factory.mktemp("gaze-cache")
    return ModelHolder(Settings(model=str(qwen3_path), device="cpu", cache_dir=cache, discovery_strips=2)).get()


@pytest.fixture(scope="module")
def strip() -> Scene:
    return load_example(example_names()[0])


def test_a_hover_answer_follows_the_spotlight_token_by_token(ready, strip, monkeypatch):
    """Moving the spotlight mid-answer re-steers the next token: the same tokens as a schedule switching there.

    The move is made when token 3 is out (from the generating thread, so the step is known: the threads'
    timing is tests/test_live.py's business)."""
    x2, x5 = [(strip.panels[k][0] + strip.panels[k][2]) / 2 for k in (1, 4)]  # the centres of panels 2 and 5
    live = LiveTarget(h.hover_target(strip, x2, 32, 20, snap=True))
    assert live.target == Panel(2)
    real, said = h.generate, []

    def generate_moving(*args, on_token=None, **kwargs):
        def on(event):
            on_token(event)
            if event.index == 2:
                said.append(h.retarget(live, strip, x5, 32, 20, snap=True))
        return real(*args, on_token=on, **kwargs)

    monkeypatch.setattr(h, "generate", generate_moving)
    frames = list(h.answer(ready, strip, NARRATE, live, h.Controls(k=4, max_new_tokens=8), refresh=0,
                           prefix_cache=PrefixCache()))
    rec = frames[-1].record
    assert said == ["panel 5"] and len(rec.labels) == 8
    assert rec.labels == ["panel 2"] * 3 + ["panel 5"] * 5
    assert rec.colours[0] == panel_colour(2) and rec.colours[-1] == panel_colour(5)
    ref = real(ready.loaded, strip.image, NARRATE, heads=ready.ranking.top(4), panels=strip.panels,
               schedule=h.Schedule((Panel(2), Panel(5)), steps=(3,)), phase=h.ROWS_PHASE, max_new_tokens=8)
    assert rec.pieces == ref.pieces
    assert "following the spotlight" in frames[-1].status and "image cached" in frames[-1].status


def test_the_spotlight_box_and_snapping():
    pic = load_example("picture 1")  # 256x256
    assert h.hover_target(pic, 100, 100, 30, snap=False) == Box((70.0, 70.0, 130.0, 130.0))
    assert h.hover_target(pic, 5, 250, 30, snap=True) == Box((0.0, 220.0, 35.0, 256.0))  # clipped; no panels
    strip = load_example(example_names()[0])
    x0, _, x1, _ = strip.panels[4]
    assert h.hover_target(strip, (x0 + x1) / 2, 10, 8, snap=True) == Panel(5)
    assert h.hover_target(strip, 10_000, 10, 8, snap=True) == Panel(6)  # clamped into the image
    assert h.target_label(Box((x0 + 2.0, 0.0, x1 - 2.0, 64.0)), strip, spotlight=True) == ("spotlight on panel 5",
                                                                                          panel_colour(5))
    assert h.target_label(Box((0.0, 0.0, 9.0, 9.0)), pic, spotlight=True)[0] == "spotlight"
    with pytest.raises(InputError):
        h.hover_target(strip, float("nan"), 1, 1, snap=False)


def test_a_too_small_spotlight_keeps_the_previous_target(ready, strip):
    from gaze.generation import prepare_inputs
    from gaze.steering import steer

    inputs, _ = prepare_inputs(ready.loaded, strip.image, NARRATE)
    live = LiveTarget(Panel(1))
    with steer(ready.loaded.model, ready.ranking.top(2), live, inputs=inputs, panels=strip.panels):
        assert "too small" in h.retarget(live, strip, 1, 1, 0.5, snap=False)
        assert live.target == Panel(1)
    assert h.retarget(None, strip, 1, 1, 8, snap=True) == ""  # no hover answer running: nothing to move


def test_strength_zero_is_labelled_and_tinted_as_the_baseline(ready, strip):
    frames = list(h.answer(ready, strip, NARRATE, Panel(4), h.Controls(k=4, strength=0, max_new_tokens=4),
                           refresh=0))
    rec = frames[-1].record
    assert rec.labels == [None] * len(rec.pieces) and "data-target" not in frames[-1].answer
    assert "steered to panel 4" not in frames[-1].status and "unsteered (strength 0)" in frames[-1].status
    base = list(h.answer(ready, strip, NARRATE, None, h.Controls(k=4, max_new_tokens=4), refresh=0))[-1].record
    assert rec.pieces == base.pieces


def test_every_answer_on_an_image_reuses_its_prefix(ready, strip):
    cache = PrefixCache()
    for target in (Panel(1), None, h.schedule_target("2,3", 2, strip), Panel(6)):
        last = list(h.answer(ready, strip, NARRATE, target, h.Controls(k=4, max_new_tokens=3), refresh=0,
                             prefix_cache=cache))[-1]
        assert "image cached" in last.status
    assert cache.misses == 1 and cache.hits == 3
    # steering the prompt only steers the image rows too: that answer is run in full, exactly as before
    last = list(h.answer(ready, strip, NARRATE, Panel(1), h.Controls(k=4, max_new_tokens=3, phase="prefill"),
                         refresh=0, prefix_cache=cache))[-1]
    assert "image cached" not in last.status


def test_session_prefixes_and_hover_answers_are_bounded_and_per_session():
    prefixes = SessionPrefixes(max_sessions=2, per_session=1)
    a = prefixes.get("a")
    assert prefixes.get("a") is a and a.max_entries == 1
    prefixes.get("b"), prefixes.get("c")
    assert len(prefixes) == 2 and prefixes.get("a") is not a  # "a" was dropped, least recently active
    hovers = LiveAnswers()
    live, stop = LiveTarget(Panel(1)), threading.Event()
    hovers.start("s", live, stop)
    assert hovers.get("s") is live and hovers.get("other") is None
    assert hovers.leave("s") and stop.is_set() and hovers.get("s") is None and not hovers.leave("s")
    click_stop = threading.Event()  # a click started meanwhile is not stopped by leaving the image
    hovers.start("s", live, stop)
    hovers.finish("s", live)
    assert not hovers.leave("s") and not click_stop.is_set()


def test_how_an_upload_was_read_and_a_warning_for_panels_under_a_token(ready, strip):
    note = h.reading_note(ready, strip)
    cols = round(strip.image.width / 32)  # the processor rounds the strip to whole 32 px tokens
    assert f"{cols}x2 grid of {2 * cols} image tokens" in note and "6 panels" in note
    assert "Warning" not in note
    narrow = Scene(Image.new("RGB", (128, 64), "white"), "narrow", panels=tuple(
        (round(i * 128 / 6), 0, round((i + 1) * 128 / 6), 64) for i in range(6)))
    note = h.reading_note(ready, narrow)
    assert "**Warning:**" in note and "less than one image token" in note


def test_model_info_keeps_small_scores_readable(ready):
    text = h.model_markdown(ready, 4)
    assert " 0.00," not in text and not text.rstrip(".").endswith(" 0.00")


def test_panel_colours_are_gaze_inspects():
    from gaze.plots import region_colour

    assert [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in PANEL_COLOURS] == [region_colour(k)
                                                                                      for k in range(6)]


def test_a_non_image_upload_is_one_readable_line(tmp_path):
    from space.widgets import NOT_AN_IMAGE, ImageUpload

    path = tmp_path / "notes.png"
    path.write_text("hello")
    upload = ImageUpload(None, type="filepath", image_mode=None)
    with pytest.raises(gr.Error) as e:
        upload.preprocess(upload.data_model(path=str(path), orig_name="notes.png"))
    assert e.value.message == NOT_AN_IMAGE and "cannot identify" not in str(e.value)


def test_presets_come_from_the_models_prompts_json(tmp_path):
    import json

    from gaze.prompts import PRESETS

    assert h.presets_for(str(tmp_path)) == PRESETS  # no prompts.json: the paper's
    (tmp_path / "prompts.json").write_text(json.dumps({"narrate": "Tell the story.",
                                                       "panel": "What is in the {ordinal} panel?"}))
    assert h.presets_for(str(tmp_path)) == {"narrate": "Tell the story.", "panel": "What is in the 1st panel?"}
    (tmp_path / "prompts.json").write_text(json.dumps({"prompts": [{"name": "a", "text": "Q?"}, 3]}))
    assert h.presets_for(str(tmp_path)) == {"a": "Q?"}
    (tmp_path / "prompts.json").write_text("not json")
    assert h.presets_for(str(tmp_path)) == PRESETS
