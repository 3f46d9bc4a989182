"""Stage 4, strip assembly: six panels -> one `gaze.strips.Strip`, boxes in strip pixels.

Stitching is `gaze.strips.stitch_panels` (the same code the rest of the
project uses), on a grid given by the layout: "1x6" (rows x columns, one row
left to right, the default), "2x3" or "3x2"; reading order is row by row and
recorded per panel as [row, column].

Alignment: a VLM cuts the strip into merged patches (Qwen3-VL: 32 px, Qwen2-VL:
28 px). If the panel side and the gap are multiples of that size (`align`),
every panel border falls on a token border and each image token belongs to
exactly one panel. Sizes that do not align are refused rather than resized,
so the drawn boxes (letters, objects) stay exact.
"""

from __future__ import annotations

from typing import Sequence

from PIL import Image

from gaze.strips import Strip, stitch_panels, stitch_widths  # noqa: F401  (stitch_widths: re-exported)
from datagen.renderers import MIN_PANEL_SIZE
from datagen.story import DatagenError

LAYOUTS = {"1x6": (1, 6), "2x3": (2, 3), "3x2": (3, 2)}  # name -> (rows, columns)


def parse_layout(layout: str) -> tuple[int, int]:
    """(rows, columns) of a layout name, with an error that lists the choices."""
    if layout not in LAYOUTS:
        raise DatagenError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[layout]


def check_geometry(panel_size: int, gap: int, layout: str, align: int | None) -> None:
    """Raise DatagenError, naming the fix, if these sizes cannot make an aligned strip."""
    parse_layout(layout)
    if not isinstance(panel_size, int) or panel_size < MIN_PANEL_SIZE:
        raise DatagenError(f"panel size {panel_size!r} is impossible; use an integer of at least {MIN_PANEL_SIZE} px")
    if not isinstance(gap, int) or gap < 0:
        raise DatagenError(f"gap {gap!r} is impossible; use 0 or a positive number of pixels")
    if align is None:
        return
    if not isinstance(align, int) or align < 1:
        raise DatagenError(f"align {align!r} is impossible; give the model's merged patch size in px (e.g. 32)")
    if panel_size % align:
        lo = max(align, panel_size // align * align)
        raise DatagenError(f"panel size {panel_size} does not fall on the {align}-px token grid; "
                           f"use a multiple of {align} (e.g. {lo} or {lo + align}) or another --align")
    if gap % align:
        raise DatagenError(f"gap {gap} does not fall on the {align}-px token grid; use 0 or a multiple of {align}")


def reading_order(layout: str) -> list[list[int]]:
    """[row, column] of each panel in reading order (row by row, left to right)."""
    rows, cols = parse_layout(layout)
    return [[k // cols, k % cols] for k in range(rows * cols)]


def _scale_box(box: Sequence[int], sx: float, dx: int, dy: int) -> list[int]:
    """A panel-pixel box after the panel was stretched by `sx` horizontally, moved to (dx, dy)."""
    return [round(box[0] * sx) + dx, box[1] + dy, round(box[2] * sx) + dx, box[3] + dy]


def _shift(box: Sequence[int], dx: int, dy: int) -> list[int]:
    return [box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy]


def assemble(
    images: Sequence[Image.Image],
    *,
    layout: str = "1x6",
    gap: int = 0,
    align: int | None = None,
    strip_id: str = "strip",
    captions: Sequence[str] | None = None,
    letters: Sequence[str] | None = None,
    letter_boxes: Sequence[Sequence[int]] | None = None,
    object_boxes: Sequence[Sequence[dict]] | None = None,
    meta: dict | None = None,
    widths: Sequence[int] | None = None,
) -> Strip:
    """Stitch equal square panels into a Strip; panel-pixel boxes become strip-pixel boxes.

    With `widths` (one per panel, px) the panels keep their common height and
    are stretched to those widths, as the paper assembles strips (panels of
    varying aspect at one height, `gap` px of white between them); borders then
    need not fall on token columns, so `align` must be None.

    `meta` is copied into `strip.meta` beside "letter_boxes", "object_boxes",
    "reading_order", "layout" and "gap".
    """
    rows, cols = parse_layout(layout)
    if len(images) != rows * cols:
        raise DatagenError(f"layout {layout} holds {rows * cols} panels; got {len(images)}")
    size = images[0].size
    if any(im.size != size for im in images) or size[0] != size[1]:
        raise DatagenError(f"panels must be squares of one size; got {sorted({im.size for im in images})}")
    check_geometry(size[0], gap, layout, align)
    if widths is not None:
        if align is not None:
            raise DatagenError("panel widths of their own do not fall on a token grid: give align=None with widths")
        if len(widths) != len(images) or any(int(w) < 1 for w in widths):
            raise DatagenError(f"give one positive width per panel ({len(images)}), got {list(widths)}")
        image, panels = stitch_widths(images, [int(w) for w in widths], rows=rows, cols=cols, gap=gap)
    else:
        image, panels = stitch_panels(images, rows=rows, cols=cols, gap=gap, align=align)
    offsets = [(x0, y0) for x0, y0, _, _ in panels]
    sx = [(b[2] - b[0]) / size[0] for b in panels]  # horizontal stretch of each panel
    has_letters, has_objects = letter_boxes is not None, object_boxes is not None
    return Strip(
        image=image,
        panels=panels,
        strip_id=strip_id,
        captions=tuple(captions) if captions is not None else None,
        letters=tuple(letters) if letters is not None else None,
        meta={
            **(meta or {}),
            "letter_boxes": [_scale_box(b, x, *o) for b, x, o in zip(letter_boxes, sx, offsets)] if has_letters else None,
            "object_boxes": [[{"label": ob["label"], "box": _scale_box(ob["box"], x, *o)} for ob in obs]
                             for obs, x, o in zip(object_boxes, sx, offsets)] if has_objects else None,
            "reading_order": reading_order(layout),
            "layout": layout,
            "gap": gap,
        },
    )
