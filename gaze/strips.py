"""Comic strips: the testbed of gaze-head discovery.

A `Strip` is ONE image plus the pixel box of each panel in reading order (and,
when known, a caption and an overlaid letter per panel). Strips come from:

- `stitch_panels`: separate panel images laid out in a grid with a thin gap;
- `load_folder_strip`: a folder `comicN/` holding `p1.png .. p6.png` (the layout
  of the paper's published data), optionally with `captions.json`;
- `load_strips`: a source string, the entry point of every CLI (`--strips`):
  a folder of comic folders, a Hugging Face dataset (local folder or hub id) in
  the project's schema or the paper's, or a single image split into panels.

Panel sizes are aligned to the model's merged patch size where possible
(`align`), so that panel borders fall on token columns.

Every image is opened through `open_image` (files) or `_to_image` (dataset
cells), which read the size from the header and refuse an image of more than
`MAX_PIXELS` pixels before decoding it (a small file can hold a huge image: a
decompression bomb).

Errors name the Python argument and, in brackets, the `gaze` flag it comes
from (`split=` / `--split`): the same messages serve the API and the CLIs.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from PIL import Image, UnidentifiedImageError

from gaze.errors import GazeError

Rect = tuple[float, float, float, float]  # (x0, y0, x1, y1) pixels of an image, x1/y1 exclusive (panels: integers)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_PIXELS = 40_000_000  # 40 megapixels (e.g. 8000 x 5000): far above any strip, far below a decompression bomb


class StripError(GazeError):
    """Bad strip input; the message says how to fix it."""


@dataclass(frozen=True)
class Strip:
    """One strip image and its panels in reading order."""

    image: Image.Image  # the whole strip, RGB
    panels: tuple[Rect, ...]  # pixel box of each panel, reading order
    strip_id: str = "strip"  # stable id (folder name, dataset row id)
    captions: tuple[str, ...] | None = None  # one short caption per panel, when known
    letters: tuple[str, ...] | None = None  # overlaid letter per panel, when known
    meta: dict = field(default_factory=dict, compare=False)  # anything else (story, style, ...)

    def __post_init__(self):
        n = len(self.panels)
        if n == 0:
            raise StripError(f"strip {self.strip_id!r} has no panels")
        for name in ("captions", "letters"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise StripError(f"strip {self.strip_id!r}: {len(value)} {name} for {n} panels; give one per panel")
        w, h = self.image.size
        for k, box in enumerate(self.panels):
            if not _is_box(box):
                raise StripError(f"strip {self.strip_id!r}: panel {k + 1} box {box!r} is not four numbers "
                                 "x0,y0,x1,y1; fix its panel_boxes")
            x0, y0, x1, y1 = box
            if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
                raise StripError(
                    f"strip {self.strip_id!r}: panel {k + 1} box {(x0, y0, x1, y1)} is not inside the {w}x{h} image"
                )

    @property
    def n_panels(self) -> int:
        return len(self.panels)

    def content_hash(self) -> str:
        """A short hash of what a gaze score depends on: the image's pixels and the panel boxes."""
        h = hashlib.sha256()
        h.update(f"{self.image.mode}{self.image.size}{self.panels}".encode())
        h.update(self.image.tobytes())
        return h.hexdigest()[:16]


def _is_box(box) -> bool:
    """Four finite real numbers (Python or NumPy; not booleans, strings or None)."""
    return (isinstance(box, (tuple, list)) and len(box) == 4
            and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in box))


def int_boxes(boxes, where: str) -> tuple[tuple[int, int, int, int], ...]:
    """Panel boxes (a dataset's `panel_boxes`, or `panel_boxes=`) as integer pixel boxes, or a StripError naming
    `where` when they are not a list of four numbers each."""
    if not isinstance(boxes, (list, tuple)) or not boxes or not all(_is_box(b) for b in boxes):
        raise StripError(f"{where}: panel_boxes {boxes!r} are not boxes x0,y0,x1,y1 (four finite numbers each, "
                         "one per panel); fix them")
    return tuple(tuple(int(v) for v in b) for b in boxes)


def aligned_size(size: int, align: int) -> int:
    """`size` rounded to the nearest multiple of `align` (at least one `align`)."""
    return max(align, int(round(size / align)) * align)


def stitch_panels(
    panels: Sequence[Image.Image],
    *,
    rows: int = 1,
    cols: int | None = None,
    gap: int = 0,
    cell: tuple[int, int] | None = None,
    align: int | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
) -> tuple[Image.Image, tuple[Rect, ...]]:
    """Lay panels out on a grid, reading order row by row, and return (strip, boxes).

    Every panel is resized to one cell size: `cell` (w, h) if given, else the first
    panel's size. With `align` (the model's merged patch size in pixels, e.g. 32 for
    Qwen3-VL), the cell AND the gap are rounded to multiples of it so that panel
    borders fall exactly on token columns; a gap of 0 is allowed.
    """
    if not panels:
        raise StripError("no panels to stitch")
    cols = cols if cols is not None else math.ceil(len(panels) / rows)
    if rows * cols < len(panels):
        raise StripError(f"{len(panels)} panels do not fit a {rows}x{cols} grid")
    cw, ch = cell if cell is not None else panels[0].size
    if align:
        cw, ch = aligned_size(cw, align), aligned_size(ch, align)
        gap = 0 if gap == 0 else aligned_size(gap, align)
    width = cols * cw + (cols - 1) * gap
    height = rows * ch + (rows - 1) * gap
    strip = Image.new("RGB", (width, height), background)
    boxes = []
    for i, panel in enumerate(panels):
        r, c = divmod(i, cols)
        x0, y0 = c * (cw + gap), r * (ch + gap)
        strip.paste(panel.convert("RGB").resize((cw, ch), Image.BICUBIC), (x0, y0))
        boxes.append((x0, y0, x0 + cw, y0 + ch))
    return strip, tuple(boxes)


OFFICIAL_HEIGHT, OFFICIAL_MULTIPLE, OFFICIAL_GAP = 256, 32, 6  # the official code's strips (docs/paper-protocol.md)


def paint_seams(image: Image.Image, boxes: Sequence[Rect], gap: int = OFFICIAL_GAP) -> Image.Image:
    """A copy of `image` with `gap` px of white painted over each seam between consecutive abutting panels
    (gap // 2 px left of the seam, the rest right of it): the official code's gaps, which leave the panel boxes
    and the strip's width as they were."""
    from PIL import ImageDraw

    image = image.copy()
    draw = ImageDraw.Draw(image)
    for box in boxes[:-1]:
        x = int(box[2])
        draw.rectangle([x - gap // 2, int(box[1]), x + (gap - gap // 2) - 1, int(box[3]) - 1], fill="white")
    return image


def stitch_official(panels: Sequence[Image.Image], *, height: int = OFFICIAL_HEIGHT, multiple: int = OFFICIAL_MULTIPLE,
                    gap: int = OFFICIAL_GAP) -> tuple[Image.Image, tuple[Rect, ...]]:
    """Panels left to right as the paper's official code assembles a strip: each resized to the common height
    (rounded to a multiple of `multiple`) keeping its aspect, its width rounded to a multiple too, pasted
    abutting, then `gap` px of white painted over each seam (`paint_seams`). Returns (strip, boxes)."""
    if not panels:
        raise StripError("no panels to stitch")
    h = aligned_size(height, multiple)
    widths = [aligned_size(int(p.size[0] * h / max(p.size[1], 1)), multiple) for p in panels]
    strip = Image.new("RGB", (sum(widths), h), (255, 255, 255))
    boxes, x = [], 0
    for panel, w in zip(panels, widths):
        strip.paste(panel.convert("RGB").resize((w, h), Image.LANCZOS), (x, 0))
        boxes.append((x, 0, x + w, h))
        x += w
    return paint_seams(strip, boxes, gap), tuple(boxes)


def _stitched(images, *, assembly: str, gap: int, align: int | None, cell=None, height: int = OFFICIAL_HEIGHT):
    if assembly == "official":
        return stitch_official(images, height=height)
    if assembly != "grid":
        raise StripError(f"unknown strip assembly {assembly!r}: use 'grid' or 'official'")
    return stitch_panels(images, gap=gap, align=align, cell=cell)


def stitch_widths(images: Sequence[Image.Image], widths: Sequence[int], *, rows: int, cols: int, gap: int,
                  background: tuple[int, int, int] = (255, 255, 255)) -> tuple[Image.Image, tuple]:
    """The paper's assembly: every panel resized to the common height (the first panel's) and its own width
    from `widths`, laid out row by row with `gap` px of `background` between panels and rows; a row shorter
    than the widest is padded on its right. Returns (strip, panel boxes in reading order)."""
    height = images[0].size[1]
    row_widths = [sum(widths[r * cols:(r + 1) * cols]) + gap * (cols - 1) for r in range(rows)]
    strip = Image.new("RGB", (max(row_widths), rows * height + (rows - 1) * gap), background)
    boxes = []
    for k, (im, w) in enumerate(zip(images, widths)):
        r, c = divmod(k, cols)
        x0 = sum(widths[r * cols:r * cols + c]) + gap * c
        y0 = r * (height + gap)
        strip.paste(im.convert("RGB").resize((w, height), Image.BICUBIC), (x0, y0))
        boxes.append((x0, y0, x0 + w, y0 + height))
    return strip, tuple(boxes)


def equal_panels(size: tuple[int, int], n: int, rows: int = 1) -> tuple[Rect, ...]:
    """Boxes of `n` equal panels covering an image of `size` (w, h): `rows` rows, reading order."""
    if n < 1 or rows < 1 or n % rows:
        raise StripError(f"cannot split an image into {n} panels on {rows} rows; use a panel count divisible by rows")
    w, h = size
    cols = n // rows
    boxes = []
    for i in range(n):
        r, c = divmod(i, cols)
        boxes.append((round(c * w / cols), round(r * h / rows), round((c + 1) * w / cols), round((r + 1) * h / rows)))
    return tuple(boxes)


def _decoded(src, where: str) -> Image.Image:
    """Decode an image file or stream as RGB; its size is read from the header and refused above MAX_PIXELS
    before any pixel is decoded."""
    try:
        with Image.open(src) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise StripError(f"{where} is {w}x{h} pixels ({w * h / 1e6:.0f} megapixels), more than the "
                                 f"{MAX_PIXELS / 1e6:.0f} megapixels gaze opens; give a smaller image")
            return im.convert("RGB")
    except FileNotFoundError:
        raise StripError(f"image not found: {where}") from None
    except Image.DecompressionBombError as e:  # PIL's own limit (far above MAX_PIXELS) refuses it in Image.open
        raise StripError(f"{where} is more than the {MAX_PIXELS / 1e6:.0f} megapixels gaze opens ({e}); "
                         "give a smaller image") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        if isinstance(e, StripError):
            raise
        raise StripError(f"cannot read image {where}: {e}; replace or remove the file") from None


def open_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, with an error that names the file when it cannot be read or is too large
    (more than MAX_PIXELS pixels, refused from its header before decoding)."""
    return _decoded(path, str(path))


def panel_files(folder: Path, n_panels: int = 6) -> list[Path]:
    """`p1.png .. pN.png` (any common image suffix) in `folder`, with a clear error when one is missing."""
    found = []
    for k in range(1, n_panels + 1):
        matches = [folder / f"p{k}{s}" for s in IMAGE_SUFFIXES if (folder / f"p{k}{s}").exists()]
        if not matches:
            raise StripError(f"{folder}: panel p{k} is missing (expected p1.png .. p{n_panels}.png)")
        found.append(matches[0])
    extra = [p.name for p in folder.iterdir()
             if p.stem.startswith("p") and p.stem[1:].isdecimal() and int(p.stem[1:]) > n_panels]
    if extra:
        raise StripError(f"{folder}: found {sorted(extra)} beyond p{n_panels}; this strip has more than {n_panels} panels")
    return found


def load_folder_strip(
    folder: str | Path, *, n_panels: int = 6, gap: int = 0, align: int | None = None,
    cell: tuple[int, int] | None = None, assembly: str = "grid", height: int = OFFICIAL_HEIGHT,
) -> Strip:
    """A strip from `folder/p1.png .. pN.png`, stitched left to right (`assembly` "grid": `stitch_panels`;
    "official": `stitch_official` at `height`).

    `captions.json` (a list of N strings, or {"captions": [...], "letters": [...]})
    beside the panels travels with the strip.
    """
    folder = Path(folder)
    images = [open_image(p) for p in panel_files(folder, n_panels)]
    image, boxes = _stitched(images, assembly=assembly, gap=gap, align=align, cell=cell, height=height)
    captions = letters = None
    meta: dict = {}
    meta_file = folder / "captions.json"
    if meta_file.exists():
        data = json.loads(meta_file.read_text())
        if isinstance(data, list):
            data = {"captions": data}
        captions = tuple(data["captions"]) if data.get("captions") else None
        letters = tuple(data["letters"]) if data.get("letters") else None
        meta = {k: v for k, v in data.items() if k not in ("captions", "letters")}
    return Strip(image=image, panels=boxes, strip_id=folder.name, captions=captions, letters=letters, meta=meta)


def save_folder_strip(strip: Strip, folder: str | Path) -> Path:
    """Write `strip` as `folder/p1.png .. pN.png` (+ `captions.json`): the inverse of `load_folder_strip`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for k, box in enumerate(strip.panels, start=1):
        strip.image.crop(box).save(folder / f"p{k}.png")
    data = {"captions": list(strip.captions) if strip.captions else None,
            "letters": list(strip.letters) if strip.letters else None, **strip.meta}
    (folder / "captions.json").write_text(json.dumps(data, indent=1))
    return folder


def iter_comic_folders(root: Path) -> Iterator[Path]:
    """Comic folders under `root` in natural order (comic2 before comic10)."""
    def key(p: Path):
        digits = "".join(ch for ch in p.name if ch.isdecimal())  # not isdigit: int('²') fails
        return (int(digits) if digits else -1, p.name)

    return iter(sorted((p for p in root.iterdir() if p.is_dir()), key=key))


def _is_dataset_folder(path: Path) -> bool:
    return any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")) or any(
        path.glob("**/*.parquet")
    )


# ---------------------------------------------------------------- dataset schemas
# Dataset schemas a strip can be read from, detected from the columns.
#
# - project: one strip image column (`strip`) and its `panel_boxes`
#   (plus `captions`, `letters`, `strip_id` when present), as written by `datagen`;
# - paper: six image columns `panel_1 .. panel_6` (the published
#   `baulab/openai-comic-strips` layout), a `comic_id`, and per-panel captions as
#   six `caption_k`-style columns or one list column; panels are stitched
#   exactly as for the folder layout `comicN/p1.png .. p6.png`.
#
# A dataset in no known schema gets an error listing the columns found and the
# ones expected.

STRIP_COLUMNS = ("strip", "image")
BOX_COLUMNS = ("panel_boxes",)
ID_COLUMNS = ("strip_id", "comic_id", "id")
PANEL_COLUMN = re.compile(r"^panel_?(\d+)$")
CAPTION_COLUMN = re.compile(r"^(?:caption|panel_caption|panel_\d+_caption)_?(\d+)?$")
CAPTION_LIST_COLUMNS = ("captions", "panel_captions")


def _panel_columns(columns) -> list[str]:
    found = sorted(((int(m.group(1)), c) for c in columns if (m := PANEL_COLUMN.match(c))), key=lambda t: t[0])
    return [c for _, c in found]


def _caption_columns(columns, n: int) -> list[str] | None:
    for pattern in ("caption_{k}", "caption{k}", "panel_{k}_caption", "panel_caption_{k}"):
        cols = [pattern.format(k=k) for k in range(1, n + 1)]
        if all(c in columns for c in cols):
            return cols
    return None


def detect(columns) -> str:
    """'project' or 'paper', or a StripError naming what was found and what is expected."""
    columns = list(columns)
    if any(c in columns for c in STRIP_COLUMNS) and any(c in columns for c in BOX_COLUMNS):
        return "project"
    panels = _panel_columns(columns)
    if len(panels) >= 2:
        return "paper"
    raise StripError(
        f"dataset columns {columns} match no known strip schema: expected either a strip image column "
        f"({' or '.join(STRIP_COLUMNS)}) with 'panel_boxes' (project schema), or image columns "
        "panel_1 .. panel_6 with per-panel captions (paper schema)"
    )


def _to_image(value, where: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        import io

        return _decoded(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"], f"{where}'s image")
    raise StripError(f"{where}: missing image")


def strip_from_row(row: dict, index: int, *, align: int | None = None, gap: int = 0, assembly: str = "grid",
                   height: int = OFFICIAL_HEIGHT) -> Strip:
    """Convert one dataset row (either schema) to a `Strip` (separate panels stitched by `assembly`, as
    `load_folder_strip` does; a project-schema strip keeps its own image)."""
    columns = list(row)
    schema = detect(columns)
    strip_id = next((str(row[c]) for c in ID_COLUMNS if c in row and row[c] is not None), f"row{index}")
    meta = {k: row[k] for k in ("story", "style", "protagonist", "seed", "renderer", "model_id") if k in row}
    if schema == "project":
        image = _to_image(row[next(c for c in STRIP_COLUMNS if c in row)], f"strip {strip_id}")
        boxes = int_boxes(row["panel_boxes"], f"strip {strip_id}")
        captions = tuple(row["captions"]) if row.get("captions") else None
        letters = tuple(row["letters"]) if row.get("letters") else None
        return Strip(image=image, panels=boxes, strip_id=strip_id, captions=captions, letters=letters, meta=meta)
    panel_cols = _panel_columns(columns)
    images = []
    for k, col in enumerate(panel_cols, start=1):
        if row.get(col) is None:
            raise StripError(f"comic {strip_id}: panel {k} ({col}) is missing; pass skip_bad=True (--skip-bad) to "
                             "skip such rows")
        images.append(_to_image(row[col], f"comic {strip_id} panel {k}"))
    image, boxes = _stitched(images, assembly=assembly, gap=gap, align=align, height=height)
    captions = None
    cap_cols = _caption_columns(columns, len(panel_cols))
    if cap_cols:
        captions = tuple(str(row[c]) for c in cap_cols)
    else:
        for c in CAPTION_LIST_COLUMNS:
            if isinstance(row.get(c), (list, tuple)) and len(row[c]) == len(panel_cols):
                captions = tuple(str(x) for x in row[c])
                break
    return Strip(image=image, panels=boxes, strip_id=strip_id, captions=captions, meta=meta)


def open_dataset(source: str, split: str | None = None):
    """A `datasets.Dataset` from a `save_to_disk` folder, a folder of Parquet files, or a hub id."""
    import datasets

    path = Path(source)
    if path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
        ds = datasets.load_from_disk(str(path))
    else:
        # a local folder of Parquet files (splits from file names, as on the Hub) or a hub id
        if path.is_dir():
            ds = datasets.load_dataset(str(path))
        else:
            try:
                ds = datasets.load_dataset(source, split=split)
            except (OSError, ConnectionError, ValueError) as e:  # missing, unreachable, offline, no such split
                raise StripError(f"cannot open the dataset {source!r} (a hub id, as there is no such folder here): "
                                 f"{str(e).splitlines()[0][:200]}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) == 1:
                return next(iter(ds.values()))
            raise StripError(f"{source} has splits {sorted(ds)}: choose one with split= (--split)")
        if split not in ds:
            raise StripError(f"{source} has no split {split!r}; its splits are {sorted(ds)}: choose one with "
                             "split= (--split)")
        return ds[split]
    return ds


def check_source(source: str | Path) -> None:
    """Refuse, before any work, a strip source that is no local path and cannot be a hub id (a missing folder)."""
    from gaze.errors import is_hub_id

    if str(source).startswith("comics:"):
        from gaze.comics import comic_folders, parse_source

        comic_folders(parse_source(str(source))[0])
        return
    if Path(source).exists():
        return
    if not is_hub_id(source):
        raise StripError(f"strip source {source} not found: no such folder or image here (and it is not a hub id "
                         "OWNER/NAME); give a folder of comic folders, a dataset folder, an image, or a hub id")


def load_strips(
    source: str | Path,
    *,
    n_strips: int | None = None,
    n_panels: int = 6,
    align: int | None = None,
    gap: int = 0,
    split: str | None = None,
    start: int = 0,
    skip_bad: bool = False,
    on_skip=None,
    panel_boxes: Sequence[Rect] | None = None,
    assembly: str = "grid",
    height: int = OFFICIAL_HEIGHT,
) -> Iterator[Strip]:
    """Strips from a `--strips` source, lazily, in a stable order.

    - a folder of comic folders (`comicN/p1.png .. p6.png`), or one comic folder;
    - a Hugging Face dataset: a `save_to_disk` folder, a folder of Parquet files,
      or a hub id (project schema: `strip` image + `panel_boxes`; paper schema:
      `panel_1 .. panel_6` images);
    - one image file with its `panel_boxes`, or split into `n_panels` equal panels left to right;
    - `comics:PATH[@SEED]`: windows of 6 consecutive panels sampled from the COMICS corpus (`gaze.comics`,
      the paper's discovery strips; `n_strips` of them, default 500 as the paper; `gap` does not apply).

    Separate panels (comic folders, paper-schema rows) are stitched by `assembly`: "grid" (`stitch_panels`,
    one cell size, `gap` and `align`) or "official" (`stitch_official` at `height`: the official code's).

    A strip with a missing or unreadable panel is an error naming it, unless
    `skip_bad`: then it is skipped and reported to `on_skip(strip_id, reason)`
    (default: printed to stderr), never silently.
    """
    if on_skip is None:
        def on_skip(strip_id: str, reason: str) -> None:
            import sys

            print(f"skipping {strip_id}: {reason}", file=sys.stderr)

    def guarded(make, strip_id: str):
        try:
            return make()
        except StripError as e:
            if not skip_bad:
                raise
            on_skip(strip_id, str(e))
            return None

    if str(source).startswith("comics:"):
        import itertools

        from gaze.comics import DISCOVERY_STRIPS, comics_strips, parse_source

        root, seed = parse_source(str(source))
        total = start + (DISCOVERY_STRIPS if n_strips is None else n_strips)
        yield from itertools.islice(comics_strips(root, total, seed=seed, align=align), start, None)
        return
    path = Path(source)
    stop = None if n_strips is None else start + n_strips
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise StripError(f"{path} is not an image ({', '.join(IMAGE_SUFFIXES)}) nor a strip folder or dataset")
        image = open_image(path)
        boxes = int_boxes(panel_boxes, f"{path}") if panel_boxes else equal_panels(image.size, n_panels)
        yield Strip(image=image, panels=boxes, strip_id=path.stem)
        return
    if path.is_dir() and not _is_dataset_folder(path):
        if any((path / f"p1{s}").exists() for s in IMAGE_SUFFIXES):
            yield load_folder_strip(path, n_panels=n_panels, align=align, gap=gap, assembly=assembly, height=height)
            return
        folders = list(iter_comic_folders(path))
        if not folders:
            raise StripError(
                f"{path} holds no comic folders: expected comicN/p1.png .. p{n_panels}.png, a dataset, or an image"
            )
        for folder in folders[start:stop]:
            strip = guarded(lambda: load_folder_strip(folder, n_panels=n_panels, align=align, gap=gap,
                                                      assembly=assembly, height=height), folder.name)
            if strip is not None:
                yield strip
        return
    check_source(source)
    rows = open_dataset(str(source), split=split)
    end = len(rows) if stop is None else stop
    if start < 0 or start >= len(rows) or end > len(rows):
        raise StripError(f"rows {start}..{end - 1} are outside {source} ({len(rows)} rows): give start= and n_strips= "
                         f"(--start, --n-strips) within 0..{len(rows) - 1}")
    for i in range(start, end):
        row = rows[i]
        strip_id = str(next((row[c] for c in ("strip_id", "comic_id", "id") if c in row), f"row{i}"))
        strip = guarded(lambda: strip_from_row(row, i, align=align, gap=gap, assembly=assembly, height=height),
                        f"comic {strip_id}")
        if strip is not None:
            yield strip
