"""Region mapping on synthetic grids, where the right answer is known by construction."""

import pytest
import torch

from gaze.regions import (
    RegionError,
    box_regions,
    find_image_span,
    grid_layout,
    overlap_regions,
    panel_regions,
    positions_region_map,
    region_mass,
)
from gaze.strips import equal_panels, stitch_panels


def test_image_span_found_and_errors():
    ids = torch.tensor([1, 2, 9, 9, 9, 3])
    assert find_image_span(ids, 9) == (2, 5)
    with pytest.raises(RegionError, match="no image tokens"):
        find_image_span(torch.tensor([1, 2, 3]), 9)
    with pytest.raises(RegionError, match="not contiguous"):
        find_image_span(torch.tensor([9, 1, 9]), 9)


def test_grid_cells_cover_original_image_row_major():
    # 2 x 12 tokens of 32 px over a 384 x 64 strip, prompt starts the image at position 5
    layout = grid_layout(5, (2, 12), (384, 64), (384, 64))
    assert layout.positions.tolist() == list(range(5, 29))
    assert layout.cells[0].tolist() == [0, 0, 32, 32]
    assert layout.cells[13].tolist() == [32, 32, 64, 64]  # row 1, col 1
    # resized image: cells are scaled back to the original pixels
    scaled = grid_layout(0, (2, 12), (384, 64), (768, 128))
    assert scaled.cells[13].tolist() == [64, 64, 128, 128]


def test_six_aligned_panels_get_four_tokens_each():
    layout = grid_layout(0, (2, 12), (384, 64), (384, 64))
    regions = panel_regions(layout, equal_panels((384, 64), 6))
    assert regions.membership.sum(1).tolist() == [4.0] * 6
    # panel k owns columns 2k, 2k+1 in both rows
    for k in range(6):
        cols = sorted({int(t) % 12 for t in regions.token_indices(k)})
        assert cols == [2 * k, 2 * k + 1]


def test_unaligned_panels_split_columns_proportionally():
    # six 50-px panels = 300 px wide, 32-px tokens over a 320-px processed width (resized)
    layout = grid_layout(0, (1, 10), (320, 32), (300, 30))
    regions = panel_regions(layout, equal_panels((300, 30), 6))
    assign = regions.assignment().tolist()
    # every token goes to the panel holding its centre: monotone, all panels present
    assert assign == sorted(assign)
    assert set(assign) == set(range(6))
    centres = layout.centres[:, 0]
    for t, k in enumerate(assign):
        assert 50 * k <= centres[t] < 50 * (k + 1)


def test_gap_tokens_belong_to_no_panel():
    from PIL import Image

    panels = [Image.new("RGB", (64, 64), (k * 40, 0, 0)) for k in range(6)]
    strip, boxes = stitch_panels(panels, gap=32, align=32)
    assert strip.size == (6 * 64 + 5 * 32, 64)
    layout = grid_layout(0, (2, strip.size[0] // 32), strip.size, strip.size)
    regions = panel_regions(layout, boxes)
    assert regions.membership.sum(1).tolist() == [4.0] * 6
    assert int((regions.assignment() == -1).sum()) == 5 * 2  # one gap column per gap, two rows


def test_box_regions_and_errors():
    layout = grid_layout(0, (4, 4), (128, 128), (128, 128))
    regions = box_regions(layout, [(0, 0, 64, 64), (32, 32, 128, 128)])
    assert regions.membership[0].nonzero().flatten().tolist() == [0, 1, 4, 5]
    assert int(regions.membership[1].sum()) == 9  # overlapping boxes are fine
    with pytest.raises(RegionError, match="covers no image-token centre"):
        box_regions(layout, [(0, 0, 10, 10)])
    with pytest.raises(RegionError, match="outside"):
        box_regions(layout, [(200, 200, 300, 300)])
    with pytest.raises(RegionError, match="empty"):
        box_regions(layout, [(10, 10, 5, 20)])


def test_overlapping_panels_rejected():
    layout = grid_layout(0, (1, 6), (192, 32), (192, 32))
    with pytest.raises(RegionError, match="overlap"):
        panel_regions(layout, [(0, 0, 96, 32), (64, 0, 192, 32)])


def test_position_regions():
    layout = grid_layout(10, (1, 4), (128, 32), (128, 32))
    assert positions_region_map(layout, [11, 12]).membership.tolist() == [[0, 1, 1, 0]]
    with pytest.raises(RegionError, match="not image tokens"):
        positions_region_map(layout, [3])


def test_region_mass_is_raw_not_renormalised():
    layout = grid_layout(2, (1, 4), (128, 32), (128, 32))
    regions = panel_regions(layout, equal_panels((128, 32), 2))
    rows = torch.tensor([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1], [1.0, 0, 0, 0, 0, 0]])  # [2, kv]
    mass = region_mass(rows, regions, layout)
    assert torch.allclose(mass, torch.tensor([[0.2, 0.2], [0.0, 0.0]]))


def test_overlap_regions_take_every_cell_a_box_touches_not_only_by_centre():
    layout = grid_layout(0, (2, 12), (384, 64), (384, 64))  # 32 px cells
    small = (40, 4, 50, 12)  # inside cell (row 0, col 1), centre-less: box_regions would refuse it
    straddling = (60, 20, 70, 40)  # crosses the corner of cells (0, 1), (0, 2), (1, 1), (1, 2)
    got = overlap_regions(layout, [small, straddling]).membership.bool()
    assert got.shape == (2, 24)
    assert got[0].nonzero().flatten().tolist() == [1]
    assert got[1].nonzero().flatten().tolist() == [1, 2, 13, 14]
    touching = overlap_regions(layout, [(32, 0, 64, 32)]).membership.bool()  # exactly cell 1: its neighbours share only an edge
    assert touching[0].nonzero().flatten().tolist() == [1]
