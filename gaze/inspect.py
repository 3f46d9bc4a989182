"""Per-token inspection: where the gaze heads looked for each word of an answer.

    gaze inspect --model organism --ranking gaze/organism --image strip.png \\
        --prompt "Describe this comic strip panel by panel." --out runs/inspect

For a generated answer (steered or not), every token's attention of the chosen
gaze heads over the image-token grid (raw mass, and normalised over the
image), the share of its attention on the image at all, and its most-attended
region. Words are runs of tokens (a token starting with a space or after
punctuation starts a word); a word's map is the mean of its tokens' maps.

Only the chosen heads are kept, at float16 on CPU (`tracking.memory_bytes`
says how much a long answer needs); all heads' attention is never kept.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from gaze.doctor import region_colour
from gaze.errors import GazeError
from gaze.generation import Generation
from gaze.regions import RegionMap, region_mass


@dataclass(frozen=True)
class Word:
    text: str
    tokens: tuple[int, ...]  # indices into the generated tokens


def words_of(pieces: list[str]) -> list[Word]:
    """Group token pieces into words (a piece starting with whitespace starts a new word)."""
    words: list[Word] = []
    text, tokens = "", []
    for i, piece in enumerate(pieces):
        starts = piece[:1].isspace() or (text and not text[-1:].isalnum() and piece[:1].isalnum())
        if tokens and starts:
            words.append(Word(text.strip(), tuple(tokens)))
            text, tokens = "", []
        text += piece
        tokens.append(i)
    if tokens:
        words.append(Word(text.strip(), tuple(tokens)))
    return [w for w in words if w.text]


@dataclass(frozen=True)
class Inspection:
    """Per generated token: the chosen heads' attention over the image."""

    generation: Generation
    regions: RegionMap

    def token_maps(self, normalise: bool = False) -> torch.Tensor:
        """[tokens, T]: mean over the chosen heads of each token's attention on each image token."""
        att = self.generation.tracker.attention()[: len(self.generation.token_ids)].mean(1)  # [tokens, T]
        if normalise:
            att = att / att.sum(-1, keepdim=True).clamp_min(1e-12)
        return att

    def heatmap(self, token: int, normalise: bool = False) -> torch.Tensor:
        """[rows, cols] map of one token over the image-token grid."""
        grid = self.generation.layout.grid
        if grid is None:
            raise GazeError("this image's tokens do not form one grid: use token_maps() with the layout's cells")
        return self.token_maps(normalise)[token].reshape(grid)

    def image_share(self) -> torch.Tensor:
        """[tokens]: share of each token's attention (chosen heads, mean) on the image at all."""
        return self.token_maps().sum(-1)

    def region_of(self, tokens) -> tuple[int, float]:
        """(most-attended region, its share of the image mass) for a token or a run of tokens."""
        maps = self.token_maps()[list(tokens)].mean(0)  # [T]
        mass = region_mass(maps, self.regions)  # [R]
        k = int(mass.argmax())
        return k, float(mass[k] / maps.sum().clamp_min(1e-12))

    def words(self) -> list[Word]:
        return words_of(self.generation.pieces)


def overlay(image: Image.Image, layout, values: torch.Tensor, alpha: float = 0.6) -> Image.Image:
    """A [T] map over image tokens drawn on the image: each token's cell tinted by its value (max = full)."""
    from PIL import ImageDraw

    v = values.float()
    v = v / v.max().clamp_min(1e-12)
    base = image.convert("RGBA")
    tint = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(tint)
    for (x0, y0, x1, y1), a in zip(layout.cells.tolist(), v.tolist()):
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=(255, 40, 0, int(255 * alpha * a)))
    dim = Image.new("RGBA", base.size, (0, 0, 0, 70))
    return Image.alpha_composite(Image.alpha_composite(base, dim), tint).convert("RGB")


def answer_html(inspection: Inspection) -> str:
    """The answer with each word coloured by its most-attended region."""
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


def word_grid(inspection: Inspection, image: Image.Image, max_words: int = 24, width: int = 4) -> Image.Image:
    """A grid of heat maps, one per word, captioned with the word and its region."""
    from PIL import ImageDraw

    words = inspection.words()[:max_words]
    maps = inspection.token_maps()
    thumb_w = min(image.size[0], 480)
    scale = thumb_w / image.size[0]
    thumb_h = round(image.size[1] * scale)
    cols = min(width, max(1, len(words)))
    rows = -(-len(words) // cols) if words else 1
    sheet = Image.new("RGB", (cols * thumb_w, rows * (thumb_h + 16)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, word in enumerate(words):
        pic = overlay(image, inspection.generation.layout, maps[list(word.tokens)].mean(0)).resize((thumb_w, thumb_h))
        x, y = (i % cols) * thumb_w, (i // cols) * (thumb_h + 16)
        sheet.paste(pic, (x, y + 16))
        k, share = inspection.region_of(word.tokens)
        draw.text((x + 3, y + 2), f"{word.text}  -> {inspection.regions.names[k]} ({share:.0%})", fill=(0, 0, 0))
    return sheet


def write(inspection: Inspection, image: Image.Image, out: str | Path, words: list[str] | None = None) -> Path:
    """answer.html, words.png (all words), and word_<i>_<text>.png for each chosen word."""
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
            overlay(image, inspection.generation.layout, maps[list(word.tokens)].mean(0)).save(out / f"word_{i:03d}_{safe}.png")
    return out
