"""What the visitor is looking at: a strip (panels) or any picture (boxes), and where a click lands.

A `Scene` is one bounded RGB image plus, for a strip, its panel boxes (and
captions when known). Everything here is pure geometry on pixels: no model.

    scene = example_scenes()["strip 1"]
    target = point_target(scene, x=100, y=30, box_size=96)   # Panel(2) on a strip, a Box on a picture

Bounds that keep one visitor from taking the machine: uploads are checked
by size and header before decoding (`space.limits`), images are downscaled
to at most `MAX_SIDE` px a side, a strip has at most `MAX_PANELS` panels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image

from gaze.regions import ImageLayout
from gaze.steering import Box, Panel, Target, target_membership
from gaze.strips import equal_panels
from space.limits import MAX_UPLOAD_MB, MAX_UPLOAD_PIXELS, check_pixels, open_upload

EXAMPLES_DIR = Path(__file__).parent / "examples"
EXAMPLES_JSON = EXAMPLES_DIR / "examples.json"

MAX_SIDE = 2048  # px: larger uploads are downscaled (aspect kept)
MAX_PANELS = 6  # one panel button each
DISPLAY_WIDTH, DISPLAY_HEIGHT = 768, 512  # small images are shown upscaled by an integer factor up to this size
MAX_DISPLAY = 1024  # px: larger images are shown (and heat maps drawn) downscaled to this side


class InputError(ValueError):
    """Bad visitor input; the message is shown in the page as is."""


PixelBox = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive


@dataclass(frozen=True)
class Scene:
    """The image being asked about, and how it is cut into regions."""

    image: Image.Image  # RGB, at most MAX_SIDE a side
    name: str  # shown in the page
    panels: tuple[PixelBox, ...] | None = None  # a strip's panels in reading order; None: a picture (boxes only)
    captions: tuple[str, ...] | None = None  # ground truth per panel, when known
    letters: tuple[str, ...] | None = None  # overlaid letter per panel, when known
    objects: tuple[tuple[str, PixelBox], ...] = ()  # labelled object boxes of a picture, when known
    mark: PixelBox | None = None  # the last box target, drawn on the image

    @property
    def is_strip(self) -> bool:
        return self.panels is not None

    @property
    def n_panels(self) -> int:
        return len(self.panels) if self.panels else 0

    @property
    def scale(self) -> float:
        """Displayed px per image px: an integer upscale for small images (a 384x64 strip is shown 768x128),
        a downscale to MAX_DISPLAY for large ones. Clicks on the displayed image are divided by it."""
        w, h = self.image.size
        if max(w, h) > MAX_DISPLAY:
            return MAX_DISPLAY / max(w, h)
        return float(max(1, min(DISPLAY_WIDTH // w, DISPLAY_HEIGHT // h)))

    def with_mark(self, box: PixelBox | None) -> "Scene":
        return replace(self, mark=box)


# ---------------------------------------------------------------- sources


def bounded(image: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    """RGB, downscaled (aspect kept) so that neither side exceeds `max_side`."""
    image = image.convert("RGB")
    w, h = image.size
    if max(w, h) > max_side:
        s = max_side / max(w, h)
        image = image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    return image


@lru_cache(maxsize=1)
def _example_index() -> tuple[dict, ...]:
    if not EXAMPLES_JSON.exists():
        raise InputError(f"no bundled examples at {EXAMPLES_JSON}: run `python -m space.make_examples`")
    return tuple(json.loads(EXAMPLES_JSON.read_text())["examples"])


def example_names() -> list[str]:
    return [e["name"] for e in _example_index()]


def example_entries(kind: str | None = None) -> list[dict]:
    """The bundled examples' JSON entries (file, panels, captions, ...), optionally of one kind."""
    return [e for e in _example_index() if kind is None or e["kind"] == kind]


def load_example(name: str) -> Scene:
    """A bundled example by name: a strip with its panels and captions, or a picture with its objects."""
    for e in _example_index():
        if e["name"] == name:
            with Image.open(EXAMPLES_DIR / e["file"]) as im:
                image = im.convert("RGB")
            if e["kind"] == "strip":
                return Scene(image, name, panels=tuple(tuple(p) for p in e["panels"]),
                             captions=tuple(e["captions"]) if e.get("captions") else None,
                             letters=tuple(e["letters"]) if e.get("letters") else None)
            return Scene(image, name, objects=tuple((o["label"], tuple(o["box"])) for o in e.get("objects", [])))
    raise InputError(f"no example named {name!r}; choose one of {', '.join(example_names())}")


def scene_from_upload(image: Image.Image | str | Path | None, as_strip: bool, n_panels: int, *,
                      max_bytes: int = MAX_UPLOAD_MB << 20, max_pixels: int = MAX_UPLOAD_PIXELS) -> Scene:
    """An uploaded image: split into `n_panels` equal panels left to right, or a picture to steer by boxes.

    `image`: the uploaded file's path (its size and header are checked before
    it is decoded: `space.limits.open_upload`), or an image already in memory.
    """
    if image is None:
        raise InputError("upload an image first")
    if isinstance(image, (str, Path)):
        image = open_upload(image, max_bytes=max_bytes, max_pixels=max_pixels, max_side=MAX_SIDE)
    else:
        check_pixels(*image.size, max_pixels)
    image = bounded(image)
    if not as_strip:
        return Scene(image, "uploaded picture")
    n = int(n_panels)
    if not 1 <= n <= MAX_PANELS:
        raise InputError(f"split into 1 to {MAX_PANELS} panels, not {n}")
    if image.size[0] < n:
        raise InputError(f"the image is {image.size[0]} px wide: too narrow for {n} panels")
    return Scene(image, f"uploaded strip ({n} panels)", panels=equal_panels(image.size, n))


# ---------------------------------------------------------------- clicks and boxes


def panel_at(panels: tuple[PixelBox, ...], x: float, y: float) -> int | None:
    """1-based panel containing pixel (x, y), or None (a gap, or outside)."""
    for k, (x0, y0, x1, y1) in enumerate(panels, start=1):
        if x0 <= x < x1 and y0 <= y < y1:
            return k
    return None


def box_around(x: float, y: float, size: int, image_size: tuple[int, int]) -> PixelBox:
    """A `size` x `size` box centred on (x, y), shifted (not shrunk) to lie inside the image when it can."""
    w, h = image_size
    if size < 1:
        raise InputError(f"box size must be at least 1 px, got {size}")
    bw, bh = min(size, w), min(size, h)
    x0 = min(max(0, round(x - bw / 2)), w - bw)
    y0 = min(max(0, round(y - bh / 2)), h - bh)
    return (x0, y0, x0 + bw, y0 + bh)


def point_target(scene: Scene, x: float, y: float, box_size: int) -> tuple[Scene, Target]:
    """Where a click at image pixel (x, y) steers: the panel containing it on a strip, else a box centred on it.

    Returns the scene (with the box marked, for pictures) and the target.
    """
    w, h = scene.image.size
    if not (0 <= x < w and 0 <= y < h):
        raise InputError(f"the point ({x:.0f}, {y:.0f}) is outside the {w}x{h} image")
    if scene.is_strip:
        k = panel_at(scene.panels, x, y)
        if k is None:
            raise InputError(f"the point ({x:.0f}, {y:.0f}) is between panels: click inside one")
        return scene.with_mark(None), Panel(k)
    box = box_around(x, y, int(box_size), (w, h))
    return scene.with_mark(box), Box(tuple(float(v) for v in box))


def parse_box(text: str, image_size: tuple[int, int]) -> PixelBox:
    """'x0, y0, x1, y1' (pixels of the image) -> a box inside the image, or a readable error."""
    parts = [p for p in (text or "").replace(",", " ").split() if p]
    try:
        values = [round(float(p)) for p in parts]  # inf: OverflowError, nan: ValueError
    except (ValueError, OverflowError):
        values = []
    if len(values) != 4:
        raise InputError(f"bad box {text!r}: give four pixel numbers x0, y0, x1, y1, e.g. 40, 10, 120, 60")
    x0, y0, x1, y1 = values
    w, h = image_size
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if not (x0 < x1 and y0 < y1):
        raise InputError(f"box {text!r} is empty inside the {w}x{h} image: give x0 < x1 and y0 < y1")
    return (x0, y0, x1, y1)


def live_scene(scene: Scene | None) -> Scene:
    """The session's scene, or a readable error when the server has dropped it (expired or evicted)."""
    if scene is None:
        raise InputError("this page's session expired (idle too long, or the server was busy): "
                         "pick an example or upload the image again")
    return scene


def target_cells(layout: ImageLayout, target: Target, panels) -> torch.Tensor:
    """Indices of the image tokens a target steers to (into the layout's tokens): [n] long."""
    return target_membership(target, layout, panels).nonzero().flatten()
