"""Pictures and HTML for the page: the strip with coloured panels, gaze heat maps, trajectories, tinted text.

One palette for everything: panel k has `PANEL_COLOURS[k - 1]` on its outline
in the strip, on its button, on the text it steered and on its trajectory row:
the colours `gaze inspect` gives regions 1, 2, ... (`gaze.plots.region_colour`),
so a panel looks the same in the Space and in an inspection. A box target is
`BOX_COLOUR` (the palette's seventh colour, after the six panels').
"""

from __future__ import annotations

import html
import io
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from gaze.plots import heatmap, region_colour
from gaze.regions import ImageLayout


def _hex(rgb) -> str:
    return "#{:02X}{:02X}{:02X}".format(*rgb)


PANEL_COLOURS = tuple(_hex(region_colour(k)) for k in range(6))  # gaze inspect's region colours
BOX_COLOUR = _hex(region_colour(6))
TINT_ALPHA = "66"  # hex alpha of a token's background tint (about 40%)


def panel_colour(k: int) -> str:
    """Colour of 1-based panel k."""
    return PANEL_COLOURS[(k - 1) % len(PANEL_COLOURS)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _upscaled(image: Image.Image, scale: float) -> Image.Image:
    """The image at display size: pixels kept sharp when enlarged, smoothed when reduced."""
    if scale == 1:
        return image.copy()
    w, h = image.size
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.NEAREST if scale > 1 else Image.LANCZOS)


def _scaled(box, scale: float) -> tuple[int, int, int, int]:
    return tuple(int(round(v * scale)) for v in box)


def draw_regions(canvas: Image.Image, scale: float, panels=None, highlight: int | None = None, box=None) -> Image.Image:
    """Panel outlines and numbers in their colours (the `highlight`ed panel thicker), and a box target."""
    d = ImageDraw.Draw(canvas)
    line = max(2, round(scale))
    font = _font(max(10, round(7 * scale)))
    for k, p in enumerate(panels or (), start=1):
        x0, y0, x1, y1 = _scaled(p, scale)
        width = 3 * line if k == highlight else line
        d.rectangle((x0, y0, x1 - 1, y1 - 1), outline=panel_colour(k), width=width)
        tag = round(8 * max(scale, 1.5)) + 2
        d.rectangle((x1 - tag, y1 - tag, x1 - 1, y1 - 1), fill=panel_colour(k))
        d.text((x1 - tag / 2, y1 - tag / 2), str(k), fill="black", font=font, anchor="mm")
    if box is not None:
        x0, y0, x1, y1 = _scaled(box, scale)
        d.rectangle((x0, y0, x1 - 1, y1 - 1), outline=BOX_COLOUR, width=2 * line)
    return canvas


def scene_image(scene, highlight: int | None = None) -> Image.Image:
    """The scene as shown: upscaled, panels outlined and numbered, the marked box drawn."""
    return draw_regions(_upscaled(scene.image, scene.scale), scene.scale, scene.panels, highlight, scene.mark)


def heatmap_image(image: Image.Image, layout: ImageLayout, weights: torch.Tensor, scale: float,
                  panels=None, box=None, alpha: float = 0.6) -> Image.Image:
    """`gaze.plots.heatmap` (attention over image tokens [T] on each token's cell) with the panels and box drawn."""
    return draw_regions(heatmap(image, layout, weights, scale, alpha), scale, panels, None, box)


def trajectory_image(traj: torch.Tensor, totals: torch.Tensor, names: Sequence[str], colours: Sequence[str],
                     targets: Sequence[int | None] | None = None) -> Image.Image:
    """[steps, R] mass per region -> region x step heat map, the steered region dashed on top.

    Each step is divided by `totals` [steps], the heads' whole attention on the
    image, so a cell reads "share of the image attention" even when regions overlap.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = traj.float() / totals.float()[:, None].clamp_min(1e-12)  # [steps, R]
    fig, ax = plt.subplots(figsize=(7.5, 0.5 + 0.32 * len(names) + 0.6), dpi=100)
    ax.imshow(t.T.numpy(), aspect="auto", cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for label, c in zip(ax.get_yticklabels(), colours):
        label.set_color("black")
        label.set_bbox(dict(facecolor=c, edgecolor="none", pad=1.5))
    if targets is not None and any(v is not None for v in targets):
        xs = [i for i, v in enumerate(targets) if v is not None]
        ax.plot(xs, [targets[i] for i in xs], color="cyan", lw=1.4, ls="--", label="steered to")
        ax.legend(loc="upper right", fontsize=7, framealpha=0.6)
    ax.set_xlabel("generated token", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # tokens are whole: no 0.5 ticks on short answers
    ax.set_title("where the gaze heads looked (share of image attention)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def answer_html(pieces: Sequence[str], colours: Sequence[str | None], labels: Sequence[str | None],
                streaming: bool = False) -> str:
    """The answer as one clickable span per token, tinted by the colour of what steered it.

    Each span carries `data-i` (token index) and, when steered, `data-target`
    (e.g. "panel 3"); the page's script turns a click into a word-inspection event.
    """
    spans = []
    for i, (piece, colour, label) in enumerate(zip(pieces, colours, labels)):
        text = html.escape(piece.replace("\x00", ""))
        if colour is None:
            spans.append(f'<span class="tok" data-i="{i}">{text}</span>')
        else:
            spans.append(f'<span class="tok" data-i="{i}" data-target="{html.escape(label)}" '
                         f'data-colour="{colour}" style="background-color:{colour}{TINT_ALPHA}; '
                         f'box-shadow: inset 0 -2px 0 {colour}">{text}</span>')
    caret = '<span class="caret">&#9611;</span>' if streaming else ""
    body = "".join(spans) or ('<span class="placeholder">&hellip;</span>' if streaming else "")
    return f'<div class="answer-text">{body}{caret}</div>'


def legend_html(n_panels: int, box: bool = False) -> str:
    items = [f'<span class="swatch" style="background:{panel_colour(k)}"></span>panel {k}'
             for k in range(1, n_panels + 1)]
    if box:
        items.append(f'<span class="swatch" style="background:{BOX_COLOUR}"></span>box')
    return '<div class="legend">' + " ".join(items) + "</div>"
