"""Stage 0 of the organism's recipe: a vision tower that reads letters before it learns panels.

A tower trained from scratch on strips never learned the overlaid letters
(NOTES.md, 2026-12-03): asked from every token of a panel, the letter gave no
gradient it could follow (held-out token accuracy 0.050, chance 0.042, after
2,400 steps), and asked only of the tokens over the letter's ink, it rose on
its training strips by remembering them. A letter is a small shape at any
offset from the 16 px patch grid; a tower learns it first on letter sheets:

    a grid of 32 px token cells over panel drawings (stretched to the strips'
    widths), one glyph a cell, drawn as datagen draws a panel's letter (its
    font, sizes, palette colour far from the background, outline of the
    opposite lightness) and stretched as a panel's letter is when the panel
    is resized to its width; a linear readout (discarded) names each cell's
    letter from that cell's merged token.

The glyph starts centred in its cell and moves off centre (up to `jitter` of
a cell) over the first half of the stage, so that it then straddles token
boundaries as a panel's letter does. Sheets are drawn anew every step: the
tower cannot remember them, so its accuracy on them is held-out accuracy.
Stage 1 (`train.vision_stage`) then asks the letter of strips, pooled over the
tokens that cover the letter's ink (`pooled_letter_logits`).
"""

from __future__ import annotations

import random
import time
from functools import lru_cache
from typing import Sequence

import torch
from PIL import Image, ImageDraw

SHEET = (4, 8)  # token cells per sheet: rows, columns (32 tokens, within the processor's budget unchanged)
STRETCH = (1.0, 1.75)  # horizontal stretch of a glyph: a 64 px square panel resized to 64..112 px wide


@lru_cache(maxsize=32768)  # every (letter, size, stretch) a 64 px sheet draws: 24 x 10 x 76
def glyph(letter: str, px: int, stretch: float) -> tuple[Image.Image, Image.Image]:
    """`letter` at `px` in datagen's font, stretched `stretch` times wide: (its ink mask with the outline,
    its fill mask), both "L" images of one size."""
    from datagen.letters import letter_font, stroke_px

    font, stroke = letter_font(px), stroke_px(px)
    x0, y0, x1, y1 = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), letter, font=font, anchor="lt",
                                                                    stroke_width=stroke)
    masks = []
    for width in (stroke, 0):
        mask = Image.new("L", (x1 - x0, y1 - y0), 0)
        ImageDraw.Draw(mask).text((-x0, -y0), letter, fill=255, font=font, anchor="lt", stroke_width=width,
                                  stroke_fill=255)
        masks.append(mask.resize((max(1, round(mask.width * stretch)), mask.height), Image.BICUBIC))
    return masks[0], masks[1]


def letter_sheet(backgrounds: Sequence[Image.Image], rng: random.Random, token: int = 32, jitter: float = 0.0,
                 panel: int = 64) -> tuple[Image.Image, list[int], list[tuple[int, int, int, int]]]:
    """A sheet of `SHEET` token cells over panel drawings, one glyph a cell; returns (image, the cells' letter
    indices in row-major order, their glyphs' boxes). `jitter`: the glyph's centre moves up to this share of a cell off the cell's
    centre (1.0: to the cell's edge)."""
    from datagen.letters import LETTERS, far_colour, font_px, mean_colour, outline_colour

    rows, cols = SHEET
    width, height = cols * token, rows * token
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    for y in range(0, height, panel):  # rows of drawings at the strips' common height, widths of their own
        x = 0
        while x < width:
            w = rng.randint(panel, round(panel * STRETCH[1]))
            sheet.paste(rng.choice(backgrounds).convert("RGB").resize((w, panel), Image.BICUBIC), (x, y))
            x += w
    labels, boxes = [], []
    for r in range(rows):
        for c in range(cols):
            k = rng.randrange(len(LETTERS))
            px = font_px(panel, rng)
            shift = jitter * token / 2
            cx = (c + 0.5) * token + rng.uniform(-shift, shift)
            cy = (r + 0.5) * token + rng.uniform(-shift, shift)
            ink, fill = glyph(LETTERS[k], px, round(rng.uniform(*STRETCH), 2))
            x, y = round(cx - ink.width / 2), round(cy - ink.height / 2)
            colour = far_colour(mean_colour(sheet, (x, y, x + ink.width, y + ink.height)), rng)
            outline = outline_colour(colour)
            sheet.paste(outline, (x, y, x + ink.width, y + ink.height), ink)
            sheet.paste(colour, (x, y, x + ink.width, y + ink.height), fill)
            labels.append(k)
            boxes.append((x, y, x + ink.width, y + ink.height))
    return sheet, labels, boxes


def pooled_letter_logits(readout_logits: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """[L, classes]: per letter, the mean of the readout's logits over the tokens that cover its ink.

    `readout_logits` [T, classes]; `cover` [L, T] bool (a row with no token is an error: the caller skips it).
    The mean of a linear readout's logits is the readout of the mean token, so this asks the tokens over the
    ink, together, to carry the letter, as an attention spread over them would read it."""
    weights = cover.float() / cover.float().sum(-1, keepdim=True)
    return weights @ readout_logits


def letter_stage(visual, processor, backgrounds: Sequence[Image.Image], steps: int, batch: int, lr: float,
                 jitter: float, seed: int, weight_decay: float = 0.01, log=print) -> tuple[torch.nn.Linear, dict]:
    """Stage 0: the tower alone on fresh letter sheets, a linear readout naming each cell's letter from its
    merged token. Returns the readout (stage 1 starts its letter readout from it) and the stage's record."""
    from datagen.letters import LETTERS

    from gaze.organism.train import lr_schedule

    ip = processor.image_processor
    token = int(ip.patch_size) * int(ip.merge_size)
    readout = torch.nn.Linear(visual.config.out_hidden_size, len(LETTERS))
    params = [p for p in visual.parameters() if p.requires_grad] + list(readout.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    rng = random.Random(f"organism-letters/{seed}")
    warm = max(1, steps // 20)
    visual.train()
    t0, accs = time.time(), []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_schedule(lr, step, steps, warm)
        share = jitter * min(1.0, 2 * step / max(1, steps))  # centred first, off centre from half-way
        sheets, labels, _ = zip(*[letter_sheet(backgrounds, rng, token, share) for _ in range(batch)])
        enc = ip(images=list(sheets), return_tensors="pt")
        logits = readout(visual(enc["pixel_values"].float(), grid_thw=enc["image_grid_thw"], return_dict=True).pooler_output)
        target = torch.tensor([k for ks in labels for k in ks])
        if len(target) != len(logits):
            raise RuntimeError(f"a letter sheet gave {len(logits) // batch} tokens, not {len(target) // batch}: "
                               "the processor resized it; keep --max-image-tokens at least 32")
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        accs.append(float((logits.argmax(-1) == target).float().mean()))
        if step % 100 == 0 or step == steps - 1:
            log(f"letters {step:5d}  loss {float(loss.detach()):.4f}  cell accuracy (fresh sheets) "
                f"{sum(accs[-100:]) / len(accs[-100:]):.3f}  off centre {share:.2f}  {time.time() - t0:.0f}s")
    visual.eval()
    return readout, {"letter_minutes": round((time.time() - t0) / 60, 2),
                     "letter_sheet_accuracy": round(sum(accs[-100:]) / max(1, len(accs[-100:])), 4)}
