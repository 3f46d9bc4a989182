"""Figures: trajectory staircases, per-head 6x6 matrices, the layer x head score map, and pictures over
the image: the one attention heat map (`heatmap`, used by `gaze inspect` and the Space), the token grid
and region assignment (`draw_layout`, `gaze doctor`), and an inspected answer's words."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw

from gaze.regions import ImageLayout, RegionMap

if TYPE_CHECKING:
    from gaze.tracking import Inspection


PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))


def region_colour(k: int) -> tuple[int, int, int]:
    return PALETTE[k % len(PALETTE)]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_trajectory(traj: torch.Tensor, path: str | Path, *, title: str = "", targets: list[int] | None = None,
                    schedule=None) -> Path:
    """[steps, R] -> a panel x step heat map (the staircase), with the steered target marked."""
    plt = _plt()
    t = traj.float()
    t = t / t.sum(-1, keepdim=True).clamp_min(1e-12)
    fig, ax = plt.subplots(figsize=(max(4, t.shape[0] * 0.12 + 2), 2.6))
    ax.imshow(t.T.numpy(), aspect="auto", cmap="magma", origin="upper", interpolation="nearest")
    ax.set_yticks(range(t.shape[1]), [f"P{k + 1}" for k in range(t.shape[1])])
    ax.set_xlabel("generated token")
    if targets is not None and schedule is not None:
        ks = [schedule.targets[i].k - 1 for i in targets[: t.shape[0]] if hasattr(schedule.targets[i], "k")]
        if ks:
            ax.plot(range(len(ks)), ks, color="cyan", lw=1, ls="--", label="target")
            ax.legend(loc="upper right", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_score_map(scores: torch.Tensor, path: str | Path, title: str = "gaze score") -> Path:
    """[layers, heads] -> heat map."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(3, scores.shape[1] * 0.25 + 1.5), max(2.5, scores.shape[0] * 0.2 + 1)))
    im = ax.imshow(scores.numpy(), aspect="auto", cmap="viridis", origin="upper", interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_matrices(matrices: torch.Tensor, heads: list[tuple[int, int]], path: str | Path) -> Path:
    """Each head's [R queried x R attended] matrix side by side."""
    plt = _plt()
    n = max(1, len(heads))
    fig, axes = plt.subplots(1, n, figsize=(2.1 * n, 2.3), squeeze=False)
    for ax, (l, h) in zip(axes[0], heads):
        m = matrices[l, h].numpy()
        ax.imshow(m, cmap="Blues", vmin=0, interpolation="nearest")
        ax.set_title(f"L{l} H{h}  {m.diagonal().mean():.2f}", fontsize=8)
        ax.set_xlabel("attended", fontsize=7)
        ax.set_ylabel("queried", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap(image: Image.Image, layout: ImageLayout, weights: torch.Tensor, scale: float = 1.0,
            alpha: float = 0.6) -> Image.Image:
    """Attention over image tokens [T] painted on each token's pixel cell, over the image (upscaled by `scale`).

    Cells are the layout's token boxes (original pixels), so what is shown is
    exactly the token grid the model saw. Scaled to the maximum token, so the
    brightest cell is where the heads look most; the image stays visible.
    """
    import matplotlib

    w_img, h_img = image.size
    size = (max(1, round(w_img * scale)), max(1, round(h_img * scale)))
    base = image.copy() if scale == 1 else image.resize(size, Image.NEAREST if scale > 1 else Image.LANCZOS)
    W, H = base.size
    field = np.zeros((H, W), dtype=np.float32)
    w = weights.float()
    w = (w / w.max().clamp_min(1e-12)).numpy()
    for (x0, y0, x1, y1), v in zip(layout.cells.tolist(), w):
        field[int(round(y0 * scale)):int(round(y1 * scale)), int(round(x0 * scale)):int(round(x1 * scale))] = v
    heat = (matplotlib.colormaps["inferno"](field)[..., :3] * 255).astype(np.float32)  # [H, W, 3]
    a = (0.25 + alpha * field)[..., None]  # more heat colour where the heads look more
    rgb = np.asarray(base.convert("RGB"), dtype=np.float32)
    return Image.fromarray((rgb * (1 - a) + heat * a).clip(0, 255).astype(np.uint8))


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


def answer_html(inspection) -> str:
    """An inspected answer (`gaze.tracking.Inspection`) with each word coloured by its most-attended region."""
    spans = []
    for word in inspection.words():
        k, share = inspection.region_of(word.tokens)
        r, g, b = region_colour(k)
        name = inspection.regions.names[k]
        spans.append(f'<span title="{html.escape(name)} ({share:.0%})" style="background: rgba({r},{g},{b},0.35);'
                     f' border-bottom: 2px solid rgb({r},{g},{b})">{html.escape(word.text)}</span>')
    legend = " ".join(f'<span style="color: rgb{region_colour(k)}">&#9632; {html.escape(n)}</span>'
                      for k, n in enumerate(inspection.regions.names))
    return f"<p>{' '.join(spans)}</p>\n<p>{legend}</p>\n"


MAX_GRID_WORDS = 24  # words.png shows this many words at most, and says so below the grid when there are more


def word_grid(inspection: Inspection, image: Image.Image, max_words: int = MAX_GRID_WORDS, width: int = 4) -> Image.Image:
    """A grid of heat maps, one per word, captioned with the word and its region; when the answer has more
    than `max_words` words, a last line says how many are shown."""
    every = inspection.words()
    words = every[:max_words]
    note = 16 if len(every) > len(words) else 0
    maps = inspection.token_maps()
    thumb_w = min(image.size[0], 480)
    scale = thumb_w / image.size[0]
    thumb_h = round(image.size[1] * scale)
    cols = min(width, max(1, len(words)))
    rows = -(-len(words) // cols) if words else 1
    sheet = Image.new("RGB", (cols * thumb_w, rows * (thumb_h + 16) + note), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if note:
        draw.text((3, rows * (thumb_h + 16) + 2), f"the first {len(words)} of {len(every)} words; "
                  "`gaze inspect --word WORD` draws any word", fill=(0, 0, 0))
    for i, word in enumerate(words):
        pic = heatmap(image, inspection.generation.layout, maps[list(word.tokens)].mean(0)).resize((thumb_w, thumb_h))
        x, y = (i % cols) * thumb_w, (i // cols) * (thumb_h + 16)
        sheet.paste(pic, (x, y + 16))
        k, share = inspection.region_of(word.tokens)
        draw.text((x + 3, y + 2), f"{word.text}  -> {inspection.regions.names[k]} ({share:.0%})", fill=(0, 0, 0))
    return sheet


def write_inspection(inspection: Inspection, image: Image.Image, out: str | Path, words: list[str] | None = None) -> Path:
    """answer.html, words.png (the first MAX_GRID_WORDS words, saying so when there are more), and
    word_<i>_<text>.png for each chosen word."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "answer.html").write_text(answer_html(inspection))
    word_grid(inspection, image).save(out / "words.png")
    maps = inspection.token_maps()
    for i, word in enumerate(inspection.words()):
        if words and word.text.strip(".,!?:;").lower() not in {w.lower() for w in words}:
            continue
        if words:
            safe = "".join(ch for ch in word.text if ch.isalnum())[:20] or "tok"
            heatmap(image, inspection.generation.layout, maps[list(word.tokens)].mean(0)).save(out / f"word_{i:03d}_{safe}.png")
    return out
