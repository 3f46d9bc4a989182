"""Where each image token looks: token positions -> pixel cells -> regions.

A VLM prompt holds the image as a run of image tokens; each stands for one cell
of the merged patch grid laid over the (resized) image. `ImageLayout` records,
for every image token, its position in the sequence and its pixel cell in the
ORIGINAL image's coordinates, so everything downstream (panels, boxes, heat
maps) is family-agnostic: a family only has to build the layout.

A `RegionMap` is a [regions, image tokens] 0/1 membership matrix: panels of a
strip (disjoint) or arbitrary pixel boxes (possibly overlapping). A token
belongs to a region when its cell CENTRE lies inside the region's box, which
splits panel columns proportionally even when a panel's width is not a
multiple of the merged patch size ("centre" mapping). The paper's official code
maps panels differently ("proportional"): the token grid's columns are cut in
proportion to the panel widths, every column going to some panel, gaps included
(`proportional_columns`); the two agree when panels abut on token columns.

All functions here are pure: tensors in, tensors out, no model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from gaze.errors import GazeError
from gaze.strips import Rect, equal_panels  # (x0, y0, x1, y1) pixels of the original image



class RegionError(GazeError):
    """A region that cannot be mapped onto image tokens; the message says how to fix it."""


@dataclass(frozen=True)
class ImageLayout:
    """The image tokens of one prompt and the pixel cell each stands for."""

    positions: torch.Tensor  # [T] long: sequence positions of the image tokens, ascending
    cells: torch.Tensor  # [T, 4] float: (x0, y0, x1, y1) of each token's cell, original-image pixels
    image_size: tuple[int, int]  # (width, height) of the original image
    grid: tuple[int, int] | None = None  # (rows, cols) of the token grid when tokens form one row-major grid

    @property
    def n_tokens(self) -> int:
        return int(self.positions.numel())

    @property
    def centres(self) -> torch.Tensor:
        return torch.stack(
            [(self.cells[:, 0] + self.cells[:, 2]) / 2, (self.cells[:, 1] + self.cells[:, 3]) / 2], dim=-1
        )  # [T, 2] (x, y)

    def shifted(self, offset: int) -> "ImageLayout":
        """The same layout with sequence positions moved by `offset` (e.g. left padding)."""
        return ImageLayout(self.positions + offset, self.cells, self.image_size, self.grid)


def find_image_span(input_ids: torch.Tensor, image_token_id: int) -> tuple[int, int]:
    """(start, end) of the single contiguous run of image tokens in a 1-D id sequence.

    Raises when there is no image token (the prompt was built without the image,
    or the model is not a VLM) or when the image tokens are not contiguous
    (several images: pass one image per prompt).
    """
    ids = torch.as_tensor(input_ids).reshape(-1)
    where = (ids == image_token_id).nonzero().flatten()
    if where.numel() == 0:
        raise RegionError(
            "no image tokens in the prompt: build it with the processor and an image "
            "(the chat message needs an {'type': 'image'} item)"
        )
    start, end = int(where[0]), int(where[-1]) + 1
    if end - start != where.numel():
        raise RegionError("the image tokens are not contiguous: give one image per prompt")
    return start, end


def grid_cells(rect: Rect, rows: int, cols: int) -> torch.Tensor:
    """[rows * cols, 4] float64 row-major cells of a uniform token grid laid over `rect` (x0, y0, x1, y1).

    The one uniform grid: a whole resized image (`grid_layout`) and every view
    of a tiled one (`gaze.families.View.grid`) are cut into cells here.
    """
    x0, y0, x1, y1 = (float(v) for v in rect)
    r = torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)  # [T]
    c = torch.arange(cols, dtype=torch.float64).repeat(rows)  # [T]
    cw, ch = (x1 - x0) / cols, (y1 - y0) / rows
    return torch.stack([x0 + c * cw, y0 + r * ch, x0 + (c + 1) * cw, y0 + (r + 1) * ch], dim=-1)  # [T, 4]


def grid_layout(
    start: int, grid: tuple[int, int], processed_size: tuple[int, int], image_size: tuple[int, int]
) -> ImageLayout:
    """Layout of a row-major token grid covering the whole image, its tokens from sequence position `start`.

    `grid` is (rows, cols) of merged tokens, `processed_size` the (width, height)
    the processor resized the image to (the grid tiles it exactly, so the cells
    scale back to the original `image_size` uniformly).
    """
    rows, cols = grid
    w, h = image_size
    if processed_size[0] <= 0 or processed_size[1] <= 0:
        raise RegionError(f"the processed image size {processed_size} is empty")
    cells = grid_cells((0.0, 0.0, float(w), float(h)), rows, cols)  # [T, 4]
    positions = torch.arange(start, start + rows * cols)
    return ImageLayout(positions=positions, cells=cells.float(), image_size=(w, h), grid=(rows, cols))


@dataclass(frozen=True)
class RegionMap:
    """Named regions over the image tokens of one layout."""

    membership: torch.Tensor  # [R, T] float 0/1: token t lies in region r
    names: tuple[str, ...]  # one per region, e.g. ("panel 1", ...)
    boxes: tuple[Rect, ...]  # the pixel box each region came from

    @property
    def n_regions(self) -> int:
        return len(self.names)

    def token_indices(self, region: int) -> torch.Tensor:
        """Indices (into the layout's image tokens) of the tokens of `region`."""
        return self.membership[region].nonzero().flatten()

    def assignment(self) -> torch.Tensor:
        """[T] long: the first region containing each token, -1 for none (e.g. gaps between panels)."""
        has = self.membership.any(dim=0)
        first = self.membership.argmax(dim=0)
        return torch.where(has, first, torch.full_like(first, -1))


def box_membership(layout: ImageLayout, box: Rect) -> torch.Tensor:
    """[T] bool: tokens whose cell centre lies inside `box`. Raises if the box is outside the image or empty."""
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = layout.image_size
    if not (x0 < x1 and y0 < y1):
        raise RegionError(f"box {box} is empty: give (x0, y0, x1, y1) with x0 < x1 and y0 < y1")
    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
        raise RegionError(f"box {box} lies outside the {w}x{h} image")
    centres = layout.centres
    inside = (centres[:, 0] >= x0) & (centres[:, 0] < x1) & (centres[:, 1] >= y0) & (centres[:, 1] < y1)
    if not bool(inside.any()):
        cell_w = float((layout.cells[:, 2] - layout.cells[:, 0]).mean())
        cell_h = float((layout.cells[:, 3] - layout.cells[:, 1]).mean())
        raise RegionError(
            f"box {box} covers no image-token centre (cells are about {cell_w:.0f}x{cell_h:.0f} px): "
            "use a larger box or a higher image resolution"
        )
    return inside


def overlap_regions(layout: ImageLayout, boxes: Sequence[Rect], names: Sequence[str] | None = None) -> RegionMap:
    """A region per pixel box holding every token whose cell overlaps the box by any area (not by its centre, as
    `box_regions`: a mark smaller than a cell, or at a panel's edge, still has the cells it touches)."""
    cells = layout.cells.float()  # [T, 4]
    b = torch.tensor([[float(v) for v in box] for box in boxes], dtype=torch.float32)[:, None]  # [R, 1, 4]
    touches = ((cells[None, :, 0] < b[..., 2]) & (b[..., 0] < cells[None, :, 2])
               & (cells[None, :, 1] < b[..., 3]) & (b[..., 1] < cells[None, :, 3]))  # [R, T]
    names = tuple(names) if names is not None else tuple(f"box {i + 1}" for i in range(len(boxes)))
    return RegionMap(touches.float(), names, tuple(tuple(float(v) for v in box) for box in boxes))


def box_regions(layout: ImageLayout, boxes: Sequence[Rect], names: Sequence[str] | None = None) -> RegionMap:
    """A region per pixel box (boxes may overlap)."""
    if not boxes:
        raise RegionError("no boxes given")
    names = tuple(names) if names is not None else tuple(f"box {i + 1}" for i in range(len(boxes)))
    if len(names) != len(boxes):
        raise RegionError(f"{len(names)} names for {len(boxes)} boxes")
    membership = torch.stack([box_membership(layout, b) for b in boxes]).float()  # [R, T]
    return RegionMap(membership, names, tuple(tuple(float(v) for v in b) for b in boxes))


MAPPINGS = ("centre", "proportional")  # how panel boxes become image tokens (`panel_regions`)


def proportional_columns(n_cols: int, widths: Sequence[float]) -> list[int]:
    """Column boundaries [0, b1, ..., n_cols] that cut `n_cols` token columns in proportion to panel `widths`.

    The official code's rule: boundary k is the cumulative width share times `n_cols`, rounded (Python's
    `round`, halves to even), then clamped so that boundaries strictly increase and every panel keeps at
    least one column (when there are at least as many columns as panels).
    """
    n = len(widths)
    if n == 0:
        return [0, n_cols]
    total = max(1.0, float(sum(widths)))
    cum = [n_cols * float(sum(widths[: k + 1])) / total for k in range(n)]
    bounds = [0]
    enough = n_cols >= n
    for k in range(1, n):
        lo = bounds[-1] + (1 if enough else 0)
        hi = n_cols - (n - k) if enough else n_cols
        bounds.append(min(max(int(round(cum[k - 1])), lo), hi))
    return bounds + [n_cols]


def one_row(panels: Sequence[Rect]) -> bool:
    """Whether the panels (reading order) form one row, left to right: each starts where the last one ended or
    further right."""
    return all(float(panels[i + 1][0]) >= float(panels[i][2]) for i in range(len(panels) - 1))


def proportional_boxes(layout: ImageLayout, panels: Sequence[Rect]) -> tuple[Rect, ...]:
    """Pixel boxes whose cell-centre membership is the official code's proportional mapping of `panels`.

    Panel k gets the token columns [b_k, b_k+1) of `proportional_columns(cols, panel widths)` in every grid
    row; its box runs from the left edge of column b_k to the left edge of column b_k+1 (the image's right
    edge for the last panel), full height, so `box_membership` picks exactly those columns. One row of
    panels and one row-major token grid only (the official code's strips); anything else raises.
    """
    if layout.grid is None or layout.grid[0] * layout.grid[1] != layout.n_tokens:
        raise RegionError("the proportional mapping needs one row-major token grid (Qwen-VL style): "
                          "use mapping 'centre' for this family")
    if not one_row(panels):
        raise RegionError("the proportional mapping splits columns among ONE row of panels, left to right (as the "
                          "official code does); these panels are in several rows: use mapping 'centre'")
    xs = [(float(b[0]), float(b[2])) for b in panels]
    cols = layout.grid[1]
    bounds = proportional_columns(cols, [x1 - x0 for x0, x1 in xs])
    left = layout.cells[:cols, 0].double()  # [cols] left edge of each column (row 0)
    w, h = layout.image_size
    edges = [float(left[b]) if b < cols else float(max(w, float(layout.cells[cols - 1, 2]))) for b in bounds]
    return tuple((edges[k], 0.0, edges[k + 1], float(h)) for k in range(len(panels)))


def panel_regions(layout: ImageLayout, panels: Sequence[Rect], mapping: str = "centre") -> RegionMap:
    """A region per panel box (reading order); every panel must own at least one token.

    `mapping` "centre": a token belongs to the panel whose box holds its cell centre (gap tokens to none);
    "proportional": the official code's column split (`proportional_boxes`; every column to some panel).
    """
    if mapping not in MAPPINGS:
        raise RegionError(f"unknown panel mapping {mapping!r}: use one of {', '.join(MAPPINGS)}")
    if mapping == "proportional":
        panels = proportional_boxes(layout, panels)
    try:
        regions = box_regions(layout, panels, [f"panel {k + 1}" for k in range(len(panels))])
    except RegionError as e:
        raise RegionError(f"{e} (panels must each span at least one image token)") from None
    if bool((regions.membership.sum(dim=0) > 1).any()):
        raise RegionError("panel boxes overlap: panels of a strip must be disjoint")
    return regions


def equal_panel_regions(layout: ImageLayout, n_panels: int = 6, rows: int = 1) -> RegionMap:
    """Panels of an image split into `n_panels` equal boxes (`rows` rows, reading order)."""
    return panel_regions(layout, equal_panels(layout.image_size, n_panels, rows))


def positions_region_map(layout: ImageLayout, token_positions: Sequence[int], name: str = "tokens") -> RegionMap:
    """A single region made of explicit sequence positions (which must be image tokens)."""
    pos = torch.as_tensor(list(token_positions), dtype=torch.long)
    member = torch.isin(layout.positions, pos)
    missing = sorted(set(pos.tolist()) - set(layout.positions[member].tolist()))
    if missing:
        raise RegionError(
            f"positions {missing[:8]} are not image tokens (image tokens are "
            f"{int(layout.positions[0])}..{int(layout.positions[-1])})"
        )
    return RegionMap(member.float()[None], (name,), ((0.0, 0.0, float(layout.image_size[0]), float(layout.image_size[1])),))


def region_mass(attention: torch.Tensor, regions: RegionMap, layout: ImageLayout | None = None) -> torch.Tensor:
    """Raw attention mass per region: the one place attention rows meet region membership.

    `attention` is post-softmax attention over the image tokens [..., T] or,
    with `layout`, over all keys [..., kv] (the image tokens' columns are
    picked); returns [..., R]. Raw, not renormalised over the image: a head
    that ignores the image scores ~0 (scores, trajectories, heat-map labels).
    """
    image = attention[..., layout.positions.to(attention.device)] if layout is not None else attention  # [..., T]
    return image @ regions.membership.to(image.device, image.dtype).T  # [..., R]
