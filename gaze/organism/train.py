"""Train the model organism: a tiny Qwen3-VL that really has gaze heads.

The shipped organism (`gaze/organism/weights/`) is two seeded stages, on 2 CPU cores (36 min in all):

    python -m gaze.organism.train --out runs/stage1                          # the defaults, about 28 min
    python -m gaze.organism.train --init runs/stage1 --out gaze/organism/weights --steps 900 --lr 1e-3 \
        --penalty-after-loss 99 --gaze-augment 0.5 --gaze-augment-heads 8 \
        --mix panel:0.3,letter:0.1,strip:0.15,this:0.15,narration:0.3      # about 8.5 min
    python -m gaze.organism.train --out /tmp/smoke --steps 5                  # a smoke run

The second stage forces, in half of its examples, 1-8 random heads onto the
panel being described at every answer row (`gaze_augment`): after stage 1 the
gaze heads read the image only at the row that picks the object, and steered
at every row they wrote the object again and again; after stage 2 a head
reading the described panel at a row that does not need it changes nothing.
It also adds the question "What is happening in this panel?" (the paper's
static narration prompt), answered like the whole-strip question.

Each 64 px panel is ONE image token (32 px patches, merged 2x2), so a head
that reads a panel has no choice of token within it (with 2x2 tokens per
panel, a head steered from the whole-strip question kept within-panel logits
formed for panel 1 and read the wrong tokens of the target). Half the
training strips have a different character in every panel. Earlier recipes
and what they showed are in `reports/organism-attempts/README.md`; `--init`
runs a further stage on top of a trained organism.

The organism is a real `Qwen3VLForConditionalGeneration` (vision tower and
language backbone both trained from scratch) with its own byte-level BPE
tokenizer, chat template and processor, saved beside the weights so that
`gaze.load("organism")` and `from_pretrained(folder)` load it offline.

Data: six-panel strips drawn by datagen's procedural renderer (a recurring
character; per panel an action, an object, a scene and an overlaid letter),
composed on the fly from a pool of rendered panels so every step sees new
strips. Tasks, all answered in short text:

    panel      "What is happening in the 3rd panel from the left?" -> "tree with the cat"
    letter     "Which letter is on the 3rd panel?"                 -> "K"
    strip      "What is the main action happening in this comic strip? Answer briefly."
               -> the FIRST panel's caption (as real VLMs tend to answer)
    this       "What is happening in this panel?" (names no panel) -> the first panel's caption too
               (not in the default mix; the shipped organism's second stage has it)
    narration  "Describe this comic strip panel by panel."         -> "1: ... 2: ... ... 6: ..."

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

from gaze.attention import ALL_ROWS, Hook, active, prepare, restore

EVAL_SEED0 = 1_000_000  # held-out strips: datagen.make_strip(EVAL_SEED0 + i); training never uses these seeds


@dataclass(frozen=True)
class OrganismConfig:
    """How the organism is built and trained (why each setting is what it is: NOTES.md)."""

    seed: int = 0  # everything (weights, data, order) follows from it
    steps: int = 3000  # optimiser steps
    batch: int = 32  # sequences per step
    lr: float = 1.5e-3  # peak learning rate (warm-up, then cosine)
    warmup: float = 0.05  # share of steps warming up
    weight_decay: float = 0.01  # AdamW, on matrices only
    panel_size: int = 64  # panel side in pixels, as drawn
    max_image_tokens: int = 0  # 0: the processor's stock pixel budget; N: at most N merged tokens per image
    num_layers: int = 4  # language layers
    num_heads: int = 8  # query heads per layer
    num_kv_heads: int = 4  # key/value heads per layer
    hidden_size: int = 128  # language width
    head_dim: int = 32  # per head
    vision_depth: int = 2  # vision blocks
    vision_hidden: int = 96  # vision width
    pool_per_combo: int = 24  # rendered panels per (character, action, object)
    mix: str = "panel:0.35,letter:0.15,strip:0.2,narration:0.3"  # task sampling weights
    vocab_size: int = 400  # tokenizer size at most
    image_attention_penalty: float = 0.05  # weight of the penalty on every query row's image mass
    penalty_kind: str = "l1"  # "l1": image mass summed over heads; "group": sum over heads of each head's RMS mass
    penalty_rows: str = "all"  # rows that pay: "all"; "prompt" (answer rows free); "silent" (text rows that predict no answer token)
    penalty_after_loss: float = 0.12  # the penalty switches on once the answer loss (mean of 50 steps) is below this
    penalty_ramp: int = 200  # steps over which the penalty grows to its full weight
    caption: str = "character"  # caption style (`organism_caption`): "character" or "scene"
    init: str = ""  # "": fresh random weights; a folder: a further stage on that organism
    panel_token_dropout: float = 0.0  # share of panels cut to ONE random token (the others zeroed)
    cast_per_panel: float = 0.5  # share of training strips with a different character in every panel
    panel_flip: float = 0.0  # share of training panels drawn upside down
    merge_size: int = 2  # patches per merged image token, per side
    fresh_letters: float = 0.0  # share of training panels whose letter is drawn anew per strip
    patch_size: int = 32  # vision patch side in pixels (32 with merge 2: a 64 px panel is ONE token)
    rope_theta: float = 100.0  # the language model's rotary base
    gaze_augment: float = 0.0  # share of examples whose random heads are forced onto the described panel
    gaze_augment_heads: int = 4  # at most this many heads per such example
    vision_pos_embed: str = "zero"  # "zero": no absolute position table in the vision tower; "learned"


TASKS = ("panel", "letter", "strip", "this", "narration")  # "this": "What is happening in this panel?" -> panel 1


def parse_mix(mix: str) -> dict[str, float]:
    out = {}
    for item in mix.split(","):
        name, w = item.split(":")
        out[name.strip()] = float(w)
    unknown = set(out) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)} in --mix; use {', '.join(TASKS)}")
    return out


CAPTION_STYLES = ("character", "scene")
PENALTY_KINDS = ("l1", "group")
PENALTY_ROWS = ("all", "prompt", "silent")


def organism_caption(character: str, obj: str, scene: str | None = None, style: str = "character") -> str:
    """What the organism says about a panel: its object first, then its character or its scene.

        "character"   "tree with the cat"   (the strip's recurring character)
        "scene"       "tree in the park"    (every content word depends on the panel)

    The object comes first so that the token right after the prompt already
    depends on the panel: discovery reads the LAST prompt token's attention, and
    an organism whose answers open with the same words whatever the panel ("the
    cat by a ...") reads the image only at a later answer row, where discovery
    does not look (a first organism so trained had gaze scores of 2e-4 at the
    last prompt token and 0.9 at the row before the object).

    The procedural panels also show an action (a pose and marks), but at 64 px a
    model this small does not learn to read it reliably (an organism got the
    action wrong on most held-out panels), so the organism's captions leave it out.
    """
    if style == "character":
        return f"{obj} with the {character}"
    if style == "scene":
        if scene is None:
            raise ValueError("a scene caption needs the panel's scene")
        return f"{obj} in the {scene}"
    raise ValueError(f"unknown caption style {style!r}; use one of {CAPTION_STYLES}")


def caption_style(model_dir: str | Path | None = None) -> str:
    """The caption style an organism was trained with (its training.json; "character" if not recorded)."""
    from gaze.models import ORGANISM_DIR

    record = Path(model_dir or ORGANISM_DIR) / "training.json"
    if not record.exists():
        return "character"
    return json.loads(record.read_text())["config"].get("caption", "character")


def strip_captions(strip, style: str = "character") -> tuple[str, ...]:
    """The organism's captions of a datagen strip (from its story)."""
    story = strip.meta["story"]
    scenes = story.get("scenes") or [None] * len(story["objects"])
    return tuple(organism_caption(story["character"], o, sc, style) for o, sc in zip(story["objects"], scenes))


def narration(captions) -> str:
    return " ".join(f"{k}: {c}." for k, c in enumerate(captions, start=1))


def corpus(style: str = "character") -> list[str]:
    """Every text the organism reads or writes, for its tokenizer."""
    from datagen.letters import LETTERS
    from datagen.story import CHARACTERS, OBJECTS, SCENES
    from gaze.prompts import LETTER_QUESTION, NARRATION_PROMPT, PANEL_QUESTION, STRIP_QUESTION, THIS_PANEL_QUESTION, panel_question

    texts = [STRIP_QUESTION, NARRATION_PROMPT, THIS_PANEL_QUESTION]
    for k in range(1, 7):
        texts += [panel_question(k, PANEL_QUESTION), panel_question(k, LETTER_QUESTION), f"{k}: "]
    if style == "character":
        texts += [organism_caption(c, o) + "." for c in CHARACTERS for o in OBJECTS]
    elif style == "scene":
        texts += [organism_caption("", o, sc, "scene") + "." for o in OBJECTS for sc in SCENES]
    else:
        raise ValueError(f"unknown caption style {style!r}; use one of {CAPTION_STYLES}")
    texts += list(LETTERS)
    return texts * 3


class PanelPool:
    """Rendered panels by (character, action, object), each with a letter, to compose strips quickly."""

    def __init__(self, cfg: OrganismConfig):
        from datagen.letters import LETTERS, draw_letter
        from datagen.procedural import draw_panel
        from datagen.story import ACTIONS, CHARACTERS, OBJECTS, SCENES

        rng = random.Random(f"organism-pool/{cfg.seed}")
        self.clean: dict[int, tuple] = {}
        self.fresh_letters = cfg.fresh_letters
        self.items: dict[tuple[str, str, str], list[tuple]] = {}
        for c in CHARACTERS:
            for a in ACTIONS:
                for o in OBJECTS:
                    variants = []
                    for _ in range(cfg.pool_per_combo):
                        scene = rng.choice(SCENES)
                        panel = draw_panel(c, a, o, scene, cfg.panel_size, rng)
                        letter = rng.choice(LETTERS)
                        image = panel.image.copy()
                        draw_letter(image, letter, rng, avoid=[ob["box"] for ob in panel.objects])
                        variants.append((image, letter, scene))
                        if cfg.fresh_letters > 0:  # the panel without its letter, and where its objects are
                            self.clean[id(image)] = (panel.image, [ob["box"] for ob in panel.objects])
                    self.items[(c, a, o)] = variants
        self.characters, self.actions, self.objects = CHARACTERS, ACTIONS, OBJECTS
        self.style = cfg.caption
        self.cast_per_panel = cfg.cast_per_panel
        self.panel_flip = cfg.panel_flip

    def strip(self, rng: random.Random):
        """A new strip: one character (or, for a `cast_per_panel` share, six: one per panel), six distinct
        actions, objects and letters (and scenes, for scene captions)."""
        from PIL import Image

        from gaze.strips import Strip, stitch_panels

        c = rng.choice(self.characters)
        actions = rng.sample(self.actions, 6)
        objects = rng.sample(self.objects, 6)
        cast = [c] * 6
        if self.cast_per_panel > 0 and rng.random() < self.cast_per_panel:  # no draw at 0: the default stream
            cast = rng.sample(self.characters, 6)
        images, letters, scenes = [], [], []
        for c, a, o in zip(cast, actions, objects):
            for _ in range(20 if self.style == "character" else 200):
                image, letter, scene = rng.choice(self.items[(c, a, o)])
                if letter not in letters and (self.style == "character" or scene not in scenes):
                    break
            if self.fresh_letters > 0 and rng.random() < self.fresh_letters:  # a new letter, where this draw puts it
                from datagen.letters import LETTERS, draw_letter

                clean, boxes = self.clean[id(image)]
                letter = rng.choice([x for x in LETTERS if x not in letters])
                image = clean.copy()
                draw_letter(image, letter, rng, avoid=boxes)
            if self.panel_flip > 0 and rng.random() < self.panel_flip:  # no draw at 0: the default stream
                image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
            images.append(image)
            letters.append(letter)
            scenes.append(scene)
        strip_image, boxes = stitch_panels(images)
        return Strip(strip_image, boxes, captions=tuple(organism_caption(c, o, sc, self.style) for c, o, sc in zip(cast, objects, scenes)),
                     letters=tuple(letters))


def draw_task(strip, rng: random.Random, weights: dict[str, float]) -> tuple[str, str, int]:
    """(question, answer, the panel the answer describes: 1..6, or 0 for a narration, which describes each)."""
    from gaze.prompts import (LETTER_QUESTION, NARRATION_PROMPT, PANEL_QUESTION, STRIP_QUESTION, THIS_PANEL_QUESTION,
                              panel_question)

    task = rng.choices(list(weights), weights=list(weights.values()))[0]
    k = rng.randint(1, 6)
    if task == "panel":
        return panel_question(k, PANEL_QUESTION), strip.captions[k - 1], k
    if task == "letter":
        return panel_question(k, LETTER_QUESTION), strip.letters[k - 1], k
    if task == "strip":
        return STRIP_QUESTION, strip.captions[0], 1
    if task == "this":  # a question that names no panel, answered like the whole-strip one: from the first panel
        return THIS_PANEL_QUESTION, strip.captions[0], 1
    return NARRATION_PROMPT, narration(strip.captions), 0


def answer_panels(tokenizer, answer: str, panel: int) -> list[int]:
    """The panel (1..6) each token of `answer + "<|im_end|>"` describes: `panel` for all of them, or for a
    narration (`panel` 0: "1: ... 2: ...") the panel of the caption the token belongs to (its "k: " too)."""
    enc = tokenizer(answer + "<|im_end|>", add_special_tokens=False, return_offsets_mapping=True)
    if panel:
        return [panel] * len(enc["input_ids"])
    starts = [answer.find(f"{k}: ") for k in range(1, 7)]
    if any(s < 0 for s in starts) or starts != sorted(starts):
        raise ValueError(f"not a six-panel narration: {answer!r}")
    return [max(1, sum(1 for s in starts if s <= start)) for start, _ in enc["offset_mapping"]]


def image_panels(batch: dict, examples, image_token: int, patch: int, merge: int) -> list[tuple]:
    """Per example: (its image layout, [T] the panel 1..6 of each image token, 0 for none), the one token ->
    panel map of the project (`regions.panel_regions`: a token belongs to the panel its cell centre is in)."""
    from gaze.regions import find_image_span, grid_layout, panel_regions

    out = []
    for b, (strip, *_rest) in enumerate(examples):
        start, _ = find_image_span(batch["input_ids"][b], image_token)
        _, h, w = batch["image_grid_thw"][b].tolist()
        layout = grid_layout(start, (h // merge, w // merge), (w * patch, h * patch), strip.image.size)
        out.append((layout, panel_regions(layout, strip.panels).assignment() + 1))
    return out


def image_token_panels(input_ids: torch.Tensor, panels: list[tuple]) -> torch.Tensor:
    """[B, S]: the panel (1..6) of each image token (`image_panels`), 0 elsewhere."""
    out = torch.zeros_like(input_ids)
    for b, (layout, of_panel) in enumerate(panels):
        out[b, layout.positions] = of_panel.to(out)
    return out


def example_layouts(batch: dict, panels: list[tuple]) -> list[tuple]:
    """Per example of a batch built with `panels`: (prompt length, image layout, [6, T] panel membership of
    the image tokens, [S] panel described by the token at each position), what `augment_bias` reads.
    `panels`: `image_panels` of the batch."""
    info = []
    for b, (layout, of_panel) in enumerate(panels):
        n = int((batch["labels"][b] != -100).nonzero()[0])  # the prompt: every position before the first label
        info.append((n, layout, torch.stack([of_panel == p for p in range(1, 7)]), batch["answer_panels"][b]))
    return info


def augment_bias(info: list, chosen: torch.Tensor, seq_len: int, strength: float = 1e4) -> list[torch.Tensor | None]:
    """Per layer, the bias [B, H, S, S] forcing the `chosen` heads ([L, B, H] bool) of each example onto the
    described panel at every row that predicts an answer token: steering's own key bias (`key_bias`, mode
    "boost"), row by row; None for a layer with no chosen head. `info`: `example_layouts`."""
    from gaze.steering import key_bias

    b = chosen.shape[1]
    pattern = torch.zeros(b, seq_len, seq_len)  # [B, S(rows), S(keys)]
    for i, (n, layout, membership, described) in enumerate(info):
        if not chosen[:, i].any():
            continue
        for p in range(1, membership.shape[0] + 1):
            rows = (described[1:] == p).nonzero().flatten()  # row r predicts the token at r + 1
            if len(rows):
                pattern[i, rows] = key_bias(membership[p - 1], layout, n, seq_len, strength, "boost")
    return [None if not sel.any() else pattern[:, None] * sel[:, :, None, None].float() for sel in chosen]


class TrainingHook(Hook):
    """A training step's attention hook (the project's one attention function, `gaze.attention`): the gaze
    augmentation's bias, and every row's post-softmax attention for the image-attention penalty
    (recomputed by `attention_weights`, differentiable)."""

    def __init__(self, biases: list, record_rows: bool):
        self.biases = biases  # per layer [B, H, S, S] or None
        self.record_rows = record_rows
        self.attentions: list[torch.Tensor] = []  # per layer [B, H, S, S], when recorded

    def bias(self, layer, query, key):
        b = self.biases[layer] if self.biases else None
        return None if b is None else b[:, :, -query.shape[2]:, :key.shape[2]]

    def wants(self, layer):
        return self.record_rows

    def query_rows(self, query_len):
        return ALL_ROWS

    def record(self, layer, rows, value):
        self.attentions.append(rows)


def build_batch(processor, examples, panels: list[int] | None = None) -> dict:
    """Prompt (with image) + answer + <|im_end|>, right-padded; loss on the answer only.

    With `panels` (per example, `draw_task`'s third value) the batch also holds "answer_panels" [B, S]: the
    panel each answer token describes (0 elsewhere); pop it before the forward."""
    from gaze.prompts import chat_text

    tok = processor.tokenizer
    enc = processor(text=[chat_text(processor, q) for _, q, _ in examples], images=[s.image for s, _, _ in examples],
                    return_tensors="pt", padding=True)
    rows, labels, types, described = [], [], [], []
    for i, (_, _, answer) in enumerate(examples):
        n = int(enc["attention_mask"][i].sum())
        prompt = enc["input_ids"][i, :n]
        ans = torch.tensor(tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"])
        rows.append(torch.cat([prompt, ans]))
        labels.append(torch.cat([torch.full_like(prompt, -100), ans]))
        types.append(torch.cat([enc["mm_token_type_ids"][i, :n], torch.zeros_like(ans)]))
        if panels is not None:
            per = torch.tensor(answer_panels(tok, answer, panels[i]))
            if len(per) != len(ans):
                raise ValueError(f"answer {answer!r}: {len(ans)} tokens but {len(per)} panel labels")
            described.append(torch.cat([torch.zeros_like(prompt), per]))
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id

    def stack(xs, fill):
        return torch.stack([torch.cat([x, torch.full((width - len(x),), fill, dtype=x.dtype)]) for x in xs])

    ids = stack(rows, pad)
    batch = {
        "input_ids": ids,
        "attention_mask": stack([torch.ones_like(r) for r in rows], 0),
        "labels": stack(labels, -100),
        "mm_token_type_ids": stack(types, 0),
        "pixel_values": enc["pixel_values"],
        "image_grid_thw": enc["image_grid_thw"],
    }
    if panels is not None:
        batch["answer_panels"] = stack(described, 0)
    return batch


def panel_token_keep(panels: list[torch.Tensor], share: float, rng: random.Random, n_panels: int = 6) -> torch.Tensor:
    """1 or 0 for every merged image token of a batch (the processor's order: image by image, each row by
    row), from each image's token -> panel map (`image_panels`): for a `share` of each image's panels, ONE
    random token of the panel is kept and its others are 0; every other panel keeps all its tokens."""
    keep = []
    for of_panel in panels:
        mask = torch.ones(len(of_panel))
        for p in range(1, n_panels + 1):
            if rng.random() < share:
                cells = (of_panel == p).nonzero().flatten().tolist()
                kept = rng.choice(cells)
                mask[[c for c in cells if c != kept]] = 0
        keep.append(mask)
    return torch.cat(keep)


class PanelTokenDropout:
    """Zeroes the image tokens `keep` marks 0 (and their deepstack features) as the vision tower hands
    them to the language model: a forward hook on `model.model.visual`, set per batch."""

    def __init__(self, model):
        self.keep: torch.Tensor | None = None
        self.handle = model.model.visual.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self.keep is None:
            return output
        m = self.keep.to(output.pooler_output)[:, None]
        if m.shape[0] != output.pooler_output.shape[0]:
            raise ValueError(f"keep mask for {m.shape[0]} tokens, vision tower gave {output.pooler_output.shape[0]}")
        output.pooler_output = output.pooler_output * m
        output.deepstack_features = [f * m for f in output.deepstack_features]
        return output


def speaking_rows(batch: dict) -> torch.Tensor:
    """[B, S] float: 1 on the rows that predict an answer token (the last prompt row and the answer's)."""
    speaks = torch.zeros_like(batch["labels"], dtype=torch.float)
    speaks[:, :-1] = (batch["labels"][:, 1:] != -100).float()
    return speaks


def image_attention_mass(attentions, batch: dict, image_token: int, kind: str = "l1", rows: str = "all") -> torch.Tensor:
    """The image-attention penalty, averaged over layers.

    "l1": the mean over query positions of the image mass summed over heads:
    reading the image costs the same whichever head does it, so training keeps
    the reading in few heads (each row may pick its own). "group": the sum over
    heads of each head's root-mean-square mass over all the batch's query
    positions, a group lasso whose marginal cost falls as a head reads more.
    Every query row counts, not only the answer's: question tokens that read
    the image and image tokens that read other image tokens would otherwise be
    side paths that carry a panel's content to the answer around those few
    heads. An image token's attention to itself is free (it is its own feature).
    With `rows="prompt"` the answer's own rows are free (the last prompt row,
    which predicts the answer's first token, still pays). With `rows="silent"`
    only the text rows that predict no answer token pay: the question's
    tokens (e.g. the ordinal "4th") reading the image cost, the rows that speak
    (the last prompt row and the answer's) and the image's own rows are free.
    """
    valid = batch["attention_mask"].float()  # [B, S]
    if rows == "prompt":
        valid = valid * (batch["labels"] == -100).float()
    elif rows == "silent":  # text rows that predict no answer token: the question reads the image, the row that speaks is free
        valid = valid * (1 - speaking_rows(batch)) * (batch["input_ids"] != image_token).float()
    elif rows != "all":
        raise ValueError(f"penalty rows are one of {PENALTY_ROWS}, not {rows!r}")
    image = (batch["input_ids"] == image_token).float()  # [B, S] image keys
    keys = image[:, None, :] * (1 - torch.eye(image.shape[1], device=image.device))[None]  # [B, S, S]: not self
    if kind not in PENALTY_KINDS:
        raise ValueError(f"penalty kind is 'l1' or 'group', not {kind!r}")
    n_valid = valid.sum().clamp_min(1)
    total = 0.0
    for att in attentions:  # [B, H, S, S]
        if kind == "l1":
            mass = (att.sum(1) * keys).sum(-1)  # [B, S]: summed over heads
            total = total + (mass * valid).sum() / n_valid
        else:
            mass = (att * keys[:, None]).sum(-1)  # [B, H, S]
            ms = (mass.square() * valid[:, None]).sum((0, 2)) / n_valid  # [H]: mean square per head
            total = total + (ms + 1e-8).sqrt().sum()
    return total / len(attentions)


def mean_last(values: list[float], n: int) -> float:
    """Mean of the last `n` values (0 for none)."""
    tail = values[-n:]
    return sum(tail) / max(1, len(tail))


def build(cfg: OrganismConfig, out: Path):
    """A fresh organism (random weights) with its tokenizer and processor saved in `out`."""
    from gaze.testing import build_tiny_vlm, build_tokenizer

    tokenizer = build_tokenizer(corpus(cfg.caption), vocab_size=cfg.vocab_size)
    build_tiny_vlm("qwen3_vl", out, num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                   hidden_size=cfg.hidden_size, head_dim=cfg.head_dim, vision_depth=cfg.vision_depth,
                   vision_hidden=cfg.vision_hidden, tokenizer=tokenizer, seed=cfg.seed, merge_size=cfg.merge_size,
                   patch_size=cfg.patch_size, rope_theta=cfg.rope_theta)


def train(cfg: OrganismConfig, out: str | Path, log=print) -> dict:
    """Train and save the organism into `out`; returns the training record."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from gaze.families import register_image_only_processors

    register_image_only_processors()

    # settings used only later (the penalty switches on after ~900 steps) are checked before any work
    if cfg.caption not in CAPTION_STYLES:
        raise ValueError(f"--caption is one of {CAPTION_STYLES}, not {cfg.caption!r}")
    if cfg.penalty_kind not in PENALTY_KINDS:
        raise ValueError(f"--penalty-kind is one of {PENALTY_KINDS}, not {cfg.penalty_kind!r}")
    if cfg.penalty_rows not in PENALTY_ROWS:
        raise ValueError(f"--penalty-rows is one of {PENALTY_ROWS}, not {cfg.penalty_rows!r}")
    out = Path(out)
    work = out.with_name(out.name + ".building")
    if cfg.init and not (Path(cfg.init) / "config.json").exists():
        raise ValueError(f"--init {cfg.init!r} is not a model folder (no config.json); give a trained organism's folder")
    if cfg.init:
        merge = json.loads((Path(cfg.init) / "processor_config.json").read_text())["image_processor"]["merge_size"]
        if merge != cfg.merge_size:
            raise ValueError(f"--init {cfg.init!r} merges {merge}x{merge} patches per token; give --merge-size {merge} "
                             "(a stage cannot change the token grid)")
    if work.exists():
        shutil.rmtree(work)
    torch.manual_seed(cfg.seed)
    earlier = None  # the training record of the organism this stage starts from
    if cfg.init:  # a second stage: the first stage's weights, tokenizer and processor
        shutil.copytree(cfg.init, work, ignore=shutil.ignore_patterns("ranking.json"))  # a ranking is of the old weights
        if (work / "training.json").exists():
            earlier = json.loads((work / "training.json").read_text())
            (work / "training.json").unlink()
    else:
        build(cfg, work)
    penalised = cfg.image_attention_penalty > 0
    if not 0 <= cfg.gaze_augment <= 1 or cfg.gaze_augment_heads < 1:
        raise ValueError("--gaze-augment is a share in [0, 1] and --gaze-augment-heads at least 1")
    model = prepare(AutoModelForImageTextToText.from_pretrained(work))  # the gaze attention: SDPA + hooks
    n_layers, n_heads = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    image_token = model.config.image_token_id
    if cfg.vision_pos_embed == "zero":
        pos = model.model.visual.pos_embed
        if not cfg.init:
            torch.nn.init.zeros_(pos.weight)
        pos.weight.requires_grad_(False)
    elif cfg.vision_pos_embed != "learned":
        raise ValueError(f"--vision-pos-embed is 'zero' or 'learned', not {cfg.vision_pos_embed!r}")
    processor = AutoProcessor.from_pretrained(work)
    merge = int(processor.image_processor.merge_size)
    patch = int(processor.image_processor.patch_size)
    if cfg.max_image_tokens:
        token_pixels = (int(processor.image_processor.patch_size) * merge) ** 2
        processor.image_processor.size = {"shortest_edge": token_pixels, "longest_edge": cfg.max_image_tokens * token_pixels}
    t0 = time.time()
    pool = PanelPool(cfg)
    log(f"panel pool: {sum(len(v) for v in pool.items.values())} panels in {time.time() - t0:.1f}s")
    weights = parse_mix(cfg.mix)
    rng = random.Random(f"organism-train/{cfg.seed}")
    drop_rng = random.Random(f"organism-token-dropout/{cfg.seed}")
    aug_rng = random.Random(f"organism-gaze-augment/{cfg.seed}")
    dropout = PanelTokenDropout(model) if cfg.panel_token_dropout > 0 else None
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2]
    no_decay = [p for n, p in trainable if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98))
    warm = max(1, int(cfg.steps * cfg.warmup))

    def lr_at(step: int) -> float:
        if step < warm:
            return cfg.lr * (step + 1) / warm
        t = (step - warm) / max(1, cfg.steps - warm)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))

    model.train()
    losses, answer_losses = [], []
    penalty_from = None  # the step at which the image-attention penalty switched on
    t0 = time.time()
    for step in range(cfg.steps):
        examples, panels = [], []
        for _ in range(cfg.batch):
            strip = pool.strip(rng)
            q, a, k = draw_task(strip, rng, weights)
            examples.append((strip, q, a))
            panels.append(k)
        batch = build_batch(processor, examples, panels if cfg.gaze_augment > 0 else None)
        biases = []
        if cfg.gaze_augment > 0:
            chosen = torch.zeros(n_layers, len(examples), n_heads, dtype=torch.bool)
            for b in range(len(examples)):
                if aug_rng.random() < cfg.gaze_augment:
                    for h in aug_rng.sample(range(n_layers * n_heads), aug_rng.randint(1, cfg.gaze_augment_heads)):
                        chosen[h // n_heads, b, h % n_heads] = True
            info = example_layouts(batch, image_panels(batch, examples, image_token, patch, merge))
            biases = augment_bias(info, chosen, batch["input_ids"].shape[1])
            batch.pop("answer_panels")
        if dropout is not None:
            maps = [of_panel for _, of_panel in image_panels(batch, examples, image_token, patch, merge)]
            dropout.keep = panel_token_keep(maps, cfg.panel_token_dropout, drop_rng)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        if (penalised and penalty_from is None and len(answer_losses) >= 50
                and mean_last(answer_losses, 50) < cfg.penalty_after_loss):
            penalty_from = step
            log(f"step {step:5d}  answer loss {mean_last(answer_losses, 50):.4f} < {cfg.penalty_after_loss}: "
                "image-attention penalty on")
        ramp = 0.0 if penalty_from is None else min(1.0, (step - penalty_from + 1) / max(1, cfg.penalty_ramp))
        hook = TrainingHook(biases, record_rows=ramp > 0)
        with active(hook):
            result = model(**batch)
        loss = result.loss
        answer_losses.append(float(loss.detach()))
        if ramp > 0:
            loss = loss + ramp * cfg.image_attention_penalty * image_attention_mass(hook.attentions, batch, image_token, cfg.penalty_kind,
                                                                                 cfg.penalty_rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == cfg.steps - 1:
            log(f"step {step:5d}  loss {mean_last(losses, 100):.4f}  answer loss {mean_last(answer_losses, 100):.4f}  "
                f"lr {lr_at(step):.2e}  {time.time() - t0:.0f}s")
    model.eval()
    restore(model)
    if dropout is not None:
        dropout.handle.remove()
    minutes = (time.time() - t0) / 60
    model.save_pretrained(work)
    processor.save_pretrained(work)
    record = {"config": asdict(cfg), "train_minutes": round(minutes, 2), "final_loss": mean_last(losses, 100),
              "final_answer_loss": mean_last(answer_losses, 100), "penalty_from_step": penalty_from,
              "torch_threads": torch.get_num_threads()}
    if earlier is not None:
        record["init_record"] = earlier  # stage by stage, the recipe that made `init`
    (work / "training.json").write_text(json.dumps(record, indent=1))
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "weights"))
    defaults = OrganismConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    cfg = OrganismConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    record = train(cfg, args.out, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
