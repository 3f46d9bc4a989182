"""Stage 3, letter overlays: one distinct capital letter per panel, legible at any size.

The letters give an exact, judge-free check of where a model looks: ask
"which letter is in the k-th panel?" and compare strings. Per panel:

- size: 28-42% of the panel side (at least 10 px), from a scalable font;
- position: a few seeded candidates; the one covering least of the drawn
  objects wins, so the letter rarely hides the character it sits beside;
- colour: a palette colour far from the mean colour under the letter, with a
  black or white outline (stroke) opposite to the letter's own lightness, so
  it stays readable on any background.

The font is Pillow's bundled scalable font (`ImageFont.load_default(size=...)`,
FreeType, Pillow >= 10.1), so the pixels do not depend on the fonts a machine
has installed; pass a .ttf path (e.g. DejaVuSans-Bold.ttf) to use another.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from datagen.story import DatagenError

# I and O are left out: at 10-20 px they read as a bar and a ring (and a drawn ball).
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"
PALETTE = ((230, 25, 25), (25, 60, 230), (0, 150, 40), (255, 215, 0), (220, 0, 220), (0, 200, 230),
           (255, 255, 255), (15, 15, 15))
MIN_FONT_PX = 10
FONT_SHARE = (0.28, 0.42)  # a letter's font size, as a share of the panel's shorter side
CANDIDATES = 8  # positions tried per letter


def choose_letters(seed: int, n: int = 6, alphabet: str = LETTERS) -> tuple[str, ...]:
    """`n` distinct letters for one strip, seeded."""
    if n > len(set(alphabet)):
        raise DatagenError(f"{n} distinct letters need an alphabet of at least {n}; got {alphabet!r}")
    return tuple(random.Random(f"letters/{seed}").sample(sorted(set(alphabet)), n))


@lru_cache(maxsize=256)
def letter_font(px: int, path: str | None = None) -> ImageFont.FreeTypeFont:
    """A scalable font at `px` pixels: Pillow's bundled one, or the .ttf/.otf at `path`."""
    if not features.check("freetype2"):
        raise DatagenError("this Pillow has no FreeType, so no scalable font; install Pillow from PyPI wheels")
    if path is None:
        return ImageFont.load_default(size=px)
    try:
        return ImageFont.truetype(path, px)
    except OSError:
        raise DatagenError(f"cannot read font {path!r}; give a .ttf/.otf file or leave --letter-font unset") from None


def _overlap(a: Sequence[int], b: Sequence[int]) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def font_px(side: int, rng: random.Random) -> int:
    """A letter's font size for a panel whose shorter side is `side` px (seeded by `rng`)."""
    return max(MIN_FONT_PX, round(side * rng.uniform(*FONT_SHARE)))


def stroke_px(px: int) -> int:
    """The outline width of a `px` letter."""
    return max(1, round(px / 14))


def outline_colour(colour: Sequence[int]) -> tuple[int, int, int]:
    """Black or white: the opposite lightness of the letter's own `colour`."""
    return (0, 0, 0) if sum(colour) > 384 else (255, 255, 255)


def mean_colour(image: Image.Image, box: Sequence[int]) -> list[float]:
    """The mean of each band (the first three at most) over `box` of `image`, as `ImageStat.Stat(
    image.crop(box)).mean[:3]` gives it, to the last bit (integer sums, one division), without its
    Python loop over the histogram (a tenth of a millisecond a letter: most of a letter sheet's drawing)."""
    pixels = np.asarray(image.crop(tuple(box)))
    pixels = pixels.reshape(-1, 1 if pixels.ndim == 2 else pixels.shape[-1])
    count = pixels.shape[0]
    return [int(total) / count if count else 0 for total in pixels.sum(0, dtype=np.int64)[:3]]


def far_colour(background: Sequence[float], rng: random.Random) -> tuple[int, int, int]:
    """A palette colour far (RGB distance >= 160) from `background`; the farthest if none is."""
    dist = [sum((c - b) ** 2 for c, b in zip(col, background)) ** 0.5 for col in PALETTE]
    far = [col for col, d in zip(PALETTE, dist) if d >= 160]
    return rng.choice(far) if far else PALETTE[dist.index(max(dist))]


def draw_letter(image: Image.Image, letter: str, rng: random.Random, avoid: Sequence[Sequence[int]] = (),
                font_path: str | None = None) -> list[int]:
    """Draw `letter` on `image` in place; return its ink box [x0, y0, x1, y1] (outline included).

    `avoid`: boxes (e.g. the panel's objects) the letter should cover as little as possible.
    """
    W, H = image.size
    px = font_px(min(W, H), rng)
    font = letter_font(px, font_path)
    stroke = stroke_px(px)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = draw.textbbox((0, 0), letter, font=font, anchor="mm", stroke_width=stroke)
    if x1 - x0 > W or y1 - y0 > H:
        raise DatagenError(f"a {px}px letter does not fit a {W}x{H} panel; use panels of at least 16 px")
    best = None
    for _ in range(CANDIDATES):
        cx, cy = rng.randint(-x0, W - x1), rng.randint(-y0, H - y1)  # keeps the whole letter inside
        box = [cx + x0, cy + y0, cx + x1, cy + y1]
        cover = sum(_overlap(box, b) for b in avoid)
        if best is None or cover < best[0]:
            best = (cover, cx, cy, box)
    _, cx, cy, box = best
    colour = far_colour(mean_colour(image, box), rng)
    outline = outline_colour(colour)
    draw.text((cx, cy), letter, fill=colour, font=font, anchor="mm", stroke_width=stroke, stroke_fill=outline)
    return box


def overlay_letters(images: Sequence[Image.Image], seed: int, avoid: Sequence[Sequence[Sequence[int]]] | None = None,
                    font_path: str | None = None) -> tuple[tuple[str, ...], list[list[int]]]:
    """Draw a distinct letter on each panel image (in place); return the letters and their boxes (panel pixels)."""
    letters = choose_letters(seed, len(images))
    rng = random.Random(f"letter-placement/{seed}")
    boxes = [draw_letter(im, letter, rng, avoid[k] if avoid else (), font_path)
             for k, (im, letter) in enumerate(zip(images, letters))]
    return letters, boxes
