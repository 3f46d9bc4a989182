"""The Space's bounds: upload size, images refused from their header before decoding, sessions that expire
and are capped, and bad numbers as readable page errors. No model is loaded, except by the page's load event in
the browser test (which needs /usr/bin/chromium)."""

from __future__ import annotations

import socket
import time

import pytest
from PIL import Image, ImageFile

gr = pytest.importorskip("gradio")

from gradio.state_holder import StateHolder  # noqa: E402

from space.limits import LimitError, open_upload, session_nbytes  # noqa: E402
from space.scene import MAX_SIDE, InputError, live_scene, load_example, parse_box, scene_from_upload  # noqa: E402
from space.state import Settings, launch_options  # noqa: E402
from space.ui import build_demo, readable  # noqa: E402
from space.widgets import Number, Slider  # noqa: E402


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> str:
    """A small PNG whose header says 12000 x 12000 px (144 megapixels), as in the issue."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (12_000, 12_000)).save(path, optimize=True)
    return str(path)


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any image is decoded (ImageFile.load is where PIL reads pixel data)."""
    def load(self):
        raise AssertionError(f"{self.size} image decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_an_oversize_upload_is_refused_with_a_page_message(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"\0" * (3 << 20))  # 3 MB; never opened
    with pytest.raises(LimitError, match=r"the file is 3.0 MB; upload an image of at most 1.0 MB"):
        scene_from_upload(str(big), as_strip=True, n_panels=6, max_bytes=1 << 20)
    # what the page shows: the handler's wrapper turns it into a gr.Error with that message
    refuse = readable(lambda: scene_from_upload(str(big), True, 6, max_bytes=1 << 20))
    with pytest.raises(gr.Error, match="at most 1.0 MB"):
        refuse()


def test_the_server_refuses_an_oversize_upload_before_any_handler(tmp_path):
    import httpx

    settings = Settings(max_upload_mb=1)
    demo = build_demo(settings)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **launch_options(settings))
    try:
        url = f"http://127.0.0.1:{port}/gradio_api/upload"
        small = httpx.post(url, files={"files": ("ok.png", b"x" * 1000)}, timeout=30)
        big = httpx.post(url, files={"files": ("big.png", b"x" * (2 << 20))}, timeout=30)
        assert small.status_code == 200 and big.status_code == 413
    finally:
        demo.close()


@pytest.fixture(scope="module")
def demo():
    return build_demo(Settings())  # loads the first example's image: built before `no_decoding` applies


def test_a_header_bomb_is_refused_without_decoding(bomb, demo, no_decoding):
    with pytest.raises(LimitError, match=r"12000x12000 px \(144 megapixels\); upload one of at most 40 megapixels"):
        open_upload(bomb, max_bytes=20 << 20)
    with pytest.raises(LimitError, match="144 megapixels"):
        scene_from_upload(bomb, as_strip=False, n_panels=6)
    # The page's upload widget hands the handler the file's path; Gradio only reads the header on the way
    upload = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "upload")
    assert upload.preprocess(upload.data_model(path=bomb, orig_name="bomb.png")) == bomb


def test_pils_decompression_bomb_error_becomes_the_same_message(tmp_path, no_decoding, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("1", (1000, 1000)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # 1 MP is then over twice the limit: PIL raises at open
    with pytest.raises(LimitError, match="too many pixels"):
        open_upload(path, max_bytes=20 << 20, max_pixels=10**9)


def test_uploads_that_fit_are_decoded_and_bounded(tmp_path):
    path = tmp_path / "wide.jpg"
    Image.new("RGB", (6000, 1000), "orange").save(path, quality=80)
    scene = scene_from_upload(str(path), as_strip=True, n_panels=6)
    assert max(scene.image.size) == MAX_SIDE and scene.n_panels == 6
    assert session_nbytes(scene) <= MAX_SIDE * MAX_SIDE * 3  # what the session keeps of it
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(LimitError, match="not an image"):
        scene_from_upload(str(not_an_image), as_strip=False, n_panels=6)
    with pytest.raises(LimitError, match="megapixels"):
        scene_from_upload(Image.new("1", (8000, 6000)), as_strip=False, n_panels=6)  # in memory: same bound


def test_sessions_expire_and_are_capped(tmp_path):
    settings = Settings(max_sessions=3, session_ttl=0.3)
    demo = build_demo(settings)
    demo.state_session_capacity = launch_options(settings)["state_session_capacity"]  # what launch() does
    holder = StateHolder()
    holder.set_blocks(demo)
    states = [b for b in demo.blocks.values() if isinstance(b, gr.State)]
    assert states and all(s.time_to_live == 0.3 for s in states)
    scene_id = states[0]._id
    strip = load_example("strip 1")
    for i in range(5):  # five visitors: only the three most recent are kept
        holder[f"visitor-{i}"][scene_id] = strip
    assert list(holder.session_data) == ["visitor-2", "visitor-3", "visitor-4"]
    time.sleep(0.4)
    holder.delete_all_expired_state()  # Gradio's server runs this every second
    expired = holder["visitor-4"][scene_id]
    assert expired is None
    with pytest.raises(InputError, match="session expired"):
        live_scene(expired)


def test_bad_numbers_are_readable_page_errors():
    for text in ("0, 0, inf, 10", "nan 0 5 5", "1e400, 0, 5, 5"):
        with pytest.raises(InputError, match="give four pixel numbers"):
            parse_box(text, (384, 64))
    k = Slider(1, 64, value=4, step=1, label="K gaze heads")
    with pytest.raises(gr.Error, match="K gaze heads: 'abc' is not a number"):
        k.preprocess("abc")
    strength = Number(1e4, label="Strength")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(gr.Error, match="not a finite number"):
            strength.preprocess(bad)
    assert k.preprocess(3) == 3 and strength.preprocess(5.0) == 5.0


# ---------------------------------------------------------------- in a browser: refusals are shown on the page

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.mark.browser
def test_refused_uploads_are_shown_in_the_page(bomb, tmp_path):
    import os

    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (/usr/bin/chromium): `apt-get install -y chromium`")
    sync_api = pytest.importorskip("playwright.sync_api")
    settings = Settings(max_upload_mb=1)
    demo = build_demo(settings)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        **launch_options(settings))
    big = tmp_path / "big.png"
    Image.effect_noise((1000, 1000), 128).convert("RGB").save(big)  # ~2-3 MB of noise: over 1 MB
    assert big.stat().st_size > 1 << 20
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            page.set_default_timeout(30_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.set_input_files("#upload input[type=file]", bomb)
            page.locator(".toast-body", has_text="144 megapixels").first.wait_for()  # the handler's message
            page.reload()
            page.set_input_files("#upload input[type=file]", str(big))
            # Gradio's upload refuses it in the page, before it reaches the server or a handler
            page.locator(".toast-body", has_text="exceed the maximum allowed size of 1.0 Mb").first.wait_for()
            browser.close()
    finally:
        demo.close()
