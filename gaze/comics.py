"""The COMICS corpus (Iyyer et al. 2017) as a strip source: the paper discovers its gaze heads on it.

    gaze discover --strips comics:/data/raw_panel_images --n-strips 500 ...
    strips = list(comics_strips("/data/raw_panel_images", 500, seed=0))

Layout (the corpus's `raw_panel_images`, as the paper's code reads it): one
folder per comic, panel files named `PAGE_PANEL.jpg` (any common image suffix),
both integers, e.g. `raw_panel_images/1234/17_3.jpg`. Other files are ignored.

Each strip is a window of 6 consecutive panels (by panel number) of one page:
a comic drawn uniformly, then an interior page of it with at least 6 panels
(comics of more than 10 pages lose their first and last 5, covers and back
matter; shorter comics keep every page), then the window's start. The paper's
code falls back to any page when a comic has no interior page of 6 panels; here
such a comic is drawn again instead, so strips come from interior pages only.
The draws come from one stream seeded by `seed` alone and a window is never
drawn twice: `n` strips are the first `n` of that stream (a larger `--n-strips`
extends a smaller run, and the run resumes).

Panels are assembled as the paper does: resized to one height (256 px, keeping
each panel's aspect) side by side, with a 6 px white gap. With `align` (the
model's merged patch size) the height and widths are rounded to multiples of it
and the gap is painted over each border instead of added, as the paper's code
does, so that panel borders stay on token columns.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import ImageDraw

from gaze.strips import IMAGE_SUFFIXES, Strip, StripError, aligned_size, open_image, stitch_widths

N_PANELS = 6  # panels per strip
HEIGHT = 256  # px: the paper's common panel height
GAP = 6  # px of white between panels
MARGIN = 5  # pages dropped at each end of comics longer than 2 * MARGIN pages
DISCOVERY_STRIPS = 500  # strips when no count is given: the paper's discovery set
MAX_DRAWS = 200  # draws per strip before giving up (a corpus with too few eligible pages)


@dataclass(frozen=True)
class Window:
    """Where one strip comes from."""

    comic: str  # the comic's folder name
    page: int
    start: int  # index of the first panel in the page's panel order
    paths: tuple[Path, ...]  # the panel files, in reading order

    @property
    def strip_id(self) -> str:
        return f"{self.comic}-p{self.page}-w{self.start}"


def comic_pages(folder: Path) -> dict[int, list[Path]]:
    """page -> its panel files ordered by panel number, from `PAGE_PANEL.ext` names (others ignored)."""
    pages: dict[int, list[tuple[int, Path]]] = {}
    for p in folder.iterdir():
        parts = p.stem.split("_")
        if p.suffix.lower() in IMAGE_SUFFIXES and len(parts) == 2 and all(x.isdecimal() for x in parts) and p.is_file():
            pages.setdefault(int(parts[0]), []).append((int(parts[1]), p))
    return {page: [p for _, p in sorted(panels)] for page, panels in sorted(pages.items())}


def interior_pages(pages: dict[int, list[Path]], n_panels: int = N_PANELS, margin: int = MARGIN) -> list[int]:
    """Pages a window may come from: not the first or last `margin` pages of a comic of more than `2 * margin`
    pages, and holding at least `n_panels` panels."""
    numbers = sorted(pages)
    inner = numbers[margin:-margin] if len(numbers) > 2 * margin else numbers
    return [p for p in inner if len(pages[p]) >= n_panels]


def comic_folders(root: Path) -> list[str]:
    if not root.is_dir():
        raise StripError(f"COMICS folder {root} not found: give comics:PATH, PATH holding one folder per comic of "
                         "PAGE_PANEL.jpg files (the corpus's raw_panel_images)")
    comics = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not comics:
        raise StripError(f"{root} holds no comic folders: expected {root}/COMIC/PAGE_PANEL.jpg "
                         "(the COMICS corpus's raw_panel_images)")
    return comics


def sample_windows(root: str | Path, n: int, *, seed: int = 0, n_panels: int = N_PANELS) -> Iterator[Window]:
    """The first `n` distinct windows of the stream seeded by `seed` (see the module docstring)."""
    root = Path(root)
    comics = comic_folders(root)
    rng = random.Random(f"comics/{seed}")
    pages_of: dict[str, dict[int, list[Path]]] = {}  # comic -> its pages, listed once
    seen: set[tuple[str, int, int]] = set()
    made = 0
    while made < n:
        for _ in range(MAX_DRAWS):
            comic = comics[rng.randrange(len(comics))]
            pages = pages_of.setdefault(comic, comic_pages(root / comic))
            eligible = interior_pages(pages, n_panels)
            if not eligible:
                continue
            page = eligible[rng.randrange(len(eligible))]
            start = rng.randrange(len(pages[page]) - n_panels + 1)
            if (comic, page, start) not in seen:
                break
        else:
            raise StripError(f"{root}: no new window of {n_panels} consecutive panels on an interior page after "
                             f"{MAX_DRAWS} draws ({made} found): the corpus has too few pages with {n_panels} panels "
                             "for this many strips")
        seen.add((comic, page, start))
        made += 1
        yield Window(comic, page, start, tuple(pages[page][start:start + n_panels]))


def assemble_window(window: Window, *, height: int = HEIGHT, gap: int = GAP, align: int | None = None) -> Strip:
    """One window's panels as a strip: a common height, each panel's own aspect, `gap` px of white between."""
    images = [open_image(p) for p in window.paths]
    h = aligned_size(height, align) if align else height
    widths = [max(1, round(im.size[0] * h / im.size[1])) for im in images]
    if align:
        widths = [aligned_size(w, align) for w in widths]
    first = images[0].resize((widths[0], h))
    image, boxes = stitch_widths([first, *images[1:]], widths, rows=1, cols=len(images), gap=0 if align else gap)
    if align and gap:  # the gutter painted over each border: the borders stay on token columns
        draw = ImageDraw.Draw(image)
        for x0, _, _, _ in boxes[1:]:
            draw.rectangle([x0 - gap // 2, 0, x0 + gap - gap // 2 - 1, h - 1], fill=(255, 255, 255))
    return Strip(image=image, panels=boxes, strip_id=window.strip_id,
                 meta={"source": "comics", "layout": "1x6", "gap": gap, "comic": window.comic, "page": window.page,
                       "start": window.start,
                       "panel_files": [p.name for p in window.paths]})


def comics_strips(root: str | Path, n: int, *, seed: int = 0, height: int = HEIGHT, gap: int = GAP,
                  align: int | None = None) -> Iterator[Strip]:
    """`n` strips sampled from a COMICS folder (seeded, reproducible), assembled as the paper does."""
    for window in sample_windows(root, n, seed=seed):
        yield assemble_window(window, height=height, gap=gap, align=align)


def parse_source(source: str) -> tuple[Path, int]:
    """`comics:PATH` or `comics:PATH@SEED` -> (PATH, SEED)."""
    spec = source.split(":", 1)[1]
    path, sep, seed = spec.rpartition("@")
    if sep and seed.isdecimal():
        return Path(path), int(seed)
    return Path(spec), 0
