"""The served Space in a real browser: `python app.py` in a subprocess, headless Debian Chromium via Playwright.

Clicks a panel and reads the streamed answer, runs a schedule and checks the
tint of every span, enters a bad schedule and reads the error, clicks a word
and a point, and saves a screenshot under pytest's tmp dir. Then hovers: the
spotlight on panel 2, moved to panel 5 mid-answer (spans tinted 2 then 5),
leaving the strip stops the answer, and two sessions hovering different panels
at once each get their own answer.

The model is the organism once it exists (gaze/organism/weights/config.json), else a
tiny random Qwen3-VL with a ranking discovered on two bundled strips: with
random weights the text is gibberish, so only structure is asserted, and the
"the answer describes the clicked panel" check runs on the organism only.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from gaze.models import ORGANISM_DIR
from gaze.prompts import NARRATION_PROMPT

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

ORGANISM = (ORGANISM_DIR / "config.json").exists()
MODEL = "organism" if ORGANISM else "tiny"  # the one line to change: "tiny" forces the random test model
PANEL = 2  # the panel button clicked first
EXAMPLE = "strip 1"  # the example on screen when the page opens

if not CHROMIUM.exists():
    pytest.skip("Debian chromium is not installed (/usr/bin/chromium): `apt-get install -y chromium`",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(request, tmp_path_factory):
    """`python app.py` serving MODEL on a free localhost port; stopped after the module."""
    tmp = tmp_path_factory.mktemp("space-app")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", GRADIO_SERVER_NAME="127.0.0.1",
               GAZE_CACHE=str(tmp / "cache"), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2")
    if MODEL == "tiny":
        from gaze.discovery import discover
        from gaze.models import load
        from space.state import discovery_strips

        path = request.getfixturevalue("qwen3_path")
        discover(load(str(path), device="cpu"), discovery_strips(2), tmp / "ranking", progress=False)
        env.update(GAZE_MODEL=str(path), GAZE_RANKING=str(tmp / "ranking"))
    else:
        env.update(GAZE_MODEL="organism")
    port = free_port()
    env["GRADIO_SERVER_PORT"] = str(port)
    log = open(tmp / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + float(os.environ.get("GAZE_TEST_APP_START_S", 90))
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{(tmp / 'app.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not serve in time (GAZE_TEST_APP_START_S):\n{(tmp / 'app.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(app_url):
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def open_page(browser, url):
    """A page in its own browser context: its own Gradio session."""
    pg = browser.new_context(viewport={"width": 1400, "height": 1500}).new_page()
    pg.set_default_timeout(30_000)
    pg.goto(url)
    pg.wait_for_selector("#model-info:has-text('Ranking')")  # the model loaded on first use
    return pg


@pytest.fixture(scope="module")
def page(browser, app_url):
    pg = open_page(browser, app_url)
    yield pg
    pg.context.close()


def captions(name: str) -> list[str]:
    entries = json.loads((ROOT / "space/examples/examples.json").read_text())["examples"]
    return next(e["captions"] for e in entries if e["name"] == name)


def wait_done(pg, what: str) -> None:
    """Wait for the final status line of an answer described as `what` (e.g. 'steered to panel 2')."""
    pg.wait_for_selector(f"#status:has-text('{what}'):has-text('tokens in')")


def answer_text(pg) -> str:
    return "".join(pg.locator("#answer .tok").all_inner_texts())


def span_targets(pg) -> list[tuple[str | None, str]]:
    return pg.locator("#answer .tok").evaluate_all(
        "els => els.map(e => [e.dataset.target || null, getComputedStyle(e).backgroundColor])")


def rgb(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r}, {g}, {b}"


def test_the_space_in_a_browser(page, tmp_path):
    from space.render import BOX_COLOUR, panel_colour

    pg = page
    started = time.monotonic()
    number = "#max-tokens input[type=number]"
    pg.fill(number, "24")
    pg.press(number, "Enter")

    # 1. a panel button streams the steered answer
    pg.click(f"#panel-{PANEL}")
    pg.wait_for_selector(f"#answer .tok[data-target='panel {PANEL}']")  # visible mid-stream
    wait_done(pg, f"steered to panel {PANEL}")
    spans = span_targets(pg)
    assert spans and all(t == f"panel {PANEL}" for t, _ in spans)
    assert all(bg.startswith(rgb(panel_colour(PANEL))) for _, bg in spans)
    assert pg.locator("#gaze-map img").count() == 1 and pg.locator("#trajectory img").count() == 1
    if ORGANISM:
        # ---- ORGANISM ONLY: the steered answer describes the clicked panel ----------------------
        # the organism names a panel by its character and object ("the cat by a tree"): the object is unique
        words = captions(EXAMPLE)[PANEL - 1].split()  # "the frog jumps by a ball"
        assert answer_text(pg).strip().rstrip(".") == f"{words[-1]} with the {words[1]}", answer_text(pg)

    # 2. clicking a word shows its recorded heat map and region, without generating again
    status = pg.locator("#status").inner_text()
    pg.locator("#answer .tok").nth(1).click()
    pg.wait_for_selector("#gaze-label:has-text('token 2')")
    label = pg.locator("#gaze-label").inner_text()
    assert f"steered to panel {PANEL}" in label and re.search(r"gaze on panel \d", label)
    assert pg.locator("#gaze-map img").count() == 1
    assert pg.locator("#status").inner_text() == status  # nothing was generated again
    # (the map itself may equal the last token's: biased at every row, the organism's steered heads put all
    # their mass on the panel's one token at every step)

    # 3. a schedule, on the narration prompt (a long answer): spans tinted with the scheduled panels' colours,
    # in order
    question = pg.locator("#question textarea")
    asked = question.input_value()
    question.fill(NARRATION_PROMPT)
    pg.fill("#schedule input, #schedule textarea", "4,1,6")
    pg.fill("#every input", "3")
    pg.fill(number, "9")
    pg.press(number, "Enter")
    pg.click("#run-schedule")
    wait_done(pg, "schedule 4,1,6")
    spans = span_targets(pg)
    assert [t for t, _ in spans] == ["panel 4"] * 3 + ["panel 1"] * 3 + ["panel 6"] * 3
    for t, bg in spans:
        assert bg.startswith(rgb(panel_colour(int(t[-1]))))
    pg.locator("#answer .tok").nth(4).click()  # a word of the second span: its own heat map
    pg.wait_for_selector("#gaze-label:has-text('token 5'):has-text('steered to panel 1')")
    pg.screenshot(path=str(tmp_path / "space-schedule.png"), full_page=True)
    question.fill(asked)

    # 4. a bad schedule: a readable error in the page, no stack trace
    pg.fill("#schedule input, #schedule textarea", "4,2,x")
    pg.click("#run-schedule")
    error = pg.get_by_text("bad schedule entry 'x'").first
    error.wait_for()
    assert "Traceback" not in pg.content()

    # 5. a click on a point of the strip steers to the panel containing it
    img = pg.locator("#strip img")
    box = img.bounding_box()
    img.click(position={"x": box["width"] * 4.5 / 6, "y": box["height"] / 2})  # inside panel 5
    wait_done(pg, "steered to panel 5")
    assert {t for t, _ in span_targets(pg)} == {"panel 5"}

    # 5b. "steer the prompt only": the first word is steered (tinted), the rest of the answer is not
    pg.click("#prefill-only input")
    pg.click(f"#panel-{PANEL}")
    wait_done(pg, f"steered to panel {PANEL}")
    spans = span_targets(pg)
    assert spans[0][0] == f"panel {PANEL}" and all(t is None for t, _ in spans[1:])
    if ORGANISM:  # the organism's whole answer is then the clicked panel's caption, in its words
        words = captions(EXAMPLE)[PANEL - 1].split()  # "the frog jumps by a ball"
        assert answer_text(pg).strip().rstrip(".") == f"{words[-1]} with the {words[1]}", answer_text(pg)
    pg.click("#prefill-only input")

    # 6. on a picture, a click steers to a box around the point, drawn on the image
    pg.click("#example input")
    pg.get_by_role("option", name="picture 1").click()
    pg.wait_for_selector("#captions:has-text('picture 1')")
    before = pg.locator("#strip img").get_attribute("src")
    img = pg.locator("#strip img")
    box = img.bounding_box()
    img.click(position={"x": box["width"] / 2, "y": box["height"] / 2})
    wait_done(pg, "steered to box")
    spans = span_targets(pg)
    assert spans and all(t == "box" and bg.startswith(rgb(BOX_COLOUR)) for t, bg in spans)
    assert pg.locator("#strip img").get_attribute("src") != before  # the box is drawn

    shot = tmp_path / "space.png"
    pg.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"\nscreenshot: {shot}  ({time.monotonic() - started:.1f} s in the browser)")


def panel_point(pg, k: int, n_panels: int = 6) -> tuple[float, float]:
    """Page coordinates of the centre of panel k of the strip on screen."""
    box = pg.locator("#strip img").bounding_box()
    return box["x"] + box["width"] * (k - 0.5) / n_panels, box["y"] + box["height"] / 2


def hover_setup(pg, question: str, tokens: int, pace_ms: int) -> None:
    pg.locator("#question textarea").fill(question)
    for sel, value in (("#max-tokens input[type=number]", tokens), ("#pace input[type=number]", pace_ms)):
        pg.fill(sel, str(value))
        pg.press(sel, "Enter")
    if not pg.locator("#hover-snap input").is_checked():
        pg.click("#hover-snap input")
    pg.mouse.move(5, 5)


def spans_in_order(labels: list) -> list:
    """The distinct labels in the order their runs appear."""
    runs = []
    for label in labels:
        if not runs or runs[-1] != label:
            runs.append(label)
    return runs


def test_hover_moves_the_answer_and_leaving_stops_it(browser, app_url, tmp_path):
    from space.render import panel_colour

    pg = open_page(browser, app_url)
    hover_setup(pg, NARRATION_PROMPT, tokens=64, pace_ms=200)
    x, y = panel_point(pg, 2)
    pg.mouse.move(x - 5, y)  # one step each: straight onto panel 2, then wiggle inside it
    pg.mouse.move(x, y)
    pg.wait_for_selector("#answer .tok[data-target='panel 2']")
    pg.wait_for_function("document.querySelectorAll('#answer .tok').length >= 3")
    x5, y5 = panel_point(pg, 5)
    pg.mouse.move(x5, y5)  # mid-answer, in one jump (not across panels 3 and 4): the next token follows
    pg.wait_for_function("document.querySelectorAll(\"#answer .tok[data-target='panel 5']\").length >= 4")
    if ORGANISM:  # it goes on to name panel 5's object (every panel of strip 1 has the frog: the object tells)
        obj = captions(EXAMPLE)[4].split()[-1]  # "the frog sleeps by a cake" -> "cake"
        pg.wait_for_function(
            "obj => Array.from(document.querySelectorAll(\"#answer .tok[data-target='panel 5']\"))"
            ".map(e => e.textContent).join('').includes(obj)", arg=obj, timeout=20_000)
    before_leaving = answer_text(pg)
    pg.mouse.move(x5, y5 + 400, steps=4)  # off the strip: the answer stops after a short grace
    pg.wait_for_selector("#status:has-text('tokens in'):has-text('(stopped)')", timeout=15_000)
    spans = span_targets(pg)
    labels = [t for t, _ in spans]
    assert spans_in_order(labels) == ["panel 2", "panel 5"], labels
    for t, bg in spans:
        assert bg.startswith(rgb(panel_colour(int(t[-1]))))
    assert len(labels) < 64  # stopped, not run to the end
    if ORGANISM:  # the text written after the switch names panel 5's object
        after = "".join(t for t, (label, _) in zip(pg.locator("#answer .tok").all_inner_texts(), spans)
                        if label == "panel 5")
        assert captions(EXAMPLE)[4].split()[-1] in after, after
    assert before_leaving
    pg.screenshot(path=str(tmp_path / "space-hover.png"), full_page=True)
    pg.context.close()


def test_two_sessions_hovering_at_once_get_their_own_answers(browser, app_url):
    pages = [open_page(browser, app_url) for _ in range(2)]
    wanted = {0: 1, 1: 4}  # page -> panel hovered
    for pg in pages:
        hover_setup(pg, "What is the main action happening in this comic strip? Answer briefly.", tokens=16,
                    pace_ms=150)
    for i, pg in enumerate(pages):  # one after the other, within a fraction of a second: both answers run at once
        x, y = panel_point(pg, wanted[i])
        pg.mouse.move(x, y)
    for i, pg in enumerate(pages):
        pg.wait_for_selector(f"#answer .tok[data-target='panel {wanted[i]}']")
    for i, pg in enumerate(pages):
        pg.wait_for_selector("#status:has-text('following the spotlight'):has-text('tokens in')", timeout=30_000)
        labels = [t for t, _ in span_targets(pg)]
        assert labels and set(labels) == {f"panel {wanted[i]}"}, labels
        if ORGANISM:
            words = captions(EXAMPLE)[wanted[i] - 1].split()
            assert answer_text(pg).strip().rstrip(".") == f"{words[-1]} with the {words[1]}", answer_text(pg)
    for pg in pages:
        pg.context.close()
