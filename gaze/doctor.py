"""`gaze doctor`: see the image-token grid and the region assignment before trusting a score.

    gaze doctor --model organism --image strip.png --panels 6 --out doctor.png
    gaze doctor --model Qwen/Qwen3-VL-8B-Instruct --image photo.jpg --box 40,60,200,220

Draws, over the image as the model's processor sees it mapped back to the
original pixels: every image token's cell (thin lines), its centre (a dot),
and the region it is assigned to (a tint per panel or box). Tokens in no
region (gaps between panels) stay untinted; a region that covers no token
centre is an error, shown before any score is computed.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

from gaze.regions import ImageLayout, RegionMap

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))


def region_colour(k: int) -> tuple[int, int, int]:
    return PALETTE[k % len(PALETTE)]


def draw_layout(image: Image.Image, layout: ImageLayout, regions: RegionMap | None = None, min_cell: int = 24) -> Image.Image:
    """The image with the token grid and region assignment drawn over it (upscaled so cells stay visible)."""
    cell_w = float((layout.cells[:, 2] - layout.cells[:, 0]).min())
    scale = max(1.0, min_cell / max(cell_w, 1e-6))
    w, h = image.size
    base = image.convert("RGB").resize((round(w * scale), round(h * scale)), Image.NEAREST)
    tint = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(tint)
    assign = regions.assignment() if regions is not None else None
    for t, (x0, y0, x1, y1) in enumerate(layout.cells.tolist()):
        box = [x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1]
        r = int(assign[t]) if assign is not None else -1
        fill = (*region_colour(r), 90) if r >= 0 else None
        draw.rectangle(box, fill=fill, outline=(40, 40, 40, 200), width=1)
        cx, cy = (x0 + x1) / 2 * scale, (y0 + y1) / 2 * scale
        draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=(255, 255, 255, 230), outline=(0, 0, 0, 255))
    if regions is not None:
        for k, (name, (x0, y0, x1, y1)) in enumerate(zip(regions.names, regions.boxes)):
            draw.rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1], outline=(*region_colour(k), 255), width=2)
            draw.text((x0 * scale + 3, y0 * scale + 2), name, fill=(*region_colour(k), 255))
    return Image.alpha_composite(base.convert("RGBA"), tint).convert("RGB")


def describe(layout: ImageLayout, regions: RegionMap | None) -> str:
    """One line per region: how many tokens it owns."""
    lines = [f"{layout.n_tokens} image tokens at positions {int(layout.positions[0])}..{int(layout.positions[-1])}"
             + (f", grid {layout.grid[0]}x{layout.grid[1]}" if layout.grid else "")]
    if regions is not None:
        for k, name in enumerate(regions.names):
            lines.append(f"  {name}: {int(regions.membership[k].sum())} tokens")
        unassigned = int((regions.assignment() == -1).sum())
        if unassigned:
            lines.append(f"  in no region: {unassigned} tokens")
    return "\n".join(lines)
