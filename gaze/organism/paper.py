"""A recipe in development, NOT the shipped organism's (that is `train.py`): the paper's strips and prompts.

    python -m gaze.organism.paper --out runs/paper-organism      # 2,200 steps at batch 24: about 50 min, 2 cores
    python -m gaze.organism.paper --out /tmp/smoke --steps 5     # a smoke run

What its first runs showed (NOTES.md, 2026-12-02): with the penalty on from
the first step the model read the image nowhere; switched on at an answer
loss of 0.25, the loss never got there: in 2,650 steps at batch 16 (16 px
patches) and 1,400 steps at batch 24 (32 px patches, 128 px panels) the model
learned the strip's character but never located a panel's object (8% of
held-out panels, chance 12.5%). What follows describes the recipe as written.

The organism is a real `Qwen3VLForConditionalGeneration` (vision tower and
language backbone trained from scratch, Qwen3-VL's own 16 px patches merged
2x2 into 32 px tokens) with its own byte-level BPE tokenizer, chat template
and processor, saved beside the weights so that `gaze.load("organism")` and
`from_pretrained(folder)` load it offline. Its folder also records the prompts
it was trained on (`prompts.json`), which every command then uses.

Data: six-panel strips drawn by datagen's procedural renderer (a character,
an object, an action and a scene per panel), assembled as the paper does:
panels at one height (64 px: two token rows), widths drawn from 64..112 px
(2-3.5 token columns, not multiples of the token), 6 px white gaps; a share
laid out 2x3 (panels counted in reading order); a share rescaled as a whole,
so that the processor's own resizing moves the token grid. Tasks (the paper's
wordings, `PROMPTS`), all answered in short text:

    panel       discovery question about panel k        -> "tree with the cat"   (panel k's caption)
    short       "What is happening in the k-th panel from the left?" -> panel k
    vqa         "What is the main action or event ...?"  -> panel 1's caption (as real VLMs tend to answer)
    this        "What is happening in this panel of the comic strip?" -> panel 1's caption
    narration   the paper's narration prompt             -> "Panel 1: ... Panel 2: ... Panel 6: ..."
    reverse     "Read the comic in reverse, what is happening in the k-th panel from the left?"
                                                         -> the caption of the k-th panel from the right
    letter      "Which letter is on the k-th panel?"     -> panel k's letter

Two auxiliary terms, both stated in the README with an ablation:

- an image-attention penalty on the rows that do NOT speak: every text row of
  the prompt except the last (which predicts the answer's first token) pays
  `penalty` x the image mass it reads (summed over heads); rows that predict
  an answer token pay `answer_penalty` x theirs (image rows read for free).
  Without it a model this small reads panel k at the ordinal token ("4th")
  and carries it in the residual stream, and its last prompt row never looks
  at the image: the paper's gaze score (last row, raw mass) then finds
  nothing. The penalty names no head: any head may read, at the rows that speak.
- a label-consistent attention augmentation: in a share of examples, 1..N
  heads drawn at random (a new draw per example, any layer) are forced, with
  steering's own bias (`gaze.steering.key_bias`, through the same attention
  hook), onto the panel being described at every row that predicts an answer
  token, so that a head reading the described panel where it need not changes
  nothing (without it, steered answers loop: "tree withtree with ...").

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

from gaze.attention import ALL_ROWS, Hook, active, prepare
from gaze.organism.train import augment_bias, mean_last, organism_caption, speaking_rows

EVAL_SEED0 = 1_000_000  # held-out strips: datagen.make_strip(EVAL_SEED0 + i); training never uses these seeds

# The prompts this recipe trains on: the paper's wordings (its text and its code's); recorded as
# `prompts.json` in the organism's folder.
PROMPTS = {
    "discovery": "Look carefully at this six-panel comic strip. What is happening in the {ordinal} panel from the left? "
                 "Answer briefly.",
    "panel": "What is happening in the {ordinal} panel from the left?",
    "vqa": "What is the main action or event happening in this comic strip? Answer briefly.",
    "static_narration": "What is happening in this panel of the comic strip?",
    "narration": "Please describe what happens in each panel, in order. Start each panel description with "
                 "'Panel 1:', 'Panel 2:', and so on.",
    "letter": "Which letter is on the {ordinal} panel?",
    "reverse": "Read the comic in reverse, what is happening in the {ordinal} panel from the left?",
}
TASKS = ("panel", "short", "vqa", "this", "narration", "reverse", "letter")
LAYOUTS = {"1x6": (1, 6), "2x3": (2, 3)}


@dataclass(frozen=True)
class OrganismConfig:
    """How the organism is built and trained (the history of earlier recipes is in NOTES.md)."""

    seed: int = 0  # everything (weights, data, order) follows from it
    steps: int = 3600  # optimiser steps
    batch: int = 32  # sequences per step
    lr: float = 1.5e-3  # peak learning rate (warm-up, then cosine)
    warmup: float = 0.05  # share of steps warming up
    weight_decay: float = 0.01  # AdamW, on matrices only
    panel_height: int = 128  # px: the strip's common panel height (two 64 px token rows)
    min_width: int = 128  # px: narrowest panel (two token columns: at least 4 tokens a panel)
    max_width: int = 208  # px: widest panel
    gap: int = 6  # px of white between panels (the paper's)
    grid_share: float = 0.3  # share of strips laid out 2x3 (the rest 1x6)
    rescale_share: float = 0.25  # share of strips rescaled as a whole before the processor
    rescale_max: float = 1.6  # rescale factor drawn from [1 / rescale_max ** 0.5, rescale_max]
    max_image_tokens: int = 64  # the processor's pixel budget, in merged tokens (larger images are resized down)
    num_layers: int = 4  # language backbone
    num_heads: int = 8  # query heads per layer
    num_kv_heads: int = 4  # key/value heads per layer
    hidden_size: int = 128  # language width
    head_dim: int = 32  # per head
    vision_depth: int = 2  # vision blocks
    vision_hidden: int = 96  # vision width
    patch_size: int = 32  # vision patch side in px (Qwen3-VL's is 16: see NOTES.md)
    merge_size: int = 2  # patches merged per token, per side (Qwen3-VL's)
    rope_theta: float = 100.0  # language rotary base
    vocab_size: int = 400  # tokenizer size at most
    pool_per_combo: int = 12  # rendered panels per (character, action, object)
    cast_per_panel: float = 0.5  # share of strips with a different character in every panel
    panel_flip: float = 0.25  # share of panels drawn upside down (the object is then found by what it shows)
    mix: str = "panel:0.25,short:0.05,vqa:0.15,this:0.1,narration:0.3,reverse:0.15"  # task sampling weights
    penalty: float = 0.03  # image-attention penalty per unit of image mass on prompt rows that do not speak
    answer_penalty: float = 0.0  # the same on rows that predict an answer token
    penalty_after_loss: float = 0.25  # the penalty switches on once the answer loss (mean of the last 50 steps)
    # falls below this, i.e. once the model reads the image: on from the first step, it taught a first run
    # (2026-12-02) to read the image nowhere (no image mass at any row after 600 steps, answers blind)
    penalty_ramp: int = 300  # steps over which it grows from 0 to full weight
    gaze_augment: float = 0.3  # share of examples whose random heads are forced onto the described panel (from
    # the step the penalty switches on)
    gaze_augment_heads: int = 4  # at most this many heads per such example
    vision_pos_embed: str = "zero"  # "zero": no absolute position table in the vision tower; "learned"
    init: str = ""  # an organism folder to start from (its weights, tokenizer and geometry) instead of random weights


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
                        image = panel.image.copy()
                        draw_letter(image, letter, rng, avoid=[ob["box"] for ob in panel.objects])
                        variants.append((image, letter))
                    self.items[(c, a, o)] = variants
        self.characters, self.actions, self.objects = CHARACTERS, ACTIONS, OBJECTS

    def strip(self, rng: random.Random):
        """A new strip: one character (or six), six distinct actions, objects and letters, assembled as
        the paper does (common height, widths of their own, gaps), 1x6 or 2x3, sometimes rescaled."""
        from PIL import Image

        from datagen.assemble import stitch_widths
        from gaze.strips import Strip

        cfg = self.cfg
        c = rng.choice(self.characters)
        cast = rng.sample(self.characters, 6) if rng.random() < cfg.cast_per_panel else [c] * 6
        actions, objects = rng.sample(self.actions, 6), rng.sample(self.objects, 6)
        images, letters = [], []
        for c, a, o in zip(cast, actions, objects):
            for _ in range(20):
                image, letter = rng.choice(self.items[(c, a, o)])
                if letter not in letters:
                    break
            if rng.random() < cfg.panel_flip:
                image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
            images.append(image)
            letters.append(letter)
        rows, cols = LAYOUTS["2x3" if rng.random() < cfg.grid_share else "1x6"]
        widths = [rng.randint(cfg.min_width, cfg.max_width) for _ in images]
        image, boxes = stitch_widths(images, widths, rows=rows, cols=cols, gap=cfg.gap)
        if rng.random() < cfg.rescale_share:
            f = rng.uniform(cfg.rescale_max ** -0.5, cfg.rescale_max)
            size = (max(1, round(image.width * f)), max(1, round(image.height * f)))
            fx, fy = size[0] / image.width, size[1] / image.height
            image = image.resize(size, Image.BICUBIC)
            boxes = tuple((round(x0 * fx), round(y0 * fy), round(x1 * fx), round(y1 * fy)) for x0, y0, x1, y1 in boxes)
        return Strip(image, boxes, captions=tuple(organism_caption(c, o) for c, o in zip(cast, objects)),
                     letters=tuple(letters))


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
    if task == "vqa":
        return ask("vqa"), strip.captions[0], 1
    if task == "this":
        return ask("static_narration"), strip.captions[0], 1
    return ask("narration"), narration(strip.captions), 0


def answer_panels(tokenizer, answer: str, panel: int) -> list[int]:
    """The panel (1..6) each token of `answer + "<|im_end|>"` describes: `panel` for all of them, or for a
    narration (`panel` 0: "Panel 1: ... Panel 2: ...") the panel of the description the token belongs to."""
    enc = tokenizer(answer + "<|im_end|>", add_special_tokens=False, return_offsets_mapping=True)
    if panel:
        return [panel] * len(enc["input_ids"])
    starts = [answer.find(f"Panel {k}:") for k in range(1, 7)]
    if any(s < 0 for s in starts) or starts != sorted(starts):
        raise ValueError(f"not a six-panel narration: {answer!r}")
    return [max(1, sum(1 for s in starts if s <= start)) for start, _ in enc["offset_mapping"]]


def build_batch(processor, examples) -> tuple[dict, list]:
    """Prompt (with image) + answer + <|im_end|>, right-padded; loss on the answer only.

    Returns (model inputs, per example (prompt length, image layout, [panels, T] panel membership,
    [S] panel described by the token at each position, 0 elsewhere))."""
    from gaze.prompts import chat_text
    from gaze.regions import find_image_span, grid_layout, panel_regions

    tok = processor.tokenizer
    ip = processor.image_processor
    patch, merge = int(ip.patch_size), int(ip.merge_size)
    enc = processor(text=[chat_text(processor, q) for _, q, _, _ in examples],
                    images=[s.image for s, _, _, _ in examples], return_tensors="pt", padding=True)
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    rows, labels, types, info = [], [], [], []
    for i, (strip, _, answer, panel) in enumerate(examples):
        n = int(enc["attention_mask"][i].sum())
        prompt = enc["input_ids"][i, :n]
        ans = torch.tensor(tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"])
        rows.append(torch.cat([prompt, ans]))
        labels.append(torch.cat([torch.full_like(prompt, -100), ans]))
        types.append(torch.cat([enc["mm_token_type_ids"][i, :n], torch.zeros_like(ans)]))
        _, h, w = enc["image_grid_thw"][i].tolist()
        start, _ = find_image_span(prompt, image_token)
        layout = grid_layout(start, (h // merge, w // merge), (w * patch, h * patch), strip.image.size)
        membership = panel_regions(layout, strip.panels).membership.bool()  # [6, T]
        described = torch.cat([torch.zeros(n, dtype=torch.long), torch.tensor(answer_panels(tok, answer, panel))])
        info.append((n, layout, membership, described))
    width = max(len(r) for r in rows)

    def stack(xs, fill):
        return torch.stack([torch.cat([x, torch.full((width - len(x),), fill, dtype=x.dtype)]) for x in xs])

    batch = {
        "input_ids": stack(rows, tok.pad_token_id),
        "attention_mask": stack([torch.ones_like(r) for r in rows], 0),
        "labels": stack(labels, -100),
        "mm_token_type_ids": stack(types, 0),
        "pixel_values": enc["pixel_values"],
        "image_grid_thw": enc["image_grid_thw"],
    }
    return batch, info


class TrainingHook(Hook):
    """The attention hook of a training step: the augmentation's bias, and the image-attention penalty
    from every row's post-softmax attention (recomputed by the attention function, differentiable)."""

    def __init__(self, biases: list, row_weights: torch.Tensor | None, image_keys: torch.Tensor):
        self.biases = biases  # per layer [B, H, S, S] or None
        self.row_weights = row_weights  # [B, S] penalty weight of each query row (None: no penalty)
        self.image_keys = image_keys  # [B, S] float: 1 on image keys
        self.penalty = 0.0

    def bias(self, layer, query, key):
        b = self.biases[layer] if self.biases else None
        return None if b is None else b[:, :, -query.shape[2]:, :key.shape[2]]

    def wants(self, layer):
        return self.row_weights is not None

    def query_rows(self, query_len):
        return ALL_ROWS

    def record(self, layer, rows, value):  # rows [B, H, S, S]
        s = rows.shape[-1]
        keys = self.image_keys[:, None, :s] * (1 - torch.eye(s))[None]  # [B, S, S]: image keys, not self
        mass = (rows.sum(1) * keys).sum(-1)  # [B, S]: image mass of each row, summed over heads
        self.penalty = self.penalty + (mass * self.row_weights).sum() / rows.shape[0]


def penalty_weights(batch: dict, image_token: int, cfg: OrganismConfig) -> torch.Tensor:
    """[B, S]: `cfg.penalty` on text rows that predict no answer token, `cfg.answer_penalty` on rows that
    predict one (the last prompt row and the answer's), 0 on image rows and padding."""
    valid = batch["attention_mask"].float()
    speaks = speaking_rows(batch)
    text = valid * (batch["input_ids"] != image_token).float()
    return text * (speaks * cfg.answer_penalty + (1 - speaks) * cfg.penalty)


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
    for name in ("grid_share", "rescale_share", "cast_per_panel", "panel_flip", "gaze_augment"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"--{name.replace('_', '-')} is a share in [0, 1]")
    if cfg.gaze_augment_heads < 1 or cfg.steps < 1 or cfg.batch < 1:
        raise ValueError("--gaze-augment-heads, --steps and --batch are at least 1")
    if cfg.vision_pos_embed not in ("zero", "learned"):
        raise ValueError(f"--vision-pos-embed is 'zero' or 'learned', not {cfg.vision_pos_embed!r}")
    if cfg.init:
        init = Path(cfg.init)
        if not (init / "config.json").is_file() or not (init / "model.safetensors").is_file():
            raise ValueError(f"--init {cfg.init}: not an organism folder (no config.json and model.safetensors)")
        vision = json.loads((init / "config.json").read_text())["vision_config"]
        if (vision["patch_size"], vision["spatial_merge_size"]) != (cfg.patch_size, cfg.merge_size):
            raise ValueError(f"--init {cfg.init} has {vision['patch_size']} px patches merged "
                             f"{vision['spatial_merge_size']}x{vision['spatial_merge_size']}: pass --patch-size "
                             f"{vision['patch_size']} --merge-size {vision['spatial_merge_size']}")


def step_loss(model, processor, examples, cfg: OrganismConfig, aug_rng: random.Random, ramp: float, n_layers: int,
              n_heads: int, image_token: int):
    """(answer cross-entropy, image-attention penalty) of one micro-batch, with its gaze augmentation."""
    batch, info = build_batch(processor, examples)
    biases = []
    if cfg.gaze_augment > 0 and ramp > 0:
        chosen = torch.zeros(n_layers, len(examples), n_heads, dtype=torch.bool)
        for b in range(len(examples)):
            if aug_rng.random() < cfg.gaze_augment:
                for h in aug_rng.sample(range(n_layers * n_heads), aug_rng.randint(1, cfg.gaze_augment_heads)):
                    chosen[h // n_heads, b, h % n_heads] = True
        biases = augment_bias(info, chosen, batch["input_ids"].shape[1])
    penalised = ramp > 0 and (cfg.penalty > 0 or cfg.answer_penalty > 0)
    hook = TrainingHook(biases, ramp * penalty_weights(batch, image_token, cfg) if penalised else None,
                        (batch["input_ids"] == image_token).float())
    with active(hook):
        result = model(**batch)
    return result.loss, hook.penalty


def train(cfg: OrganismConfig, out: str | Path, log=print, checkpoints: int = 0) -> dict:
    """Train and save the organism into `out`; returns the training record. `checkpoints` N: also save the
    weights every N steps under `out.building/stepN` (to look at the mechanism while it trains)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

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
    prepare(model)
    n_layers, n_heads = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    image_token = model.config.image_token_id
    if cfg.vision_pos_embed == "zero":
        pos = model.model.visual.pos_embed
        torch.nn.init.zeros_(pos.weight)
        pos.weight.requires_grad_(False)
    processor = AutoProcessor.from_pretrained(work)
    token_pixels = (cfg.patch_size * cfg.merge_size) ** 2
    processor.image_processor.size = {"shortest_edge": 8 * token_pixels, "longest_edge": cfg.max_image_tokens * token_pixels}
    t0 = time.time()
    pool = PanelPool(cfg)
    log(f"panel pool: {sum(len(v) for v in pool.items.values())} panels in {time.time() - t0:.1f}s")
    weights = parse_mix(cfg.mix)
    rng = random.Random(f"organism-train/{cfg.seed}")
    aug_rng = random.Random(f"organism-gaze-augment/{cfg.seed}")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98))
    warm = max(1, int(cfg.steps * cfg.warmup))

    def lr_at(step: int) -> float:
        if step < warm:
            return cfg.lr * (step + 1) / warm
        t = (step - warm) / max(1, cfg.steps - warm)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))

    model.train()
    losses, answer_losses, penalties = [], [], []
    penalty_from = None  # the step at which the image-attention penalty switched on
    t0 = time.time()
    for step in range(cfg.steps):
        examples = []
        for _ in range(cfg.batch):
            strip = pool.strip(rng)
            examples.append((strip, *draw_task(strip, rng, weights)))
        if (penalty_from is None and len(answer_losses) >= 50
                and mean_last(answer_losses, 50) < cfg.penalty_after_loss):
            penalty_from = step
            log(f"step {step:5d}  answer loss {mean_last(answer_losses, 50):.4f} < {cfg.penalty_after_loss}: penalty on")
        ramp = 0.0 if penalty_from is None else min(1.0, (step - penalty_from + 1) / max(1, cfg.penalty_ramp))
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        # narrations are twice as long as answers: two micro-batches, each padded to its own length
        groups = [[e for e in examples if e[3] == 0], [e for e in examples if e[3] != 0]]
        loss, answer_loss, penalty = 0.0, 0.0, 0.0
        n_answer = sum(len(e[2]) for e in examples)
        for group in groups:
            if not group:
                continue
            part = sum(len(e[2]) for e in group) / n_answer  # share of the batch's answer text
            ce, pen = step_loss(model, processor, group, cfg, aug_rng, ramp, n_layers, n_heads, image_token)
            loss = loss + part * ce + len(group) / cfg.batch * pen
            answer_loss += part * float(ce.detach())
            penalty += len(group) / cfg.batch * float(pen.detach() if torch.is_tensor(pen) else pen)
        answer_losses.append(answer_loss)
        penalties.append(penalty)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if checkpoints and step and step % checkpoints == 0:
            model.save_pretrained(work / f"step{step}")
            processor.save_pretrained(work / f"step{step}")
        if step % 50 == 0 or step == cfg.steps - 1:
            log(f"step {step:5d}  loss {mean_last(losses, 50):.4f}  answer loss {mean_last(answer_losses, 50):.4f}  "
                f"penalty {mean_last(penalties, 50):.4f}  lr {lr_at(step):.2e}  {time.time() - t0:.0f}s")
    model.eval()
    minutes = (time.time() - t0) / 60
    model.save_pretrained(work)
    processor.save_pretrained(work)
    record = {"config": asdict(cfg), "train_minutes": round(minutes, 2), "final_loss": mean_last(losses, 100),
              "final_answer_loss": mean_last(answer_losses, 100), "final_penalty": mean_last(penalties, 100), "penalty_from_step": penalty_from,
              "torch_threads": torch.get_num_threads(), "prompts": PROMPTS}
    if init_record is not None:
        record["init_record"] = init_record
    (work / "training.json").write_text(json.dumps(record, indent=1))
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the trained organism into")
    parser.add_argument("--checkpoints", type=int, default=0, help="save the weights every N steps too (0: never)")
    defaults = OrganismConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, help=f"default: {value}")
    args = parser.parse_args(argv)
    cfg = OrganismConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    try:
        check_config(cfg)
    except ValueError as e:
        parser.error(str(e))
    record = train(cfg, args.out, log=lambda s: print(s, file=sys.stderr, flush=True), checkpoints=args.checkpoints)
    print(json.dumps({k: v for k, v in record.items() if k != "prompts"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
