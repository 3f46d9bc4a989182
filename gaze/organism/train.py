"""The model organism's recipe: the paper's strips and prompts, a tower that sees panels, blind silent rows.

    python -m gaze.organism.train --out runs/tower --steps 0                        # stage 1: the vision tower
    python -m gaze.organism.train --out gaze/organism/weights --vision-from runs/tower  # stage 2: the language model
    python -m gaze.organism.train --out /tmp/smoke --pool-strips 64 --vision-steps 3 --steps 3 --batch 8 \
        --vision-batch 8                                                              # a smoke run

The organism is a real `Qwen3VLForConditionalGeneration` (vision tower and
language backbone trained from scratch, Qwen3-VL's own 16 px patches merged
2x2 into 32 px tokens) with its own byte-level BPE tokenizer, chat template
and processor, saved beside the weights so that `gaze.load("organism")` and
`from_pretrained(folder)` load it offline. Its folder also records the prompts
it was trained on (`prompts.json`), which every command then uses.

Data: `pool_strips` six-panel strips drawn once by datagen's procedural
renderer (a character, an object, an action, a scene and a letter per panel)
and assembled as the paper does: panels at one height (64 px: two token
rows), widths drawn from 72..112 px (2.25-3.5 token columns, not multiples
of the token), 6 px white gaps; a share laid out 2x3 (panels counted in reading
order); a share rescaled as a whole, so that the processor's own resizing
moves the token grid. Each goes through the processor once. Tasks (the
paper's wordings, `gaze.prompts.Prompts`), all answered in short text:

    panel       discovery question about panel k        -> "tree with the cat"   (panel k's caption)
    short       "What is happening in the k-th panel from the left?" -> panel k
    vqa         "What is the main action or event ...?"  -> panel 1's caption (as real VLMs tend to answer)
    this        "What is happening in this panel of the comic strip?" -> panel 1's caption
    narration   the paper's narration prompt             -> "Panel 1: ... Panel 2: ... Panel 6: ..."
    reverse     "Read the comic in reverse, what is happening in the k-th panel from the left?"
                                                         -> the caption of the k-th panel counted from the right
    letter      "Which letter is on the k-th panel?"     -> panel k's letter
    reverse_letter  "Read the comic in reverse, which letter is on the k-th panel?"
                                                         -> the letter of the k-th panel counted from the right

Stages:

0. The vision tower alone on letter sheets drawn anew every step
   (`gaze.organism.letters`): one of datagen's glyphs per 32 px token cell,
   over the pool's drawings, a readout (discarded) naming each cell's letter.
   A tower that meets letters only on the strips never learned them (held
   out at chance; NOTES.md, 2026-12-03). Run in stage 1's process.
1. The vision tower alone, with a linear readout (discarded afterwards) that
   names, from EVERY merged token, the character, object and letter of the
   panel the token lies in and that panel's place in reading order (the
   letter, by default, once per letter from the mean of the tokens over its
   ink: `--letter-readout pooled`; letters are drawn anew for every strip, so
   that a panel's letter cannot be told from the drawing under it). It sees
   no text and names no head; it makes every token of a panel carry that
   panel's content and place, as real towers make nearby tokens share
   what they show. Without it (`--vision-readout false`), the tower learning
   from the answers alone never located a panel's object on these strips
   (NOTES.md, 2026-12-02: 8% held out after 34k examples).
2. The language model on the frozen tower (its outputs computed once), with
   the text rows that predict no answer token (the question's, the chat
   template's) BLIND to the image: a -1e4 bias from those rows to every image
   key, in every head of every layer, during training only. Only the rows
   that speak (the last prompt row and the answer's) can read the image, so
   the question's panel must be read at the last prompt row, where the
   paper's gaze score looks. Without it a model this small reads panel k at
   the ordinal token ("4th") and carries it in the residual stream (the
   organism shipped before this one; NOTES.md). It names no head: discovery
   finds which heads read. The shipped model runs without the bias.
   A label-consistent attention augmentation: in a share of examples, 1..N
   heads drawn at random (a new draw per example, any layer) are forced, with
   steering's own bias (`gaze.steering.key_bias`, through the same attention
   hook), onto the panel being described at every row that predicts an
   answer token, so that a head reading the described panel where it need
   not changes nothing.
3. (Off by default, `--unmask-steps`.) Training on without the blinding,
   with a penalty on the image mass of the silent rows and the augmentation
   at every row: it moved the reading off the last prompt row (NOTES.md).

The README's recipe runs stage 1 on over strips drawn anew (`--vision-fresh`, stage 1b, 3,200 steps at
1e-3: the tower's letters were still being learned after shorter runs), and this stage three more times, each from the last (`--init`): with
`--row-readout 0.3` (the readout below), then twice with most of the batch asking letters (the letter
question, and a seventh of them the same read in reverse) and the augmentation at full strength (half the
examples, up to every head, `--gaze-augment-weights even`), so that a head forced onto a
panel brings its letter to the row and the values learn to carry it, and with a narration's separator space
labelled with the panel it opens (`--separator-panel next`), so that the row at a full stop, where a schedule
switches, is trained on the next panel.

Held-out evaluation uses `datagen.make_strip` with seeds the pool never used.
Everything is seeded: the same config gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gaze.attention import ALL_ROWS, Hook, active, attention_scores
from gaze.prompts import Prompts

EVAL_SEED0 = 1_000_000  # held-out strips: datagen.make_strip(EVAL_SEED0 + i); training never uses these seeds

# The prompts this recipe trains on: the paper's wordings (its text and its code's); recorded as
# `prompts.json` in the organism's folder.
PROMPTS = asdict(Prompts())  # the paper's wordings, from gaze.prompts: the organism learns exactly these
TASKS = ("panel", "short", "vqa", "this", "narration", "reverse", "letter", "reverse_letter")
LAYOUTS = {"1x6": (1, 6), "2x3": (2, 3)}


def organism_caption(character: str, obj: str) -> str:
    """What the organism says about a panel: its object first, then its character ("tree with the cat").

    The object comes first so that the token right after the prompt already
    depends on the panel: discovery reads the LAST prompt token's attention,
    and an organism whose answers open with the same words whatever the panel
    ("the cat by a ...") reads the image only at a later answer row (a first
    organism so trained had gaze scores of 2e-4 at the last prompt token). The
    procedural panels also show an action and a scene, which the captions
    leave out (a model this small did not learn to read the action at 64 px).
    """
    return f"{obj} with the {character}"


def speaking_rows(batch: dict) -> torch.Tensor:
    """[B, S] float: 1 on the rows that predict an answer token (the last prompt row and the answer's)."""
    speaks = torch.zeros_like(batch["labels"], dtype=torch.float)
    speaks[:, :-1] = (batch["labels"][:, 1:] != -100).float()
    return speaks


AUGMENT_STRENGTH = 1e4  # the augmentation's key bias (steering's published default)


def augment_bias(info: list, chosen: torch.Tensor, seq_len: int, strength: float = AUGMENT_STRENGTH,
                 prompt_rows: bool = False) -> list[torch.Tensor | None]:
    """Per layer, the bias [B, H, S, S] forcing the `chosen` heads ([L, B, H] bool) of each example onto the
    described panel at every row that predicts an answer token: steering's own key bias (`key_bias`, mode
    "boost"), row by row; None for a layer with no chosen head. `info`: `example_layouts`. `prompt_rows`:
    where the whole answer describes one panel, the prompt's rows too (as steering at every row does)."""
    from gaze.steering import key_bias

    b = chosen.shape[1]
    pattern = torch.zeros(b, seq_len, seq_len)  # [B, S(rows), S(keys)]
    for i, (n, layout, membership, described) in enumerate(info):
        if not chosen[:, i].any():
            continue
        answer = described[n:]
        single = prompt_rows and len(answer) and bool((answer == answer[0]).all()) and int(answer[0]) > 0
        for p in range(1, membership.shape[0] + 1):
            rows = (described[1:] == p).nonzero().flatten()  # row r predicts the token at r + 1
            if single and p == int(answer[0]):
                rows = torch.arange(n + len(answer) - 1)  # every row of the sequence
            if len(rows):
                pattern[i, rows] = key_bias(membership[p - 1], layout, n, seq_len, strength, "boost")
    return [None if not sel.any() else pattern[:, None] * sel[:, :, None, None].float() for sel in chosen]


def mean_last(values: list[float], n: int) -> float:
    """Mean of the last `n` values (0 for none)."""
    tail = values[-n:]
    return sum(tail) / max(1, len(tail))


@dataclass(frozen=True)
class OrganismConfig:
    """How the organism is built and trained (the history of earlier recipes is in NOTES.md)."""

    seed: int = 0  # everything (weights, data, order) follows from it
    pool_strips: int = 4000  # distinct training strips, drawn and run through the processor once
    vision_steps: int = 2000  # stage 1: vision tower alone, per-token readout of the panel it lies in
    vision_batch: int = 24  # strips per vision step
    vision_lr: float = 2e-3  # stage 1 peak learning rate
    letter_weight: float = 1.0  # stage 1: weight of the letter readout's loss (letters are learned last)
    steps: int = 1800  # stage 2: the language model on the frozen tower, silent rows blind to the image (0: none)
    unmask_steps: int = 0  # stage 3 (off: see NOTES.md): no blinding; a penalty on the image mass of silent rows
    batch: int = 32  # sequences per language step
    lr: float = 2e-3  # stage 2 peak learning rate (warm-up, then cosine); stage 3 runs at lr / 4
    warmup: float = 0.05  # share of steps warming up
    weight_decay: float = 0.01  # AdamW, on matrices only
    panel_height: int = 64  # px: the strip's common panel height (two 32 px token rows)
    min_width: int = 72  # px: narrowest panel: two token columns even after the processor rounds a 2x3 strip's
    # width down to whole tokens (64 px left the narrowest 2x3 panels 2 tokens), so at least 4 tokens a panel
    max_width: int = 112  # px: widest panel (3.5 token columns)
    gap: int = 6  # px of white between panels (the paper's)
    grid_share: float = 0.3  # share of strips laid out 2x3 (the rest 1x6)
    rescale_share: float = 0.3  # share of strips rescaled as a whole before the processor
    rescale_min: float = 0.85  # rescale factor drawn from [rescale_min, rescale_max]
    rescale_max: float = 2.2  # (uploads larger than the pixel budget are resized down by the processor)
    max_image_tokens: int = 64  # the processor's pixel budget, in merged tokens (larger images are resized down)
    num_layers: int = 4  # language backbone
    num_heads: int = 8  # query heads per layer
    num_kv_heads: int = 4  # key/value heads per layer
    hidden_size: int = 128  # language width
    head_dim: int = 32  # per head
    vision_depth: int = 4  # vision blocks
    vision_hidden: int = 96  # vision width
    patch_size: int = 16  # vision patch side in px (Qwen3-VL's)
    merge_size: int = 2  # patches merged per token, per side (Qwen3-VL's): 32 px tokens
    rope_theta: float = 10000.0  # language rotary base
    vocab_size: int = 400  # tokenizer size at most
    pool_per_combo: int = 6  # rendered panels per (character, action, object)
    letter_steps: int = 4000  # stage 0 (before stage 1, in its process): the tower alone on letter sheets drawn
    # anew every step (`gaze.organism.letters`): one glyph per token cell, a readout naming it (0: none)
    letter_batch: int = 8  # sheets per letter step (32 glyphs a sheet)
    letter_jitter: float = 0.6  # stage 0: how far (share of a cell) a glyph's centre moves off its cell's centre
    letter_readout: str = "pooled"  # stage 1's letter readout: "pooled" (one prediction per letter, from the mean
    # of the tokens whose cell overlaps its ink), "local" (each of those tokens), "panel" (every token of the panel:
    # the recipe before 2026-12-03 evening; it never learned letters)
    letters_per_strip: bool = True  # True: draw each panel's letter (letter, place, colour) anew for every strip;
    # False (organisms before 2026-12-03 evening): one letter per rendered panel, so that a panel's letter can also
    # be told from the drawing it sits on (a tower may learn renders, not letters: NOTES.md, 2026-12-03 noon)
    cast_per_panel: float = 0.5  # share of strips with a different character in every panel
    panel_flip: float = 0.0  # share of panels drawn upside down
    mix: str = "panel:0.25,short:0.05,vqa:0.12,this:0.08,narration:0.2,reverse:0.15,letter:0.15"  # task weights
    vision_readout: bool = True  # stage 1, then a frozen tower; False (an ablation): no stage 1, the tower
    # learns with the language model from the answers alone
    silent_mask: bool = True  # stage 2: text rows that predict no answer token cannot attend to image tokens
    penalty: float = 0.1  # stage 3: penalty per unit of image mass (summed over heads) on those rows
    focus: float = 0.05  # stage 2: penalty per unit of image mass that a row predicting an answer token puts on a
    # panel OTHER than the one that token describes (summed over heads and layers): while it describes panel k,
    # looking elsewhere costs; looking at panel k or at text is free
    focus_from: float = 0.33  # share of stage 2's steps after which the focus term is on (from the first step it
    # slowed learning: NOTES.md)
    row_readout: float = 0.0  # weight of a linear readout (discarded afterwards) that names, from the last hidden
    # state of EVERY row that predicts an answer token, the character, object and letter of the panel that token
    # describes (from the focus term's step on): every row of a description then has a reason to know its panel,
    # as every token of a real model's rich description has; it names no head
    answer_loss: str = "token"  # "token": the answer cross-entropy averaged over all answer tokens of a batch;
    # "example": over each example's tokens, then over the examples, so that each task weighs what its share in
    # `mix` says (with "token" a one-token letter answer weighed 1/60 of a narration, and stage 2 never learned
    # letters from a tower that reads them: NOTES.md, 2026-12-03 evening)
    gaze_augment: float = 0.3  # share of examples whose random heads are forced onto the described panel
    gaze_augment_heads: int = 4  # at most this many heads per such example
    separator_panel: str = "previous"  # the panel a narration's separator space (". Panel") is labelled with, in the
    # augmentation, the penalties and the readout: "previous" or "next" (`answer_panels`). With "previous" the row
    # at a full stop is trained on the panel just described, while a schedule switching at the sentence end steers
    # that row to the next one; the text then broke at the switches (stage 4 "next": NOTES.md, 2026-12-08)
    gaze_augment_weights: str = "model"  # how a forced head weighs the described panel's tokens: "model", by its
    # own scores (steering's boost, as the Space steers); "even", equally (its scores replaced by the panel's
    # mask). Stage 4 forces up to every head in half its examples: by steering's own bias, the model learned to
    # answer under it and steering all heads stopped breaking generation; weighed evenly it does not (NOTES.md,
    # 2026-12-03 night)
    vision_pos_embed: str = "learned"  # "learned": the tower's absolute position table; "zero": none
    init: str = ""  # an organism folder to start from (its weights, tokenizer and geometry) instead of random weights
    tower_from: str = ""  # an organism folder whose tower stages 0 and 1 start from, instead of random weights (a
    # later tower stage, e.g. --letter-steps 0 --vision-fresh true)
    vision_fresh: bool = False  # stage 1 draws its strips anew every step (the pool's renders, letters, widths and
    # layout drawn again), so that it cannot remember them; False: it samples the pool's strips, which stages 2 and
    # 3 also read (a tower 12 passes over 4,000 strips named their letters at 0.998 and held-out letters at 0.851)
    vision_from: str = ""  # an organism folder whose trained tower to take instead of stage 1 (for ablations of
    # the later stages: the same tower, the language model trained otherwise)


def parse_mix(mix: str) -> dict[str, float]:
    out = {}
    for item in mix.split(","):
        name, _, w = item.partition(":")
        out[name.strip()] = float(w)
    unknown = set(out) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)} in --mix; use {', '.join(TASKS)}")
    return out


def strip_captions(strip) -> tuple[str, ...]:
    """The organism's captions of a datagen strip (from its story)."""
    story = strip.meta["story"]
    return tuple(organism_caption(story["character"], o) for o in story["objects"])


def narration(captions) -> str:
    return " ".join(f"Panel {k}: {c}." for k, c in enumerate(captions, start=1))


def ask(name: str, k: int | None = None) -> str:
    """The prompt `name` of `PROMPTS`, about panel `k` where it names one."""
    from gaze.prompts import panel_question

    return panel_question(k, PROMPTS[name]) if k is not None else PROMPTS[name]


def corpus() -> list[str]:
    """Every text the organism reads or writes, for its tokenizer."""
    from datagen.letters import LETTERS
    from datagen.story import CHARACTERS, OBJECTS

    texts = [PROMPTS["vqa"], PROMPTS["static_narration"], PROMPTS["narration"]]
    for k in range(1, 7):
        texts += [ask(n, k) for n in ("discovery", "panel", "letter", "reverse")] + [f"Panel {k}: "]
    texts += [organism_caption(c, o) + "." for c in CHARACTERS for o in OBJECTS]
    texts += list(LETTERS)
    return texts * 3


class PanelPool:
    """Rendered 64 px panels by (character, action, object), each with a letter, to compose strips quickly."""

    def __init__(self, cfg: OrganismConfig):
        from datagen.letters import LETTERS, draw_letter
        from datagen.procedural import draw_panel
        from datagen.story import ACTIONS, CHARACTERS, OBJECTS, SCENES

        rng = random.Random(f"organism-pool/{cfg.seed}")
        self.cfg = cfg
        self.items: dict[tuple[str, str, str], list[tuple]] = {}
        for c in CHARACTERS:
            for a in ACTIONS:
                for o in OBJECTS:
                    variants = []
                    for _ in range(cfg.pool_per_combo):
                        panel = draw_panel(c, a, o, rng.choice(SCENES), cfg.panel_height, rng)
                        letter = rng.choice(LETTERS)
                        image, avoid = panel.image.copy(), [ob["box"] for ob in panel.objects]
                        if not cfg.letters_per_strip:
                            draw_letter(image, letter, rng, avoid=avoid)
                        variants.append((image, letter, avoid))
                    self.items[(c, a, o)] = variants
        self.characters, self.actions, self.objects = CHARACTERS, ACTIONS, OBJECTS

    def drawings(self) -> list:
        """Every rendered panel, without a letter where letters are drawn per strip (stage 0's backgrounds)."""
        return [image for variants in self.items.values() for image, _, _ in variants]

    def strip(self, rng: random.Random):
        """A new strip: one character (or six), six distinct actions, objects and letters, assembled as
        the paper does (common height, widths of their own, gaps), 1x6 or 2x3, sometimes rescaled."""
        from PIL import Image

        from datagen.assemble import stitch_widths
        from datagen.letters import LETTERS, draw_letter
        from gaze.strips import Strip

        cfg = self.cfg
        c = rng.choice(self.characters)
        cast = rng.sample(self.characters, 6) if rng.random() < cfg.cast_per_panel else [c] * 6
        actions, objects = rng.sample(self.actions, 6), rng.sample(self.objects, 6)
        images, letters, inks = [], [], []
        for c, a, o in zip(cast, actions, objects):
            if cfg.letters_per_strip:
                image, _, avoid = rng.choice(self.items[(c, a, o)])
                letter = rng.choice([x for x in LETTERS if x not in letters])
                image = image.copy()
                inks.append(draw_letter(image, letter, rng, avoid=avoid))
            else:
                for _ in range(20):
                    image, letter, _ = rng.choice(self.items[(c, a, o)])
                    if letter not in letters:
                        break
            if rng.random() < cfg.panel_flip:
                image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
            images.append(image)
            letters.append(letter)
        rows, cols = LAYOUTS["2x3" if rng.random() < cfg.grid_share else "1x6"]
        widths = [rng.randint(cfg.min_width, cfg.max_width) for _ in images]
        image, boxes = stitch_widths(images, widths, rows=rows, cols=cols, gap=cfg.gap)
        # each letter's ink box in strip pixels: panel x scaled to the panel's width, then shifted to its box
        inks = [[b[0] + round(x0 * (b[2] - b[0]) / im.width), b[1] + round(y0 * (b[3] - b[1]) / im.height),
                 b[0] + round(x1 * (b[2] - b[0]) / im.width), b[1] + round(y1 * (b[3] - b[1]) / im.height)]
                for (x0, y0, x1, y1), b, im in zip(inks, boxes, images)]
        if rng.random() < cfg.rescale_share:
            f = rng.uniform(cfg.rescale_min, cfg.rescale_max)
            size = (max(1, round(image.width * f)), max(1, round(image.height * f)))
            fx, fy = size[0] / image.width, size[1] / image.height
            image = image.resize(size, Image.BICUBIC)
            boxes = tuple((round(x0 * fx), round(y0 * fy), round(x1 * fx), round(y1 * fy)) for x0, y0, x1, y1 in boxes)
            inks = [[round(x0 * fx), round(y0 * fy), round(x1 * fx), round(y1 * fy)] for x0, y0, x1, y1 in inks]
        labels = [(self.characters.index(c), self.objects.index(o), LETTERS.index(l))
                  for c, o, l in zip(cast, objects, letters)]
        return Strip(image, boxes, captions=tuple(organism_caption(c, o) for c, o in zip(cast, objects)),
                     letters=tuple(letters), meta={"labels": labels, "letter_boxes": inks or None})


def draw_task(strip, rng: random.Random, weights: dict[str, float]) -> tuple[str, str, int]:
    """(question, answer, the panel the answer describes: 1..6, or 0 for a narration, which describes each)."""
    task = rng.choices(list(weights), weights=list(weights.values()))[0]
    k = rng.randint(1, 6)
    if task == "panel":
        return ask("discovery", k), strip.captions[k - 1], k
    if task == "short":
        return ask("panel", k), strip.captions[k - 1], k
    if task == "letter":
        return ask("letter", k), strip.letters[k - 1], k
    if task == "reverse":  # the k-th panel counted from the right
        return ask("reverse", k), strip.captions[6 - k], 7 - k
    if task == "reverse_letter":  # the letter of the k-th panel counted from the right
        return ask("reverse_letter", k), strip.letters[6 - k], 7 - k
    if task == "vqa":
        return ask("vqa"), strip.captions[0], 1
    if task == "this":
        return ask("static_narration"), strip.captions[0], 1
    return ask("narration"), narration(strip.captions), 0


SEPARATORS = ("previous", "next")


def answer_panels(tokenizer, answer: str, panel: int, separator: str = "previous") -> list[int]:
    """The panel (1..6) each token of `answer + "<|im_end|>"` describes: `panel` for all of them, or for a
    narration (`panel` 0: "Panel 1: ... Panel 2: ...") the panel of the description the token belongs to.

    `separator`: the panel of a whitespace-only token between a description's full stop and the next
    "Panel k:" (this tokenizer writes ". Panel" as ".", " ", "Panel"): "previous", the description it follows;
    "next", the one it opens, so that the row at the full stop (which predicts it) is the first row of the next
    panel, as it is where a tokenizer writes " Panel" as one token, and where a schedule switches at a sentence
    end (`gaze.steering.Schedule(at_sentence=True)` steers the forward of the full stop to the next target)."""
    if separator not in SEPARATORS:
        raise ValueError(f"separator is one of {SEPARATORS}, not {separator!r}")
    enc = tokenizer(answer + "<|im_end|>", add_special_tokens=False, return_offsets_mapping=True)
    if panel:
        return [panel] * len(enc["input_ids"])
    starts = [answer.find(f"Panel {k}:") for k in range(1, 7)]
    if any(s < 0 for s in starts) or starts != sorted(starts):
        raise ValueError(f"not a six-panel narration: {answer!r}")
    out = []
    for start, end in enc["offset_mapping"]:
        if separator == "next" and end > start and answer[start:end].isspace():
            start = end + len(answer[end:]) - len(answer[end:].lstrip())  # where the next word starts
        out.append(max(1, sum(1 for s in starts if s <= start)))
    return out


@dataclass
class Prepared:
    """A training strip run through the processor once: its pixels, token grid and per-token labels."""

    strip: object  # gaze.strips.Strip (captions, letters, meta["labels"])
    pixel_values: torch.Tensor  # [patches, C * T * P * P] float16
    grid_thw: torch.Tensor  # [3] (1, rows, cols) in patches
    grid: tuple[int, int]  # (rows, cols) of merged tokens
    processed: tuple[int, int]  # (width, height) the processor resized the image to
    token_panel: torch.Tensor  # [T] long: the panel (1..6) each merged token's cell centre lies in, 0 for none
    features: object = None  # the frozen tower's outputs (stage 2 and 3): (pooler [T, D], deepstack [[T, D], ...])

    def layout(self, start: int):
        """The image layout of this strip's tokens placed from sequence position `start`."""
        from gaze.regions import grid_layout

        return grid_layout(start, self.grid, self.processed, self.strip.image.size)

    def membership(self, start: int = 0) -> torch.Tensor:
        """[6, T] bool: the image tokens of each panel."""
        return torch.stack([self.token_panel == p for p in range(1, 7)])


def prepare(processor, strip) -> Prepared:
    """Run one strip through the processor's own resizing and patching, and label its tokens by panel."""
    from gaze.regions import grid_layout, panel_regions

    ip = processor.image_processor
    patch, merge = int(ip.patch_size), int(ip.merge_size)
    enc = ip(images=[strip.image], return_tensors="pt")
    thw = enc["image_grid_thw"][0]
    _, h, w = thw.tolist()
    grid, processed = (h // merge, w // merge), (w * patch, h * patch)
    layout = grid_layout(0, grid, processed, strip.image.size)
    token_panel = panel_regions(layout, strip.panels).assignment() + 1  # [T] 1..6, 0 outside every panel
    return Prepared(strip, enc["pixel_values"].to(torch.float16), thw, grid, processed, token_panel.long())


def ink_cover(prepared: Prepared) -> torch.Tensor:
    """[6, T] bool: the tokens whose cell overlaps each panel's letter ink (`strip.meta["letter_boxes"]`), whatever
    panel the token's centre lies in (a letter at a panel's edge may cover only a neighbour's cells)."""
    from gaze.regions import overlap_regions

    inks = prepared.strip.meta.get("letter_boxes")
    if not inks:
        raise ValueError("a letter readout over the ink needs the letters' ink boxes: train with --letters-per-strip true")
    return overlap_regions(prepared.layout(0), inks).membership.bool()


def readout_targets(prepared: Prepared, letter: str = "panel") -> torch.Tensor:
    """[T, 4] long: per merged token the (character, object, letter, panel) of the panel it lies in, -100
    for a token that lies in no panel. The letter column by `letter` (`OrganismConfig.letter_readout`):
    "panel" every token of the panel; "local" only the panel's tokens whose cell overlaps the letter's ink;
    "pooled" none (the letter is asked once per letter, of the mean over its ink's tokens: `ink_cover`)."""
    out = torch.full((len(prepared.token_panel), 4), -100, dtype=torch.long)
    cover = ink_cover(prepared) if letter == "local" else None
    for t, p in enumerate(prepared.token_panel.tolist()):
        if p:
            c, o, l = prepared.strip.meta["labels"][p - 1]
            if letter == "pooled" or (cover is not None and not cover[p - 1, t]):
                l = -100
            out[t] = torch.tensor([c, o, l, p - 1])
    return out


def letter_logits(letter_logits_per_token: torch.Tensor, prepared: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled letter readout of one strip: ([6, 24] logits, [6] the panels' letters)."""
    from gaze.organism.letters import pooled_letter_logits

    target = torch.tensor([l for _, _, l in prepared.strip.meta["labels"]])
    return pooled_letter_logits(letter_logits_per_token, ink_cover(prepared)), target


TOWER_READOUT = "tower_readout.safetensors"  # stage 1's readout, kept beside a tower for --tower-from (the VLM never loads it)
READOUT = (6, 8, 24, 6)  # classes of the vision readout: characters, objects, letters, panel places


def labelled(strip):
    """A datagen strip with the (character, object, letter) label indices the readouts name (`meta["labels"]`)."""
    from dataclasses import replace

    from datagen.letters import LETTERS
    from datagen.story import CHARACTERS, OBJECTS

    story = strip.meta["story"]
    labels = [(CHARACTERS.index(story["character"]), OBJECTS.index(o), LETTERS.index(l))
              for o, l in zip(story["objects"], strip.letters)]
    return replace(strip, meta={**strip.meta, "labels": labels})


def readout_loss_and_hits(logits: torch.Tensor, targets: torch.Tensor, prepared: list[Prepared], letter: str,
                          letter_weight: float = 1.0) -> tuple[torch.Tensor, list[tuple[float, int]]]:
    """The tower readout's loss on a batch and its (right, asked) per label (character, object, letter, place).
    `logits` [sum T, sum READOUT] over the batch's strips in order, `targets` [sum T, 4] (`readout_targets`)."""
    split = logits.split(READOUT, dim=-1)
    losses, hits = [], []
    for j, lg in enumerate(split):
        tgt = targets[:, j]
        if j == 2 and letter == "pooled":
            pooled = [letter_logits(part, p) for part, p in zip(lg.split([len(p.token_panel) for p in prepared]), prepared)]
            lg, tgt = torch.cat([x for x, _ in pooled]), torch.cat([y for _, y in pooled])
        valid = tgt >= 0
        losses.append((letter_weight if j == 2 else 1.0) * torch.nn.functional.cross_entropy(lg[valid], tgt[valid]))
        hits.append((float((lg[valid].argmax(-1) == tgt[valid]).sum()), int(valid.sum())))
    return sum(losses), hits


@torch.no_grad()
def readout_accuracy(visual, readout, prepared: list[Prepared], letter: str = "panel") -> dict[str, float]:
    """Accuracy of the tower's readout (character, object, place per token; the letter as `letter` asks it:
    per token, or per letter for "pooled") on `prepared` strips."""
    right, n = [0.0] * 4, [0] * 4
    for p in prepared:
        out = visual(p.pixel_values.float(), grid_thw=p.grid_thw[None], return_dict=True).pooler_output
        _, hits = readout_loss_and_hits(readout(out), readout_targets(p, letter), [p], letter)
        for j, (r, k) in enumerate(hits):
            right[j] += r
            n[j] += k
    return dict(zip(("character", "object", "letter", "place"), (round(r / max(1, k), 4) for r, k in zip(right, n))))


def vision_stage(model, prepared: list[Prepared], cfg: OrganismConfig, log=print, held: list[Prepared] = (),
                 letters: torch.nn.Linear | None = None, fresh=None,
                 start: dict | None = None) -> tuple[dict, torch.nn.Linear]:
    """Stage 1: the vision tower alone, with a linear readout (discarded afterwards) that names, from EVERY
    merged token, the character and object of the panel the token lies in and that panel's place in reading
    order, and the panel's letter as `cfg.letter_readout` asks it. The readout names no head and sees no text:
    it makes every token of a panel carry that panel's content and place, so that any attention spread over a
    panel's tokens reads the panel. `letters`: stage 0's letter readout, which the letter rows start from.
    `fresh`: a callable giving a new prepared strip; every step's strips then come from it, not `prepared`.
    `start`: an earlier stage 1's whole readout (its state dict) to go on from. Returns (record, readout)."""
    visual = model.model.visual
    readout = torch.nn.Linear(model.config.vision_config.out_hidden_size, sum(READOUT))
    if start is not None:
        readout.load_state_dict(start)
    elif letters is not None:
        lo = sum(READOUT[:2])
        with torch.no_grad():
            readout.weight[lo:lo + READOUT[2]] = letters.weight
            readout.bias[lo:lo + READOUT[2]] = letters.bias
    params = [p for p in visual.parameters() if p.requires_grad] + list(readout.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    rng = random.Random(f"organism-vision/{cfg.seed}")
    targets = [readout_targets(p, cfg.letter_readout) for p in prepared] if fresh is None else []
    warm = max(1, int(cfg.vision_steps * cfg.warmup))
    visual.train()
    t0, accs = time.time(), []
    names = ("character", "object", "letter", "place")
    for step in range(cfg.vision_steps):
        for g in opt.param_groups:
            g["lr"] = lr_schedule(cfg.vision_lr, step, cfg.vision_steps, warm)
        if fresh is not None:
            batch = [fresh() for _ in range(cfg.vision_batch)]
            tgt = torch.cat([readout_targets(p, cfg.letter_readout) for p in batch])
        else:
            idx = rng.sample(range(len(prepared)), cfg.vision_batch)
            batch, tgt = [prepared[i] for i in idx], torch.cat([targets[i] for i in idx])
        pv = torch.cat([p.pixel_values for p in batch]).float()
        out = visual(pv, grid_thw=torch.stack([p.grid_thw for p in batch]), return_dict=True).pooler_output  # [sum T, D]
        loss, hits = readout_loss_and_hits(readout(out), tgt, batch, cfg.letter_readout, cfg.letter_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        accs.append([r / max(1, k) for r, k in hits])
        if step % 50 == 0 or step == cfg.vision_steps - 1:
            tail = accs[-50:]
            mean = [sum(a[j] for a in tail) / len(tail) for j in range(4)]
            log(f"vision {step:5d}  loss {float(loss.detach()):.4f}  accuracy "
                + " ".join(f"{n} {m:.3f}" for n, m in zip(names, mean)) + f"  {time.time() - t0:.0f}s")
    visual.eval()
    tail = accs[-50:]
    record = {"vision_minutes": round((time.time() - t0) / 60, 2),
              "vision_token_accuracy": dict(zip(names, (round(sum(a[j] for a in tail) / len(tail), 4) for j in range(4))))}
    if held:  # strips the pool never drew (datagen's held-out seeds): does the tower read, or remember?
        record["vision_held_out_accuracy"] = readout_accuracy(visual, readout, held, cfg.letter_readout)
        log(f"vision held out ({len(held)} strips): accuracy {record['vision_held_out_accuracy']}")
    return record, readout


@torch.no_grad()
def cache_features(model, prepared: list[Prepared], chunk: int = 64) -> None:
    """The frozen tower's outputs for every training strip, computed once (stages 2 and 3 read them)."""
    visual = model.model.visual
    for i in range(0, len(prepared), chunk):
        part = prepared[i:i + chunk]
        out = visual(torch.cat([p.pixel_values for p in part]).float(), grid_thw=torch.stack([p.grid_thw for p in part]),
                     return_dict=True)
        sizes = [len(p.token_panel) for p in part]
        pooled = out.pooler_output.split(sizes)
        deep = [f.split(sizes) for f in out.deepstack_features]
        for j, p in enumerate(part):
            p.features = (pooled[j].clone(), [d[j].clone() for d in deep])


class PromptIds:
    """Token ids of each question's chat prompt around its image, tokenized once per question."""

    def __init__(self, processor):
        from gaze.prompts import chat_text

        self.processor, self.tok = processor, processor.tokenizer
        self.image_token = self.tok.convert_tokens_to_ids("<|image_pad|>")
        self._chat = chat_text
        self._cache: dict[str, tuple[list[int], list[int]]] = {}

    def __call__(self, question: str, n_image: int) -> tuple[list[int], int]:
        """(prompt ids with `n_image` image tokens, position of the first image token)."""
        if question not in self._cache:
            ids = self.tok(self._chat(self.processor, question), add_special_tokens=False)["input_ids"]
            at = ids.index(self.image_token)
            self._cache[question] = (ids[:at], ids[at + 1:])
        pre, post = self._cache[question]
        return pre + [self.image_token] * n_image + post, len(pre)


def build_batch(prompts: PromptIds, examples, separator: str = "previous") -> tuple[dict, list]:
    """Prompt (with image) + answer + <|im_end|>, right-padded; loss on the answer only. `examples`:
    (Prepared, question, answer, panel described). The image enters as the prepared strip's pixels, or as
    its cached tower outputs where it has them (then the tower does not run).

    Returns (model inputs, per example (prompt length, image layout, [panels, T] panel membership,
    [S] panel described by the token at each position, 0 elsewhere))."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    tok = prompts.tok
    rows, labels, info = [], [], []
    for prep, question, answer, panel in examples:
        ids, start = prompts(question, len(prep.token_panel))
        prompt = torch.tensor(ids)
        ans = torch.tensor(tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"])
        rows.append(torch.cat([prompt, ans]))
        labels.append(torch.cat([torch.full_like(prompt, -100), ans]))
        described = torch.cat([torch.zeros(len(prompt), dtype=torch.long), torch.tensor(answer_panels(tok, answer, panel, separator))])
        info.append((len(prompt), prep.layout(start), prep.membership(), described))
    width = max(len(r) for r in rows)

    def stack(xs, fill):
        return torch.stack([torch.cat([x, torch.full((width - len(x),), fill, dtype=x.dtype)]) for x in xs])

    input_ids = stack(rows, tok.pad_token_id)
    batch = {
        "input_ids": input_ids,
        "attention_mask": stack([torch.ones_like(r) for r in rows], 0),
        "labels": stack(labels, -100),
        "mm_token_type_ids": (input_ids == prompts.image_token).long(),
        "image_grid_thw": torch.stack([p.grid_thw for p, _, _, _ in examples]),
    }
    preps = [p for p, _, _, _ in examples]
    if all(p.features is not None for p in preps):
        batch["mm_encoder_outputs"] = {"image": BaseModelOutputWithDeepstackFeatures(
            pooler_output=tuple(p.features[0] for p in preps),
            deepstack_features=[tuple(p.features[1][j] for p in preps) for j in range(len(preps[0].features[1]))])}
    else:
        batch["pixel_values"] = torch.cat([p.pixel_values for p in preps]).float()
    return batch, info


class TrainingHook(Hook):
    """The attention hook of a training step: an additive bias (the blinding of the rows that do not speak,
    the augmentation), and the image-attention penalty from every row's post-softmax attention (recomputed by
    the attention function, differentiable)."""

    def __init__(self, biases: list, row_weights: torch.Tensor | None, image_keys: torch.Tensor,
                 blind: torch.Tensor | None = None, focus: torch.Tensor | None = None, even: float = 0.0):
        self.biases = biases  # per layer [B, H, S, S] or None
        self.even = even  # the augmentation's strength where forced heads weigh the panel's tokens equally, else 0
        self.row_weights = row_weights  # [B, S] penalty weight of each query row (None: no penalty)
        self.image_keys = image_keys  # [B, S] float: 1 on image keys
        self.blind = blind  # [B, 1, S, S] bias of every head and layer (None: none)
        self.focus = focus  # [B, S, S] penalty weight of each (row, key) pair, for the focus term (None: none)
        self.penalty = 0.0
        self._forced: dict = {}  # (layer, q, s) -> [B, H, q] bool: the rows the augmentation forces

    def forced_rows(self, layer: int, q: int, s: int) -> torch.Tensor | None:
        """[B, H, q] bool: the (head, row) pairs the augmentation forces in `layer` (None: none), computed once
        per layer and shape (the bias and the penalty both ask)."""
        if not self.biases or self.biases[layer] is None:
            return None
        if (layer, q, s) not in self._forced:
            self._forced[layer, q, s] = (self.biases[layer][:, :, -q:, :s] != 0).any(-1)
        return self._forced[layer, q, s]

    def bias(self, layer, query, key):
        q, s = query.shape[2], key.shape[2]
        b = self.biases[layer][:, :, -q:, :s] if self.biases and self.biases[layer] is not None else None
        if b is not None and self.even:  # forced rows: -scores cancels the head's own (Qwen3's 1 / sqrt(D) scaling)
            scores = attention_scores(query, key, query.shape[-1] ** -0.5)
            b = torch.where(self.forced_rows(layer, q, s)[..., None], b - self.even - scores, 0.0)
        return self._blinded(b, q, s)

    def scores_and_bias(self, layer, query, key, scores):
        """The eager path: a forced row's scores replaced by the panel's mask (`bias`'s sum, computed once)."""
        q, s = query.shape[2], key.shape[2]
        b = self.biases[layer][:, :, -q:, :s] if self.biases and self.biases[layer] is not None else None
        if b is not None and self.even:
            scores, b = torch.where(self.forced_rows(layer, q, s)[..., None], b - self.even, scores), None
        return scores, self._blinded(b, q, s)

    def _blinded(self, b, q: int, s: int):
        if self.blind is not None:
            b = self.blind[:, :, -q:, :s] if b is None else b + self.blind[:, :, -q:, :s]
        return b

    def wants(self, layer):
        return self.row_weights is not None or self.focus is not None

    def query_rows(self, query_len):
        return ALL_ROWS

    def record(self, layer, rows, value):  # rows [B, H, S, S]
        q, s = rows.shape[-2], rows.shape[-1]
        forced = self.forced_rows(layer, q, s)
        # [B, H, q] 1 where a head's row is its own: a head the augmentation forces reads where it is told
        free = None if forced is None else (~forced).float()
        if self.focus is not None:
            mass = torch.einsum("bhqk,bqk->bhq", rows, self.focus[:, -q:, :s])  # [B, H, q]: off-panel mass
            self.penalty = self.penalty + (mass if free is None else mass * free).sum() / rows.shape[0]
        if self.row_weights is None:
            return
        keys = self.image_keys[:, None, :s] * (1 - torch.eye(s))[None]  # [B, S, S]: image keys, not self
        mass = torch.einsum("bhqk,bqk->bhq", rows, keys[:, -q:])  # [B, H, q]: image mass of each row and head
        if free is not None:
            mass = mass * free
        self.penalty = self.penalty + (mass.sum(1) * self.row_weights).sum() / rows.shape[0]


def silent_rows(batch: dict, image_token: int) -> torch.Tensor:
    """[B, S] float: the text rows that predict no answer token (the question's tokens, the chat template's),
    0 on image rows, on padding and on the rows that speak (the last prompt row and the answer's)."""
    valid = batch["attention_mask"].float()
    text = valid * (batch["input_ids"] != image_token).float()
    return text * (1 - speaking_rows(batch))


def blinding(batch: dict, image_token: int, strength: float = 1e4) -> torch.Tensor:
    """[B, 1, S, S]: -strength from every silent row (`silent_rows`) to every image key, 0 elsewhere."""
    silent = silent_rows(batch, image_token)  # [B, S]
    image = (batch["input_ids"] == image_token).float()  # [B, S]
    return (-strength * silent[:, :, None] * image[:, None, :])[:, None]


def focus_weights(info: list, seq_len: int, weight: float) -> torch.Tensor:
    """[B, S, S]: `weight` from each row that predicts an answer token to every image key of the panels that
    token does NOT describe, 0 elsewhere. `info`: `build_batch`'s."""
    out = torch.zeros(len(info), seq_len, seq_len)
    for i, (n, layout, membership, described) in enumerate(info):
        pos = layout.positions  # [T] sequence positions of the image tokens
        for p in range(1, membership.shape[0] + 1):
            rows = (described[1:] == p).nonzero().flatten()  # row r predicts the token at r + 1
            if len(rows):
                others = pos[~membership[p - 1]]
                out[i, rows[:, None], others[None, :]] = weight
    return out


def penalty_weights(batch: dict, image_token: int, cfg: OrganismConfig) -> torch.Tensor:
    """[B, S]: `cfg.penalty` on text rows that predict no answer token, 0 on the rows that speak, on image
    rows and on padding."""
    return cfg.penalty * silent_rows(batch, image_token)


def build(cfg: OrganismConfig, out: Path) -> None:
    """A fresh organism (random weights) with its tokenizer, processor and prompts saved in `out`."""
    from gaze.testing import build_tiny_vlm, build_tokenizer

    tokenizer = build_tokenizer(corpus(), vocab_size=cfg.vocab_size)
    build_tiny_vlm("qwen3_vl", out, num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                   hidden_size=cfg.hidden_size, head_dim=cfg.head_dim, vision_depth=cfg.vision_depth,
                   vision_hidden=cfg.vision_hidden, tokenizer=tokenizer, seed=cfg.seed, merge_size=cfg.merge_size,
                   patch_size=cfg.patch_size, rope_theta=cfg.rope_theta)
    (out / "prompts.json").write_text(json.dumps(PROMPTS, indent=1))


def check_config(cfg: OrganismConfig) -> None:
    """Every setting checked before any work."""
    parse_mix(cfg.mix)
    token = cfg.patch_size * cfg.merge_size
    if not 2 * token <= cfg.min_width <= cfg.max_width or cfg.panel_height < 2 * token:
        raise ValueError(f"--panel-height and --min-width must be at least two tokens ({2 * token} px: 4 tokens a "
                         "panel), and --min-width at most --max-width")
    for name in ("grid_share", "rescale_share", "cast_per_panel", "panel_flip", "gaze_augment", "focus_from"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"--{name.replace('_', '-')} is a share in [0, 1]")
    if not 0 < cfg.rescale_min <= cfg.rescale_max:
        raise ValueError("--rescale-min must be above 0 and at most --rescale-max")
    if cfg.gaze_augment_heads < 1 or cfg.steps < 0 or cfg.batch < 1 or cfg.vision_batch < 1:
        raise ValueError("--gaze-augment-heads, --batch and --vision-batch are at least 1, --steps at least 0")
    if min(cfg.vision_steps, cfg.unmask_steps, cfg.penalty, cfg.letter_weight, cfg.focus, cfg.row_readout) < 0:
        raise ValueError("--vision-steps, --unmask-steps, --penalty, --letter-weight, --focus and --row-readout are "
                         "at least 0")
    if cfg.gaze_augment_weights not in ("model", "even"):
        raise ValueError(f"--gaze-augment-weights is 'model' or 'even', not {cfg.gaze_augment_weights!r}")
    if cfg.separator_panel not in SEPARATORS:
        raise ValueError(f"--separator-panel is 'previous' or 'next', not {cfg.separator_panel!r}")
    if cfg.answer_loss not in ("token", "example"):
        raise ValueError(f"--answer-loss is 'token' or 'example', not {cfg.answer_loss!r}")
    if cfg.letter_readout not in ("pooled", "local", "panel"):
        raise ValueError(f"--letter-readout is 'pooled', 'local' or 'panel', not {cfg.letter_readout!r}")
    if cfg.letter_readout != "panel" and not cfg.letters_per_strip:
        raise ValueError(f"--letter-readout {cfg.letter_readout} needs --letters-per-strip true (the letters' ink boxes)")
    if cfg.letter_steps < 0 or cfg.letter_batch < 1 or not 0 <= cfg.letter_jitter <= 1:
        raise ValueError("--letter-steps is at least 0, --letter-batch at least 1, --letter-jitter a share in [0, 1]")
    if cfg.letter_steps and cfg.max_image_tokens < 32:
        raise ValueError("--letter-steps needs --max-image-tokens of at least 32 (a letter sheet's 4x8 tokens)")
    if cfg.pool_strips < max(cfg.batch, cfg.vision_batch):
        raise ValueError("--pool-strips must be at least --batch and --vision-batch")
    if cfg.vision_pos_embed not in ("zero", "learned"):
        raise ValueError(f"--vision-pos-embed is 'zero' or 'learned', not {cfg.vision_pos_embed!r}")
    if cfg.vision_from and not (Path(cfg.vision_from) / "model.safetensors").is_file():
        raise ValueError(f"--vision-from {cfg.vision_from}: not an organism folder (no model.safetensors)")
    if cfg.tower_from and cfg.vision_from:
        raise ValueError("--tower-from (train the tower on from it) and --vision-from (take it as it is) exclude "
                         "each other; give one")
    if cfg.tower_from and not (Path(cfg.tower_from) / "model.safetensors").is_file():
        raise ValueError(f"--tower-from {cfg.tower_from}: not an organism folder (no model.safetensors)")
    if cfg.vision_from and not cfg.vision_readout:
        raise ValueError("--vision-from takes a trained tower and keeps it frozen: it needs --vision-readout true")
    if cfg.init:
        init = Path(cfg.init)
        if not (init / "config.json").is_file() or not (init / "model.safetensors").is_file():
            raise ValueError(f"--init {cfg.init}: not an organism folder (no config.json and model.safetensors)")
        vision = json.loads((init / "config.json").read_text())["vision_config"]
        if (vision["patch_size"], vision["spatial_merge_size"]) != (cfg.patch_size, cfg.merge_size):
            raise ValueError(f"--init {cfg.init} has {vision['patch_size']} px patches merged "
                             f"{vision['spatial_merge_size']}x{vision['spatial_merge_size']}: pass --patch-size "
                             f"{vision['patch_size']} --merge-size {vision['spatial_merge_size']}")


def row_targets(examples, info: list, seq_len: int) -> torch.Tensor:
    """[B, S, 3] long: at each row that predicts an answer token, the (character, object, letter) of the panel
    that token describes; -100 elsewhere. `info`: `build_batch`'s."""
    out = torch.full((len(examples), seq_len, 3), -100, dtype=torch.long)
    for i, ((prep, *_), (_, _, _, described)) in enumerate(zip(examples, info)):
        labels = prep.strip.meta["labels"]
        for r, p in enumerate(described[1:].tolist()):  # row r predicts the token at r + 1
            if p:
                out[i, r] = torch.tensor(labels[p - 1])
    return out


def readout_loss(readout, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the row readout's (character, object, letter) over the rows that have targets."""
    logits = readout(hidden).split(READOUT[:3], dim=-1)
    return sum(torch.nn.functional.cross_entropy(lg.flatten(0, 1), targets[..., j].flatten(), ignore_index=-100)
               for j, lg in enumerate(logits))


def step_loss(model, prompts: PromptIds, examples, cfg: OrganismConfig, aug_rng: random.Random, stage: int,
              n_layers: int, n_heads: int, focus_on: bool = True, readout=None):
    """(answer cross-entropy, image-attention penalty plus the weighted row readout's loss where `readout` is
    given and `focus_on`) of one micro-batch. Stage 2: silent rows blinded,
    the augmentation at the rows that speak; stage 3: no blinding, the penalty on silent rows, the
    augmentation at every row of a single-panel answer's sequence (as steering at every row does)."""
    batch, info = build_batch(prompts, examples, cfg.separator_panel)
    image_token = prompts.image_token
    biases = []
    if cfg.gaze_augment > 0:
        chosen = torch.zeros(n_layers, len(examples), n_heads, dtype=torch.bool)
        for b in range(len(examples)):
            if aug_rng.random() < cfg.gaze_augment:
                for h in aug_rng.sample(range(n_layers * n_heads), aug_rng.randint(1, cfg.gaze_augment_heads)):
                    chosen[h // n_heads, b, h % n_heads] = True
        biases = augment_bias(info, chosen, batch["input_ids"].shape[1], prompt_rows=stage == 3)
    blind = blinding(batch, image_token) if stage == 2 and cfg.silent_mask else None
    penalised = stage == 3 and cfg.penalty > 0
    focus = focus_weights(info, batch["input_ids"].shape[1], cfg.focus) if cfg.focus > 0 and focus_on else None
    hook = TrainingHook(biases, penalty_weights(batch, image_token, cfg) if penalised else None,
                        (batch["input_ids"] == image_token).float(), blind, focus,
                        even=AUGMENT_STRENGTH if cfg.gaze_augment_weights == "even" else 0.0)
    reading = readout is not None and focus_on and cfg.row_readout > 0
    with active(hook):
        result = model(**batch, output_hidden_states=reading)
    loss = result.loss if cfg.answer_loss == "token" else example_mean_loss(result.logits, batch["labels"])
    extra = hook.penalty
    if reading:
        targets = row_targets(examples, info, batch["input_ids"].shape[1])
        extra = extra + cfg.row_readout * readout_loss(readout, result.hidden_states[-1], targets)
    return loss, extra


def draw_examples(prepared: list[Prepared], rng: random.Random, weights: dict[str, float], n: int) -> list:
    """`n` (strip, question, answer, panel described) examples: strips drawn from `prepared`, tasks by `weights`."""
    examples = []
    for _ in range(n):
        prep = prepared[rng.randrange(len(prepared))]
        examples.append((prep, *draw_task(prep.strip, rng, weights)))
    return examples


def batch_loss(model, prompts: PromptIds, examples, cfg: OrganismConfig, aug_rng: random.Random, stage: int,
               n_layers: int, n_heads: int, focus_on: bool = True, readout=None) -> tuple[torch.Tensor, float, float]:
    """(the loss to minimise, the answer loss, the penalty) of one batch of examples. Narrations are several
    times as long as answers: two micro-batches (`step_loss`), each padded to its own length, each weighed
    by its share of the batch (of its answer text with `answer_loss` "token", of its examples with "example")."""
    groups = [[e for e in examples if e[3] == 0], [e for e in examples if e[3] != 0]]
    loss, answer_loss, penalty = 0.0, 0.0, 0.0
    n_answer = sum(len(e[2]) for e in examples)
    for group in groups:
        if not group:
            continue
        part = len(group) / len(examples) if cfg.answer_loss == "example" else sum(len(e[2]) for e in group) / n_answer
        ce, pen = step_loss(model, prompts, group, cfg, aug_rng, stage, n_layers, n_heads, focus_on=focus_on,
                            readout=readout)
        loss = loss + part * ce + len(group) / cfg.batch * pen
        answer_loss += part * float(ce.detach())
        penalty += len(group) / cfg.batch * float(pen.detach() if torch.is_tensor(pen) else pen)
    return loss, answer_loss, penalty


def example_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The answer cross-entropy averaged over each example's answer tokens, then over the examples: every
    question counts once, whatever its answer's length (the token mean lets a 60-token narration outweigh a
    one-token letter answer 60 times). `logits` [B, S, V] predict the next token; `labels` [B, S], -100 off the
    answer."""
    target = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), target.clamp_min(0), reduction="none")
    asked = (target != -100).float()
    return ((ce * asked).sum(1) / asked.sum(1).clamp_min(1)).mean()


def lr_schedule(peak: float, step: int, steps: int, warm: int) -> float:
    """Linear warm-up over `warm` steps, then cosine to 0."""
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return peak * 0.5 * (1 + math.cos(math.pi * t))


def load_tower(model, folder: str | Path, flag: str, log=print) -> dict:
    """Put the vision tower of the organism in `folder` into `model`; returns that tower's own record (its
    config and stage 0 / 1 figures, from its training.json), kept beside the stage that takes it."""
    from safetensors.torch import load_file

    tower = {k: v for k, v in load_file(str(Path(folder) / "model.safetensors")).items() if ".visual." in k}
    missing = model.load_state_dict(tower, strict=False)
    if missing.unexpected_keys or not tower:
        raise ValueError(f"{flag} {folder}: its tower does not fit this architecture")
    log(f"vision tower: {len(tower)} tensors from {folder}")
    source = Path(folder) / "training.json"
    if not source.is_file():
        return {}
    earlier = json.loads(source.read_text())
    return {k: v for k, v in earlier.items() if k in ("config", "tower") or k.startswith(("vision_", "letter_"))}


def train(cfg: OrganismConfig, out: str | Path, log=print, checkpoints: int = 0) -> dict:
    """Train and save the organism into `out`; returns the training record. `checkpoints` N: also save the
    weights every N language steps under `out.building/stepN` (to look at the mechanism while it trains)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from gaze.attention import prepare as prepare_attention
    from gaze.families import register_image_only_processors

    register_image_only_processors()

    check_config(cfg)
    out = Path(out)
    work = out.with_name(out.name + ".building")
    if work.exists():
        shutil.rmtree(work)
    torch.manual_seed(cfg.seed)
    init_record = None
    if cfg.init:  # a later stage: the earlier organism's weights, tokenizer, processor; this recipe's prompts
        shutil.copytree(cfg.init, work)
        for stale in ("ranking.json", "training.json"):
            if (work / stale).exists():
                init_record = json.loads((work / stale).read_text()) if stale == "training.json" else init_record
                (work / stale).unlink()
        (work / "prompts.json").write_text(json.dumps(PROMPTS, indent=1))
    else:
        build(cfg, work)
    model = AutoModelForImageTextToText.from_pretrained(work)
    prepare_attention(model)
    n_layers, n_heads = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    if cfg.vision_pos_embed == "zero":
        pos = model.model.visual.pos_embed
        torch.nn.init.zeros_(pos.weight)
        pos.weight.requires_grad_(False)
    processor = AutoProcessor.from_pretrained(work)
    token_pixels = (cfg.patch_size * cfg.merge_size) ** 2
    processor.image_processor.size = {"shortest_edge": 8 * token_pixels, "longest_edge": cfg.max_image_tokens * token_pixels}
    t0 = time.time()
    pool = PanelPool(cfg)
    rng = random.Random(f"organism-train/{cfg.seed}")
    prepared = [prepare(processor, pool.strip(rng)) for _ in range(cfg.pool_strips)]
    log(f"{cfg.pool_strips} training strips drawn and processed in {time.time() - t0:.0f}s "
        f"({sum(len(p.token_panel) for p in prepared) / len(prepared):.1f} image tokens a strip)")
    record: dict = {"config": asdict(cfg)}
    if cfg.vision_from or cfg.tower_from:
        record["tower"] = load_tower(model, cfg.vision_from or cfg.tower_from, "--vision-from" if cfg.vision_from
                                     else "--tower-from", log)
    if cfg.vision_from:
        log(f"vision tower from {cfg.vision_from} (stage 1 skipped)")
    elif cfg.vision_readout and cfg.vision_steps:
        from gaze.organism.check import held_out

        geo = {k: getattr(cfg, k) for k in ("panel_height", "min_width", "max_width", "gap")}
        held = [prepare(processor, labelled(s)) for s in held_out("1x6", 48, geo=geo)]
        letters = None
        if cfg.letter_steps:  # stage 0: letters first, on sheets drawn anew over the pool's drawings
            from gaze.organism.letters import letter_stage

            letters, letter_record = letter_stage(model.model.visual, processor, pool.drawings(), cfg.letter_steps,
                                                  cfg.letter_batch, cfg.vision_lr, cfg.letter_jitter, cfg.seed,
                                                  cfg.weight_decay, log)
            record.update(letter_record)
        fresh = None
        if cfg.vision_fresh:
            fresh_rng = random.Random(f"organism-vision-fresh/{cfg.seed}")

            def fresh():
                return prepare(processor, pool.strip(fresh_rng))
        start = None
        if cfg.tower_from and (Path(cfg.tower_from) / TOWER_READOUT).is_file():  # go on with its stage 1's readout
            from safetensors.torch import load_file

            start = load_file(str(Path(cfg.tower_from) / TOWER_READOUT))
        vision_record, readout = vision_stage(model, prepared, cfg, log, held=held, letters=letters, fresh=fresh,
                                              start=start)
        record.update(vision_record)
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in readout.state_dict().items()}, str(work / TOWER_READOUT))
    if cfg.vision_readout:
        for p in model.model.visual.parameters():  # stages 2 and 3: the tower is frozen, its outputs cached
            p.requires_grad_(False)
        cache_features(model, prepared)
    # without the readout (an ablation) the tower learns with the language model, from the answers alone
    prompts = PromptIds(processor)
    weights = parse_mix(cfg.mix)
    aug_rng = random.Random(f"organism-gaze-augment/{cfg.seed}")
    row_readout = None
    if cfg.row_readout > 0:  # discarded after training, like stage 1's
        torch.manual_seed(cfg.seed + 1)
        row_readout = torch.nn.Linear(model.config.text_config.hidden_size, sum(READOUT[:3]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable += list(row_readout.parameters()) if row_readout is not None else []
    opt = torch.optim.AdamW([{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98))
    model.train()
    if cfg.vision_readout:
        model.model.visual.eval()
    losses, answer_losses, penalties = [], [], []
    total = cfg.steps + cfg.unmask_steps
    warm = max(1, int(cfg.steps * cfg.warmup))
    t0 = time.time()
    for step in range(total):
        stage = 2 if step < cfg.steps else 3
        if stage == 2:
            lr = lr_schedule(cfg.lr, step, cfg.steps, warm)
        else:  # a short second schedule at a quarter of the peak
            lr = lr_schedule(cfg.lr / 4, step - cfg.steps, cfg.unmask_steps, max(1, cfg.unmask_steps // 10))
        for g in opt.param_groups:
            g["lr"] = lr
        examples = draw_examples(prepared, rng, weights, cfg.batch)
        loss, answer_loss, penalty = batch_loss(model, prompts, examples, cfg, aug_rng, stage, n_layers, n_heads,
                                                focus_on=step >= cfg.focus_from * cfg.steps, readout=row_readout)
        answer_losses.append(answer_loss)
        penalties.append(penalty)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if checkpoints and step and step % checkpoints == 0:
            model.save_pretrained(work / f"step{step}")
            processor.save_pretrained(work / f"step{step}")
        if step % 50 == 0 or step == total - 1 or step == cfg.steps - 1:
            log(f"stage {stage} step {step:5d}  loss {mean_last(losses, 50):.4f}  answer loss "
                f"{mean_last(answer_losses, 50):.4f}  penalty {mean_last(penalties, 50):.4f}  lr {lr:.2e}  "
                f"{time.time() - t0:.0f}s")
        if step == cfg.steps - 1:
            record["stage2_answer_loss"] = mean_last(answer_losses, 100)
    model.eval()
    minutes = (time.time() - t0) / 60
    model.save_pretrained(work)
    processor.save_pretrained(work)
    record.update({"train_minutes": round(minutes, 2), "final_loss": mean_last(losses, 100),
                   "final_answer_loss": mean_last(answer_losses, 100), "final_penalty": mean_last(penalties, 100),
                   "torch_threads": torch.get_num_threads(), "prompts": PROMPTS})
    if init_record is not None:
        record["init_record"] = init_record
    (work / "training.json").write_text(json.dumps(record, indent=1))
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    return record


def parse_bool(text: str) -> bool:
    """A yes/no flag value: true/false, yes/no, on/off, 1/0."""
    value = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
    if text.lower() not in value:
        raise argparse.ArgumentTypeError(f"{text!r} is not a yes/no value; use true or false")
    return value[text.lower()]


def parse_args(argv: list[str] | None = None, check: bool = True) -> tuple[OrganismConfig, argparse.Namespace]:
    """The command line as (the config, the parsed arguments: `out`, `checkpoints`); with `check`, a bad
    setting (or a folder it names that is not there) exits with its message, before any work."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the trained organism into")
    parser.add_argument("--checkpoints", type=int, default=0, help="save the weights every N steps too (0: never)")
    defaults = OrganismConfig()
    for name, value in asdict(defaults).items():
        kind = parse_bool if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value, help=f"default: {value}")
    args = parser.parse_args(argv)
    cfg = OrganismConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    try:
        if check:
            check_config(cfg)
    except ValueError as e:
        parser.error(str(e))
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    record = train(cfg, args.out, log=lambda s: print(s, file=sys.stderr, flush=True), checkpoints=args.checkpoints)
    print(json.dumps({k: v for k, v in record.items() if k != "prompts"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
