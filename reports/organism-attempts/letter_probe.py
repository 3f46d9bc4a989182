"""Can a panel's one image token carry its letter? Trains linear heads (letter, object, character) on the
vision tower's merged panel tokens and reports held-out accuracy (datagen.make_strip seeds 1,000,000+).

    python reports/organism-attempts/letter_probe.py frozen MODEL STEPS            # MODEL's tower, frozen
    python reports/organism-attempts/letter_probe.py fresh  -     STEPS HIDDEN DEPTH [PATCH MERGE]  # a new tower,
                                                                          # trained with the heads (default 32 px, 2x2)

Training strips come from the organism's panel pool with every letter drawn anew (`fresh_letters=1.0`),
so a letter cannot be memorised from the panel it sits on.
"""

import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import gaze.tiny  # noqa: F401  (processor registration)
from datagen import make_strip
from datagen.letters import LETTERS
from datagen.story import CHARACTERS, OBJECTS
from gaze.train_organism import OrganismConfig, PanelPool, build

mode, model_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
hidden, depth = (int(sys.argv[4]), int(sys.argv[5])) if mode == "fresh" else (96, 2)
patch, merge = (int(sys.argv[6]), int(sys.argv[7])) if len(sys.argv) > 7 else (32, 2)
torch.manual_seed(0)
cfg = OrganismConfig(vision_hidden=hidden, vision_depth=depth, patch_size=patch, merge_size=merge, fresh_letters=1.0,
                     pool_per_combo=4)
if mode == "fresh":
    model_dir = tempfile.mkdtemp()
    build(cfg, Path(model_dir))
model = AutoModelForImageTextToText.from_pretrained(model_dir)
proc = AutoProcessor.from_pretrained(model_dir)
vis = model.model.visual
if mode == "fresh":
    torch.nn.init.zeros_(vis.pos_embed.weight)
    vis.pos_embed.weight.requires_grad_(False)
else:
    vis.requires_grad_(False)
pool = PanelPool(cfg)
H = model.config.text_config.hidden_size
heads = torch.nn.ModuleDict({"L": torch.nn.Linear(H, len(LETTERS)), "O": torch.nn.Linear(H, len(OBJECTS)),
                             "C": torch.nn.Linear(H, len(CHARACTERS))})
params = list(heads.parameters()) + [p for p in vis.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=2e-3 if mode == "fresh" else 1e-2)


def tokens(images):
    enc = proc.image_processor(images=images, return_tensors="pt")
    out = vis(enc["pixel_values"], grid_thw=enc["image_grid_thw"]).pooler_output  # merged tokens, image by image
    t, h, w = enc["image_grid_thw"][0].tolist()
    rows, cols = h // merge, w // merge  # each image's tokens row by row; a panel is cols / 6 columns
    out = out.view(len(images), rows, 6, cols // 6, -1)
    return out.mean((1, 3)).flatten(0, 1)  # [6 per strip, H]: a panel's tokens averaged (one token: itself)


held = [make_strip(1_000_000 + i) for i in range(100)]
held_letters = torch.tensor([LETTERS.index(x) for s in held for x in s.letters])
held_objects = torch.tensor([OBJECTS.index(o) for s in held for o in s.meta["story"]["objects"]])
rng, ce, t0 = random.Random(1), torch.nn.functional.cross_entropy, time.time()
for step in range(steps):
    strips = [pool.strip(rng) for _ in range(32)]
    letters = torch.tensor([LETTERS.index(x) for s in strips for x in s.letters])
    objects = torch.tensor([OBJECTS.index(c.split(" with the ")[0]) for s in strips for c in s.captions])
    chars = torch.tensor([CHARACTERS.index(c.split(" with the ")[1]) for s in strips for c in s.captions])
    f = tokens([s.image for s in strips])
    loss = ce(heads["L"](f), letters) + ce(heads["O"](f), objects) + ce(heads["C"](f), chars)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if (step + 1) % 100 == 0:
        with torch.no_grad():
            f = tokens([s.image for s in held])
            la = (heads["L"](f).argmax(-1) == held_letters).float().mean()
            oa = (heads["O"](f).argmax(-1) == held_objects).float().mean()
        print(f"step {step + 1}  loss {loss.item():.3f}  held-out letter {la:.3f}  object {oa:.3f}  "
              f"(chance {1 / len(LETTERS):.3f}, {1 / len(OBJECTS):.3f})  {time.time() - t0:.0f}s", flush=True)
