"""Stage 2, procedural renderer: panels drawn with PIL, no model, any size from 16 px.

A panel is four independent choices from the story's vocabulary, each with
its own visual channel so that even a tiny model can learn them apart:

- scene (SCENES)   -> background: sky and ground colours plus a few props;
- character        -> a silhouette of simple shapes with its own colour;
- action (ACTIONS) -> a pose (height, rotation, squash) and marks (Zs, notes...);
- object (OBJECTS) -> a second silhouette on the other side of the panel.

Everything is drawn in unit coordinates by a `_Pen`, on a canvas up to 4x the
panel size, then box-filtered down (`Image.reduce`): cheap anti-aliasing that
keeps 64 px panels readable. The boxes of the character and the object come
from the alpha channel of their sprites, so they are exact. All randomness
comes from one `random.Random` per strip: the same seed gives the same pixels.

`make_scene` reuses the drawings for region steering: one larger image with
several labelled objects at different positions and sizes.
"""

from __future__ import annotations

import math
import random
from typing import Callable

from PIL import Image, ImageDraw, ImageOps

from datagen.renderers import MIN_PANEL_SIZE, RenderedPanel
from datagen.story import ACTIONS, CHARACTERS, OBJECTS, SCENES, DatagenError, Story

Colour = tuple[int, int, int]
OUTLINE: Colour = (25, 25, 30)
MAX_PANEL_SIZE = 2048  # far beyond any VLM's useful panel size; bounds memory
MIN_OBJECT_PX = 12  # smallest object side in a scene: smaller ones cover too few image tokens to steer to


def supersample(size: int) -> int:
    """Drawing scale for a panel of `size` px: a canvas of ~256 px, at most 4x."""
    return max(1, min(4, 256 // size))


class _Pen:
    """Draws shapes given in unit coordinates of a box (x0, y0, w, h) on an image."""

    def __init__(self, image: Image.Image, x0: float, y0: float, w: float, h: float, line: int):
        self.draw = ImageDraw.Draw(image)
        self.x0, self.y0, self.w, self.h = x0, y0, w, h
        self.line = line  # outline width in canvas pixels

    def _xy(self, *u: float) -> list[float]:
        return [self.x0 + v * self.w if i % 2 == 0 else self.y0 + v * self.h for i, v in enumerate(u)]

    def rect(self, x0, y0, x1, y1, fill: Colour, outline: bool = True):
        self.draw.rectangle(self._xy(x0, y0, x1, y1), fill=fill, outline=OUTLINE if outline else None,
                            width=self.line if outline else 0)

    def ellipse(self, x0, y0, x1, y1, fill: Colour, outline: bool = True):
        self.draw.ellipse(self._xy(x0, y0, x1, y1), fill=fill, outline=OUTLINE if outline else None,
                          width=self.line if outline else 0)

    def poly(self, points: list[float], fill: Colour, outline: bool = True):
        self.draw.polygon(self._xy(*points), fill=fill, outline=OUTLINE if outline else None,
                          width=self.line if outline else 0)

    def line_(self, points: list[float], fill: Colour, width: float = 1.0):
        """A polyline `width` outline-widths thick."""
        self.draw.line(self._xy(*points), fill=fill, width=max(1, round(self.line * width)), joint="curve")

    def pie(self, x0, y0, x1, y1, start: float, end: float, fill: Colour):
        self.draw.pieslice(self._xy(x0, y0, x1, y1), start, end, fill=fill, outline=OUTLINE, width=self.line)


def _star_points(cx: float, cy: float, r: float, points: int = 5) -> list[float]:
    out = []
    for i in range(points * 2):
        a = -math.pi / 2 + i * math.pi / points
        rr = r if i % 2 == 0 else r * 0.45
        out += [cx + rr * math.cos(a), cy + rr * math.sin(a)]
    return out


# ---------------------------------------------------------------- characters
# Each draws, facing right, into a unit square whose bottom edge is the ground.

def _cat(p: _Pen):
    orange = (245, 140, 30)
    p.line_([0.24, 0.86, 0.07, 0.7, 0.1, 0.42], OUTLINE, 3.5)  # tail: outline stroke, then fill stroke
    p.line_([0.24, 0.86, 0.07, 0.7, 0.1, 0.42], orange, 1.8)
    p.ellipse(0.15, 0.5, 0.78, 1.0, orange)
    p.poly([0.5, 0.28, 0.55, 0.02, 0.68, 0.22], orange)
    p.poly([0.72, 0.22, 0.85, 0.02, 0.9, 0.3], orange)
    p.ellipse(0.45, 0.14, 0.95, 0.62, orange)
    p.ellipse(0.6, 0.32, 0.67, 0.41, OUTLINE, outline=False)
    p.ellipse(0.78, 0.32, 0.85, 0.41, OUTLINE, outline=False)
    p.poly([0.7, 0.45, 0.76, 0.45, 0.73, 0.5], (240, 120, 150), outline=False)


def _robot(p: _Pen):
    grey, dark = (165, 175, 190), (110, 120, 140)
    p.line_([0.5, 0.14, 0.5, 0.03], OUTLINE, 1.5)
    p.ellipse(0.44, 0.0, 0.56, 0.1, (230, 40, 40))
    p.rect(0.28, 0.86, 0.42, 1.0, dark)
    p.rect(0.58, 0.86, 0.72, 1.0, dark)
    p.rect(0.06, 0.5, 0.2, 0.58, dark)
    p.rect(0.8, 0.5, 0.94, 0.58, dark)
    p.rect(0.2, 0.42, 0.8, 0.88, grey)
    p.rect(0.28, 0.12, 0.72, 0.42, grey)
    p.rect(0.38, 0.2, 0.47, 0.29, (40, 220, 240))
    p.rect(0.55, 0.2, 0.64, 0.29, (40, 220, 240))
    p.rect(0.35, 0.55, 0.65, 0.7, dark)


def _bird(p: _Pen):
    yellow, orange = (250, 215, 40), (240, 120, 20)
    p.line_([0.42, 0.85, 0.42, 1.0], orange, 1.2)
    p.line_([0.56, 0.85, 0.56, 1.0], orange, 1.2)
    p.poly([0.2, 0.5, 0.0, 0.38, 0.04, 0.66], yellow)
    p.ellipse(0.12, 0.28, 0.82, 0.9, yellow)
    p.poly([0.78, 0.46, 1.0, 0.54, 0.78, 0.62], orange)
    p.ellipse(0.26, 0.55, 0.56, 0.75, (225, 185, 20))
    p.ellipse(0.6, 0.4, 0.69, 0.49, OUTLINE, outline=False)


def _fish(p: _Pen):
    purple = (150, 80, 210)
    p.poly([0.2, 0.62, 0.0, 0.4, 0.0, 0.84], purple)
    p.poly([0.38, 0.44, 0.52, 0.26, 0.62, 0.46], purple)
    p.ellipse(0.12, 0.38, 0.9, 0.86, purple)
    p.ellipse(0.62, 0.5, 0.78, 0.66, (255, 255, 255))
    p.ellipse(0.68, 0.55, 0.75, 0.62, OUTLINE, outline=False)
    p.line_([0.4, 0.56, 0.46, 0.62, 0.4, 0.68], OUTLINE, 1.0)


def _frog(p: _Pen):
    green = (80, 190, 60)
    p.ellipse(0.0, 0.8, 0.3, 1.0, green)
    p.ellipse(0.7, 0.8, 1.0, 1.0, green)
    p.ellipse(0.04, 0.42, 0.96, 0.98, green)
    p.ellipse(0.16, 0.24, 0.44, 0.54, green)
    p.ellipse(0.56, 0.24, 0.84, 0.54, green)
    p.ellipse(0.23, 0.31, 0.37, 0.45, (255, 255, 255))
    p.ellipse(0.63, 0.31, 0.77, 0.45, (255, 255, 255))
    p.ellipse(0.27, 0.35, 0.33, 0.42, OUTLINE, outline=False)
    p.ellipse(0.67, 0.35, 0.73, 0.42, OUTLINE, outline=False)
    p.line_([0.3, 0.7, 0.5, 0.76, 0.7, 0.7], OUTLINE, 1.0)


def _ghost(p: _Pen):
    white = (248, 248, 252)
    p.poly([0.16, 0.45, 0.16, 1.0, 0.3, 0.9, 0.43, 1.0, 0.57, 0.9, 0.7, 1.0, 0.84, 0.9, 0.84, 0.45], white)
    p.ellipse(0.16, 0.05, 0.84, 0.75, white)
    p.rect(0.17, 0.42, 0.83, 0.9, white, outline=False)  # hides the dome's lower outline inside the body
    p.ellipse(0.33, 0.28, 0.44, 0.45, OUTLINE, outline=False)
    p.ellipse(0.56, 0.28, 0.67, 0.45, OUTLINE, outline=False)
    p.ellipse(0.45, 0.52, 0.55, 0.62, OUTLINE, outline=False)


# ---------------------------------------------------------------- objects

def _ball(p: _Pen):
    colours = [(225, 40, 40), (255, 255, 255), (40, 90, 220)]
    for i in range(6):
        p.pie(0.0, 0.0, 1.0, 1.0, i * 60, (i + 1) * 60, colours[i % 3])


def _tree(p: _Pen):
    p.rect(0.42, 0.55, 0.58, 1.0, (130, 80, 40))
    p.ellipse(0.08, 0.0, 0.92, 0.68, (35, 130, 50))


def _house(p: _Pen):
    p.rect(0.15, 0.45, 0.85, 1.0, (235, 205, 150))
    p.poly([0.04, 0.48, 0.5, 0.04, 0.96, 0.48], (180, 50, 40))
    p.rect(0.42, 0.68, 0.58, 1.0, (120, 70, 40))
    p.rect(0.22, 0.56, 0.36, 0.7, (150, 210, 250))


def _star(p: _Pen):
    p.poly(_star_points(0.5, 0.53, 0.5), (255, 200, 0))


def _flower(p: _Pen):
    p.line_([0.5, 0.5, 0.5, 1.0], (40, 150, 50), 2.0)
    p.ellipse(0.5, 0.7, 0.78, 0.82, (40, 150, 50))
    for a in range(5):
        x = 0.5 + 0.2 * math.cos(a * 2 * math.pi / 5 - math.pi / 2)
        y = 0.3 + 0.2 * math.sin(a * 2 * math.pi / 5 - math.pi / 2)
        p.ellipse(x - 0.15, y - 0.15, x + 0.15, y + 0.15, (240, 110, 180))
    p.ellipse(0.39, 0.19, 0.61, 0.41, (255, 220, 40))


def _car(p: _Pen):
    blue = (40, 90, 210)
    p.rect(0.22, 0.3, 0.74, 0.6, blue)
    p.rect(0.3, 0.36, 0.47, 0.56, (170, 220, 250))
    p.rect(0.52, 0.36, 0.68, 0.56, (170, 220, 250))
    p.rect(0.0, 0.55, 1.0, 0.84, blue)
    p.ellipse(0.1, 0.72, 0.36, 0.98, OUTLINE)
    p.ellipse(0.64, 0.72, 0.9, 0.98, OUTLINE)


def _umbrella(p: _Pen):
    teal = (0, 160, 160)
    p.line_([0.5, 0.4, 0.5, 0.92, 0.62, 0.92, 0.62, 0.84], OUTLINE, 1.6)
    p.pie(0.0, 0.05, 1.0, 0.75, 180, 360, teal)
    p.line_([0.5, 0.05, 0.5, 0.0], OUTLINE, 1.6)


def _cake(p: _Pen):
    p.rect(0.08, 0.6, 0.92, 1.0, (150, 90, 50))
    p.rect(0.08, 0.5, 0.92, 0.66, (250, 170, 200))
    p.rect(0.2, 0.28, 0.8, 0.52, (150, 90, 50))
    p.rect(0.2, 0.24, 0.8, 0.34, (250, 170, 200))
    p.rect(0.46, 0.04, 0.54, 0.24, (255, 255, 255))
    p.ellipse(0.44, -0.04, 0.56, 0.07, (255, 150, 0), outline=False)


CHARACTER_DRAWINGS: dict[str, Callable[[_Pen], None]] = {
    "cat": _cat, "robot": _robot, "bird": _bird, "fish": _fish, "frog": _frog, "ghost": _ghost}
OBJECT_DRAWINGS: dict[str, Callable[[_Pen], None]] = {
    "ball": _ball, "tree": _tree, "house": _house, "star": _star, "flower": _flower, "car": _car,
    "umbrella": _umbrella, "cake": _cake}
# Object size as a fraction of the panel: a house is bigger than a ball.
OBJECT_SCALE = {"ball": 0.2, "tree": 0.46, "house": 0.42, "star": 0.24, "flower": 0.28, "car": 0.36,
                "umbrella": 0.34, "cake": 0.26}


# ---------------------------------------------------------------- scenes
# Each fills the whole canvas; props are placed by `rng` so no two panels match.
# Returns True for dark scenes, where action marks are drawn in white.

def _dots(p: _Pen, rng: random.Random, n: int, colour: Colour, y1: float, r: float = 0.012):
    for _ in range(n):
        x, y = rng.uniform(0.03, 0.97), rng.uniform(0.03, y1)
        p.ellipse(x - r, y - r, x + r, y + r, colour, outline=False)


def _park(p: _Pen, rng: random.Random) -> bool:
    p.rect(0, 0, 1, 1, (150, 210, 250), outline=False)
    p.rect(0, 0.68, 1, 1, (90, 180, 80), outline=False)
    x = rng.uniform(0.1, 0.6)
    for dx, dy, r in ((0, 0, 0.07), (0.08, -0.03, 0.08), (0.16, 0, 0.07)):
        p.ellipse(x + dx - r, 0.15 + dy - r, x + dx + r, 0.15 + dy + r, (255, 255, 255), outline=False)
    return False


def _beach(p: _Pen, rng: random.Random) -> bool:
    p.rect(0, 0, 1, 1, (125, 205, 245), outline=False)
    p.rect(0, rng.uniform(0.55, 0.6), 1, 0.72, (30, 110, 200), outline=False)
    p.rect(0, 0.72, 1, 1, (240, 220, 160), outline=False)
    return False


def _night(p: _Pen, rng: random.Random) -> bool:
    p.rect(0, 0, 1, 1, (20, 25, 70), outline=False)
    p.rect(0, 0.7, 1, 1, (30, 65, 45), outline=False)
    _dots(p, rng, 6, (255, 255, 255), 0.5)
    x = rng.uniform(0.1, 0.8)
    p.ellipse(x, 0.06, x + 0.14, 0.2, (250, 240, 180), outline=False)
    return True


def _snow(p: _Pen, rng: random.Random) -> bool:
    p.rect(0, 0, 1, 1, (200, 212, 230), outline=False)
    p.rect(0, 0.68, 1, 1, (252, 252, 255), outline=False)
    _dots(p, rng, 10, (150, 175, 225), 0.62, 0.015)
    return False


def _desert(p: _Pen, rng: random.Random) -> bool:
    p.rect(0, 0, 1, 1, (250, 205, 140), outline=False)
    p.rect(0, 0.68, 1, 1, (225, 170, 90), outline=False)
    x = rng.uniform(0.1, 0.8)
    p.ellipse(x, 0.05, x + 0.16, 0.21, (255, 245, 120), outline=False)
    return False


def _city(p: _Pen, rng: random.Random) -> bool:
    p.rect(0, 0, 1, 1, (185, 200, 215), outline=False)
    x = 0.0
    while x < 1.0:
        w, top = rng.uniform(0.12, 0.22), rng.uniform(0.25, 0.5)
        p.rect(x, top, x + w, 0.7, (120, 130, 150), outline=False)
        p.rect(x + w * 0.3, top + 0.06, x + w * 0.55, top + 0.12, (250, 230, 120), outline=False)
        x += w + 0.02
    p.rect(0, 0.7, 1, 1, (105, 105, 115), outline=False)
    return False


def _space(p: _Pen, rng: random.Random) -> bool:
    p.rect(0, 0, 1, 1, (8, 8, 28), outline=False)
    _dots(p, rng, 9, (255, 255, 255), 0.65)
    x = rng.uniform(0.1, 0.75)
    p.ellipse(x, 0.08, x + 0.18, 0.26, (220, 110, 60), outline=False)
    p.rect(0, 0.72, 1, 1, (140, 140, 150), outline=False)
    x = rng.uniform(0.05, 0.8)
    p.ellipse(x, 0.84, x + 0.16, 0.9, (105, 105, 115), outline=False)
    return True


def _room(p: _Pen, rng: random.Random) -> bool:
    p.rect(0, 0, 1, 1, (240, 220, 185), outline=False)
    x = rng.uniform(0.1, 0.65)
    p.rect(x, 0.12, x + 0.24, 0.4, (170, 215, 250))
    p.line_([x + 0.12, 0.12, x + 0.12, 0.4], OUTLINE)
    p.rect(0, 0.7, 1, 1, (160, 105, 60), outline=False)
    return False


SCENE_DRAWINGS: dict[str, Callable[[_Pen, random.Random], bool]] = {
    "park": _park, "beach": _beach, "night": _night, "snow": _snow, "desert": _desert, "city": _city,
    "space": _space, "room": _room}


# ---------------------------------------------------------------- sprites and poses

def _sprite(drawing: Callable[[_Pen], None], size: int, line: int) -> Image.Image:
    """A transparent `size` x `size` RGBA image holding one drawing."""
    sprite = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    drawing(_Pen(sprite, 0, 0, size, size, line))
    return sprite


def _pose(sprite: Image.Image, action: str, facing: int) -> Image.Image:
    """The character sprite in the action's pose (rotation or squash); facing +1 right, -1 left."""
    if facing < 0:
        sprite = ImageOps.mirror(sprite)
    if action == "sleeps":
        return sprite.rotate(90 * facing, resample=Image.BICUBIC, expand=True)
    if action == "falls":
        return sprite.rotate(180, resample=Image.BICUBIC, expand=True)
    if action == "runs":
        return sprite.rotate(-16 * facing, resample=Image.BICUBIC, expand=True)
    if action == "sits":
        w, h = sprite.size
        return sprite.resize((round(w * 1.1), round(h * 0.7)), Image.BICUBIC)
    return sprite


# How far above the ground an action lifts the character, as a fraction of the panel.
LIFT = {"jumps": 0.3, "falls": 0.2}


def _paste(canvas: Image.Image, sprite: Image.Image, cx: float, bottom: float) -> tuple[int, int, int, int]:
    """Paste `sprite` centred on x = cx with its drawn part ending at y = bottom; return the drawn box."""
    bx0, by0, bx1, by1 = sprite.getchannel("A").getbbox()
    x = round(cx - (bx0 + bx1) / 2)
    y = round(bottom - by1)
    canvas.paste(sprite, (x, y), sprite)
    W, H = canvas.size
    return max(0, x + bx0), max(0, y + by0), min(W, x + bx1), min(H, y + by1)


def _marks(p: _Pen, action: str, box: tuple[int, int, int, int], facing: int, ink: Colour, ground: float):
    """The action's marks around the character box (canvas pixels; `p` draws in canvas pixels)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    front = x1 if facing > 0 else x0
    back = x0 if facing > 0 else x1
    if action == "jumps":
        cx = (x0 + x1) / 2
        p.ellipse(cx - w * 0.35, ground - h * 0.06, cx + w * 0.35, ground + h * 0.06, (60, 60, 60), outline=False)
        for dx in (-0.25, 0, 0.25):
            p.line_([cx + dx * w, y1 + h * 0.12, cx + dx * w, y1 + h * 0.4], ink, 1.2)
    elif action == "sleeps":
        for i, s in enumerate((0.22, 0.16)):
            zx, zy = front - facing * w * 0.1 + facing * i * w * 0.3, y0 - h * (0.35 + 0.35 * i)
            p.line_([zx, zy, zx + w * s, zy, zx, zy + w * s, zx + w * s, zy + w * s], ink, 1.3)
    elif action == "runs":
        for dy in (0.3, 0.5, 0.7):
            p.line_([back - facing * w * 0.08, y0 + dy * h, back - facing * w * 0.4, y0 + dy * h], ink, 1.2)
    elif action == "eats":
        ax, ay, r = front - facing * w * 0.05, y0 + h * 0.45, w * 0.16
        p.ellipse(ax - r, ay - r, ax + r, ay + r, (220, 30, 30))
        p.ellipse(ax, ay - r * 1.6, ax + r * 0.8, ay - r * 0.9, (50, 170, 50), outline=False)
    elif action == "falls":
        for dx in (0.2, 0.5, 0.8):
            p.line_([x0 + dx * w, y0 - h * 0.1, x0 + dx * w, y0 - h * 0.35], ink, 1.2)
    elif action == "sings":
        for i in range(2):
            nx, ny = front + facing * w * (0.12 + 0.25 * i), y0 + h * (0.15 - 0.2 * i)
            r = w * 0.07
            p.ellipse(nx - r * 1.3, ny - r, nx + r * 1.3, ny + r, ink, outline=False)
            p.line_([nx + r * 1.1, ny, nx + r * 1.1, ny - h * 0.3, nx + r * 1.1 + w * 0.1, ny - h * 0.22], ink, 1.2)
    elif action == "cries":
        for side in (x0 + w * 0.15, x1 - w * 0.15):
            for k in range(2):
                ty, r = y0 + h * (0.35 + 0.18 * k), w * 0.05
                p.ellipse(side - r, ty - r * 1.5, side + r, ty + r, (60, 140, 255))
        p.ellipse(x0 + w * 0.1, ground - h * 0.04, x1 - w * 0.1, ground + h * 0.05, (60, 140, 255), outline=False)
    # "sits" has no marks: the squashed pose is the cue.


# ---------------------------------------------------------------- panels

def check_size(size: int) -> None:
    if not isinstance(size, int) or not MIN_PANEL_SIZE <= size <= MAX_PANEL_SIZE:
        raise DatagenError(f"panel size {size!r} is impossible for the procedural renderer; "
                           f"use an integer from {MIN_PANEL_SIZE} to {MAX_PANEL_SIZE} px")


def draw_panel(character: str, action: str, obj: str, scene: str, size: int, rng: random.Random) -> RenderedPanel:
    """One `size` x `size` panel: the scene, the object on one side, the posed character on the other.

    Returns the image and the boxes of the character and the object (panel pixels).
    """
    for word, vocab in ((character, CHARACTERS), (action, ACTIONS), (obj, OBJECTS), (scene, SCENES)):
        if word not in vocab:
            raise DatagenError(f"{word!r} is not in the procedural vocabulary {vocab}")
    ss = supersample(size)
    S = size * ss  # canvas size
    line = max(1, round(S * 0.012))
    canvas = Image.new("RGB", (S, S))
    dark = SCENE_DRAWINGS[scene](_Pen(canvas, 0, 0, S, S, line), rng)
    ink = (255, 255, 255) if dark else OUTLINE
    pen = _Pen(canvas, 0, 0, 1, 1, line)  # canvas-pixel pen for the action marks
    ground = S * rng.uniform(0.86, 0.92)
    facing = 1 if rng.random() < 0.5 else -1  # the character faces the object across the panel
    # A runner stands further in, so the speed lines behind it stay inside the panel.
    char_x = S * (0.5 - (0.16 if action == "runs" else 0.22) * facing + rng.uniform(-0.04, 0.04))
    obj_x = S * (0.5 + 0.24 * facing + rng.uniform(-0.04, 0.04))

    obj_size = round(S * OBJECT_SCALE[obj] * rng.uniform(0.85, 1.15))
    obj_bottom = S * rng.uniform(0.3, 0.45) if obj == "star" else ground  # stars float, the rest stand
    obj_box = _paste(canvas, _sprite(OBJECT_DRAWINGS[obj], obj_size, line), obj_x, obj_bottom)

    char_size = round(S * rng.uniform(0.38, 0.46))
    sprite = _pose(_sprite(CHARACTER_DRAWINGS[character], char_size, line), action, facing)
    char_box = _paste(canvas, sprite, char_x, ground - S * LIFT.get(action, 0.0))
    _marks(pen, action, char_box, facing, ink, ground)

    image = canvas.reduce(ss) if ss > 1 else canvas
    objects = tuple({"label": label, "box": _down(box, ss, size, size)}
                    for label, box in ((character, char_box), (obj, obj_box)))
    return RenderedPanel(image, objects)


def _down(box: tuple[int, int, int, int], ss: int, W: int, H: int) -> list[int]:
    """A canvas box in image pixels, rounded outwards so it still covers the drawing."""
    x0, y0, x1, y1 = box
    return [x0 // ss, y0 // ss, min(W, -(-x1 // ss)), min(H, -(-y1 // ss))]


class ProceduralRenderer:
    """The offline renderer: draws template stories (vocabulary words) with PIL."""

    name = "procedural"
    model_id = None

    def check_size(self, size: int) -> None:
        check_size(size)

    def render(self, story: Story, size: int, seed: int) -> list[RenderedPanel]:
        if not story.drawable:
            raise DatagenError(f"the procedural renderer draws only template stories (story by {story.writer}); "
                               "use the diffusers renderer for free-text stories")
        rng = random.Random(f"panels/{seed}")
        return [draw_panel(story.character, p.action, p.object, p.scene, size, rng) for p in story.panels]


PROCEDURAL = ProceduralRenderer()


# ---------------------------------------------------------------- multi-object scenes

def make_scene(seed: int, size: tuple[int, int] = (448, 448), n_objects: int = 4,
               scene: str | None = None) -> tuple[Image.Image, list[dict]]:
    """One image with `n_objects` distinct labelled drawings at different positions and sizes.

    For region steering: each label is a CHARACTERS or OBJECTS word, each box
    ([x0, y0, x1, y1], pixels) is exact and no two boxes overlap. The scene is
    `scene` or a seeded choice of SCENES.
    """
    W, H = size
    labels = CHARACTERS + OBJECTS
    if not 1 <= n_objects <= len(labels):
        raise DatagenError(f"n_objects={n_objects}: choose 1 to {len(labels)} (one of each drawing at most)")
    if min(W, H) < 2 * MIN_PANEL_SIZE:
        raise DatagenError(f"scene size {size} is too small; use at least {2 * MIN_PANEL_SIZE} px a side")
    rng = random.Random(f"scene/{seed}")
    scene = scene or rng.choice(SCENES)
    ss = supersample(min(W, H))
    canvas = Image.new("RGB", (W * ss, H * ss))
    line = max(1, round(min(W, H) * ss * 0.008))
    SCENE_DRAWINGS[scene](_Pen(canvas, 0, 0, W * ss, H * ss, line), rng)
    placed: list[tuple[str, tuple[int, int, int, int]]] = []
    for label in rng.sample(labels, n_objects):
        drawing = CHARACTER_DRAWINGS.get(label) or OBJECT_DRAWINGS[label]
        for _ in range(200):  # rejection sampling; later objects are drawn smaller so crowded scenes still fit
            shrink = max(0.4, 1 - 0.06 * len(placed))
            side = max(MIN_OBJECT_PX * ss, round(min(W, H) * ss * rng.uniform(0.15, 0.4) * shrink))
            x, y = rng.uniform(0, W * ss - side), rng.uniform(0, H * ss - side)
            box = (x, y, x + side, y + side)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for _, b in placed):
                break
        else:
            raise DatagenError(f"cannot place {n_objects} objects without overlap in {W}x{H}; "
                               "use fewer objects or a larger size")
        sprite = _sprite(drawing, side, line)
        drawn = _paste(canvas, sprite, x + side / 2, y + sprite.getchannel("A").getbbox()[3])
        placed.append((label, drawn))
    image = canvas.reduce(ss) if ss > 1 else canvas
    return image, [{"label": label, "box": _down(box, ss, W, H)} for label, box in placed]
