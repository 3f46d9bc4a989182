"""The Space's handlers as plain functions, on a tiny random Qwen3-VL (no browser, no server)."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio")

from gaze.generation import generate  # noqa: E402
from gaze.regions import grid_layout  # noqa: E402
from gaze.steering import Box, Panel  # noqa: E402
from space import handlers as h  # noqa: E402
from space.render import BOX_COLOUR, panel_colour  # noqa: E402
from space.scene import (MAX_SIDE, InputError, Scene, box_around, example_entries, example_names,  # noqa: E402
                         load_example, parse_box, point_target, scene_from_upload, target_cells)
from space.state import ModelHolder, Ready, Settings, StopSwitches, cache_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NARRATE = "Describe this comic strip panel by panel."


@pytest.fixture(scope="module")
def ready(qwen3_path, tmp_path_factory) -> Ready:
    """The tiny model and a ranking discovered on two bundled strips, through the Space's own holder."""
    cache = tmp_path_factory.mktemp("gaze-cache")
    holder = ModelHolder(Settings(model=str(qwen3_path), device="cpu", cache_dir=cache, discovery_strips=2))
    return holder.get()


@pytest.fixture(scope="module")
def strip() -> Scene:
    return load_example(example_names()[0])


def run(ready, scene, target, k=4, n=6, question=NARRATE, **kw):
    return list(h.answer(ready, scene, question, target, h.Controls(k=k, max_new_tokens=n), refresh=0, **kw))


# ---------------------------------------------------------------- examples and geometry (no model)


def test_bundled_examples_are_datagen_strips_with_panels_and_captions():
    strips = example_entries("strip")
    assert len(strips) >= 6
    meta = json.loads((ROOT / "space/examples/examples.json").read_text())
    assert "datagen" in meta["made_by"]
    for e in strips:
        scene = load_example(e["name"])
        assert scene.n_panels == 6 and len(scene.captions) == 6
        # assembled as the paper does and as the organism was trained: one height, widths of their own, 6 px gaps
        assert scene.image.size[1] == 64 and {p[3] - p[1] for p in scene.panels} == {64}
        assert [b[0] - a[2] for a, b in zip(scene.panels, scene.panels[1:])] == [6] * 5
        assert all(64 <= p[2] - p[0] <= 112 for p in scene.panels)
    assert example_entries("picture"), "a picture for region steering"
    assert sum(f.stat().st_size for f in (ROOT / "space/examples").iterdir()) < 500_000


def test_a_click_selects_the_panel_and_its_token_cells(strip):
    w, h = strip.image.size
    cols = round(w / 32)
    layout = grid_layout(10, (2, cols), (cols * 32, 64), (w, h))  # what Qwen3-VL makes of the strip: 32 px tokens
    for k, (x0, y0, x1, y1) in enumerate(strip.panels, start=1):
        scene, target = point_target(strip, (x0 + x1) // 2, (y0 + y1) // 2, box_size=96)
        assert target == Panel(k) and scene.mark is None
        # the panel's tokens: those whose cell centre lies in its box, in both token rows
        inside = [c for c in range(cols) if x0 <= (c + 0.5) * w / cols < x1]
        assert inside and target_cells(layout, target, strip.panels).tolist() == inside + [c + cols for c in inside]
    with pytest.raises(InputError, match="outside"):
        point_target(strip, w + 16, 10, 96)


def test_a_click_on_a_picture_steers_to_a_box_centred_on_it():
    pic = load_example("picture 1")
    layout = grid_layout(0, (8, 8), (256, 256), (256, 256))  # 32 px cells
    scene, target = point_target(pic, 120, 100, box_size=64)
    assert scene.mark == (88, 68, 152, 132) and target == Box((88.0, 68.0, 152.0, 132.0))
    # cells whose centre lies in the box: columns 3, 4 (centres 112, 144), rows 2, 3 (centres 80, 112)
    assert target_cells(layout, target, None).tolist() == [19, 20, 27, 28]
    # near an edge the box shifts inside instead of shrinking
    assert box_around(5, 250, 64, (256, 256)) == (0, 192, 64, 256)
    assert box_around(10, 10, 1000, (256, 128)) == (0, 0, 256, 128)


def test_box_text_and_uploads_are_bounded_with_readable_errors():
    assert parse_box("40, 10, 120, 60", (384, 64)) == (40, 10, 120, 60)
    assert parse_box("-5 0 500 70", (384, 64)) == (0, 0, 384, 64)  # clipped to the image
    for bad in ("1,2,3", "a,b,c,d", "50,10,40,60"):
        with pytest.raises(InputError):
            parse_box(bad, (384, 64))
    big = scene_from_upload(Image.new("RGB", (5000, 1000)), as_strip=True, n_panels=4)
    assert max(big.image.size) == MAX_SIDE and big.n_panels == 4
    assert scene_from_upload(Image.new("RGB", (300, 300)), as_strip=False, n_panels=6).panels is None
    with pytest.raises(InputError, match="1 to 6 panels"):
        scene_from_upload(Image.new("RGB", (300, 300)), as_strip=True, n_panels=9)
    with pytest.raises(InputError, match="upload"):
        scene_from_upload(None, as_strip=True, n_panels=6)


def test_bad_schedules_get_readable_errors(strip):
    sched = h.schedule_target("4,2,1,6,5,3", 8, strip)
    assert [t.k for t in sched.targets] == [4, 2, 1, 6, 5, 3] and sched.every == 8
    for text, every, message in [("4,2,x", 8, "bad schedule entry 'x'"), ("", 8, "empty schedule"),
                                 ("1,7", 8, "panel 7 is out of range"), (",".join(["1"] * 33), 8, "too long"),
                                 ("1,2", 0, "switch interval 0"), ("1,2", "ten", "whole number")]:
        with pytest.raises(InputError, match=re.escape(message)):
            h.schedule_target(text, every, strip)
    with pytest.raises(InputError, match="no panels"):
        h.panel_target(2, load_example("picture 1"))


def test_stop_switches_are_per_session():
    s = StopSwitches()
    a, b = s.start("a"), s.start("b")
    assert s.stop("a") and a.is_set() and not b.is_set()
    b2 = s.start("b")  # a new answer in a session stops the one still running there
    assert b.is_set() and not b2.is_set()
    s.finish("b", b2)
    assert not s.stop("b")
    assert cache_name("Qwen/Qwen3-VL-2B-Instruct") == "Qwen--Qwen3-VL-2B-Instruct"


# ---------------------------------------------------------------- with the tiny model


def test_controls_are_bounded(ready, strip):
    total = ready.n_heads_total
    for controls, message in [(h.Controls(k=total + 1), f"choose 1 to {total}"),
                              (h.Controls(strength=-1), "strength"),
                              (h.Controls(mode="sideways"), "unknown mode"),
                              (h.Controls(max_new_tokens=10_000), "max new")]:
        with pytest.raises(InputError, match=message):
            h.check_controls(ready, controls)
    with pytest.raises(InputError, match="empty"):
        next(h.answer(ready, strip, "  ", Panel(1), h.Controls()))


def test_the_holder_loads_once_lazily_and_caches_the_discovered_ranking(qwen3_path, tmp_path):
    settings = Settings(model=str(qwen3_path), device="cpu", cache_dir=tmp_path, discovery_strips=2)
    holder = ModelHolder(settings)
    assert not holder.is_loaded  # nothing at construction
    got = []
    threads = [threading.Thread(target=lambda: got.append(holder.get())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(r) for r in got}) == 1 and "discovered on first use" in got[0].ranking_source
    assert (tmp_path / "rankings" / cache_name(str(qwen3_path)) / "ranking.json").exists()
    again = ModelHolder(settings).get()
    assert again.ranking_source.startswith("cached at")
    assert torch.equal(again.ranking.scores, got[0].ranking.scores)


def test_build_demo_loads_nothing(qwen3_path, tmp_path):
    from space import build_demo

    demo = build_demo(Settings(model=str(qwen3_path), cache_dir=tmp_path))
    assert not demo.holder.is_loaded
    names = {d.api_name for d in demo.fns.values() if d.api_name}
    assert {"panel_1", "panel_6", "unsteered", "schedule", "point", "box"} <= names


def test_a_panel_click_streams_the_steered_answer_of_generate(ready, strip):
    frames = run(ready, strip, Panel(3))
    assert len(frames) >= 2 and frames[-1].done and not any(f.done for f in frames[:-1])
    rec = frames[-1].record
    ref = generate(ready.loaded, strip.image, NARRATE, heads=ready.ranking.top(4), target=Panel(3),
                   panels=strip.panels, max_new_tokens=6, track=True, phase=h.ROWS_PHASE)
    assert rec.pieces == ref.pieces  # streaming (and the cached image prefix) change nothing
    assert rec.labels == ["panel 3"] * len(ref.pieces)
    assert rec.attention.shape == (len(ref.pieces), ref.layout.positions.numel()) and rec.attention.dtype == torch.float16
    expected = ref.tracker.attention()[: len(ref.pieces)].mean(1)  # [tokens, T]
    torch.testing.assert_close(rec.attention.float(), expected, atol=2e-3, rtol=0)
    assert f'data-target="panel 3"' in frames[-1].answer and panel_colour(3) in frames[-1].answer
    shown = (round(strip.image.width * strip.scale), round(strip.image.height * strip.scale))  # the displayed size
    assert frames[-1].gaze.size == shown and frames[-1].trajectory is not None


def test_the_baseline_is_unsteered_but_still_tracked(ready, strip):
    frames = run(ready, strip, None)
    rec = frames[-1].record
    ref = generate(ready.loaded, strip.image, NARRATE, max_new_tokens=6)
    assert rec.pieces == ref.pieces and rec.labels == [None] * len(ref.pieces)
    assert "data-target" not in frames[-1].answer and "unsteered" in frames[-1].status
    assert rec.attention.float().sum() > 0


def test_a_schedule_tints_each_span_with_the_panel_that_steered_it(ready, strip):
    sched = h.schedule_target("2,5,1", 2, strip)
    frames = run(ready, strip, sched, n=6)
    rec = frames[-1].record
    assert rec.labels == ["panel 2"] * 2 + ["panel 5"] * 2 + ["panel 1"] * 2
    assert re.findall(r'data-target="(panel \d)"', frames[-1].answer) == rec.labels
    assert re.findall(r'data-colour="(#\w+)"', frames[-1].answer) == [panel_colour(int(l[-1])) for l in rec.labels]


def test_a_box_target_is_tinted_and_tracked_on_a_picture(ready):
    scene, target = point_target(load_example("picture 1"), 128, 128, 96)
    frames = run(ready, scene, target, n=4, question="What is here?")
    rec = frames[-1].record
    assert set(rec.labels) == {"box"} and BOX_COLOUR in frames[-1].answer
    assert rec.regions.names[0] == "steered box" and rec.box == scene.mark


def test_a_word_click_shows_its_recorded_heat_map_without_generating(ready, strip, monkeypatch):
    rec = run(ready, strip, Panel(2))[-1].record
    monkeypatch.setattr(h, "generate", lambda *a, **k: pytest.fail("a word click must not generate"))
    image, label = h.word_view(rec, 1)
    assert image.size == (round(strip.image.width * strip.scale), round(strip.image.height * strip.scale))
    assert label.startswith("token 2 ") and "steered to panel 2" in label and "gaze on panel " in label
    other, _ = h.word_view(rec, 0)
    with pytest.raises(InputError):
        h.word_view(rec, len(rec.pieces))
    with pytest.raises(InputError, match="no answer yet"):
        h.word_view(None, 0)


def test_stop_ends_a_long_answer_early(ready, strip):
    stop = threading.Event()
    frames = []
    for f in h.answer(ready, strip, NARRATE, Panel(1), h.Controls(k=4, max_new_tokens=200), stop, refresh=0):
        frames.append(f)
        if len(frames) == 2:
            stop.set()
    rec = frames[-1].record
    assert frames[-1].done and len(rec.pieces) < 200 and "(stopped)" in frames[-1].status


def test_parallel_visitors_get_their_solo_answers(ready, strip):
    """Two answers generated at once in two threads never see each other's steering."""
    jobs = {"a": Panel(2), "b": h.schedule_target("5,1", 3, strip)}
    solo = {name: run(ready, strip, target)[-1].record for name, target in jobs.items()}
    together, barrier = {}, threading.Barrier(len(jobs))

    def visit(name):
        barrier.wait()
        together[name] = run(ready, strip, jobs[name])[-1].record

    threads = [threading.Thread(target=visit, args=(name,)) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in jobs:
        assert together[name].pieces == solo[name].pieces and together[name].labels == solo[name].labels
        torch.testing.assert_close(together[name].attention, solo[name].attention, atol=1e-3, rtol=0)


def test_errors_become_readable_page_errors():
    from space.ui import readable

    @readable
    def bad_input():
        raise InputError("panel 9 does not exist")

    @readable
    def bug():
        raise KeyError("internal detail")

    with pytest.raises(gr.Error, match="panel 9 does not exist"):
        bad_input()
    with pytest.raises(gr.Error) as e:
        bug()
    assert "KeyError" in str(e.value) and "internal detail" not in str(e.value)


# ---------------------------------------------------------------- deployment files


def test_space_readme_and_requirements_are_deployable():
    text = (ROOT / "space/README.md").read_text()
    front = text.split("---")[1]
    fields = dict(line.split(":", 1) for line in front.strip().splitlines() if ":" in line and not line.startswith("#"))
    fields = {k.strip(): v.split("#")[0].strip().strip('"') for k, v in fields.items()}
    assert fields["sdk"] == "gradio" and fields["app_file"] == "app.py"
    assert fields["sdk_version"] == gr.__version__
    reqs = (ROOT / "space/requirements.txt").read_text()
    for pkg in ("torch", "transformers", "pillow", "safetensors", "matplotlib"):
        assert re.search(rf"^{pkg}\b", reqs, re.M | re.I), pkg


def test_the_gpu_decorator_is_spaces_gpu_on_spaces_and_a_no_op_elsewhere(monkeypatch):
    import sys
    import types

    from space.state import on_gpu

    def f():
        return 1

    monkeypatch.setitem(sys.modules, "spaces", None)  # not installed: unchanged
    assert on_gpu(f) is f
    calls = []
    fake = types.SimpleNamespace(GPU=lambda duration: lambda fn: calls.append(duration) or fn)
    monkeypatch.setitem(sys.modules, "spaces", fake)
    assert on_gpu(f)() == 1 and calls == [120]


def test_large_images_are_shown_downscaled_and_clicks_map_back():
    scene = scene_from_upload(Image.new("RGB", (2000, 500)), as_strip=True, n_panels=4)
    assert scene.scale == pytest.approx(1024 / 2000)
    shown = h.scene_view(scene)
    assert shown.size == (1024, 256)
    x, y = 900, 100  # displayed pixels, in the 4th panel
    _, target = point_target(scene, x / scene.scale, y / scene.scale, 96)
    assert target == Panel(4)


def test_steering_the_prompt_only_labels_the_answer_rows_unsteered(ready, strip):
    """With 'steer the prompt only', a panel biases the prefill: the first token is steered, the rest are not;
    a schedule still steers every row."""
    full = list(h.answer(ready, strip, NARRATE, Panel(3), h.Controls(k=4, max_new_tokens=5), refresh=0))[-1].record
    pre = list(h.answer(ready, strip, NARRATE, Panel(3), h.Controls(k=4, max_new_tokens=5, phase="prefill"),
                        refresh=0))[-1].record
    assert pre.pieces[0] == full.pieces[0]  # the same steered prefill picks the first token
    assert pre.labels[0] == "panel 3" and set(pre.labels[1:]) <= {None}
    assert set(full.labels) == {"panel 3"}
    schedule = h.schedule_target("2,5", 2, strip)
    rec = list(h.answer(ready, strip, NARRATE, schedule, h.Controls(k=4, max_new_tokens=4, phase="prefill"),
                        refresh=0))[-1].record
    assert rec.labels == ["panel 2", "panel 2", "panel 5", "panel 5"][: len(rec.labels)]
