"""The organism's language training steps: the eager whole-matrix attention path vs the fused SDPA path.

    python benchmarks/bench_training_step.py --repeats 6

Stages 2-4 of `gaze.organism.train` run a hook that wants every attention row of every layer (the penalty,
the focus term) and, in stage 4, a bias built from the head's own scores (the even augmentation). On the
"eager" path (the default) each layer computes its scores and softmax once and shares them; on the "sdpa"
path the output comes from the fused kernel and the matrices are recomputed beside it (once more for the
even bias). Both paths take the same batches (the recipe's batch of 32, its strips, its mixes), in turns, on
the shipped organism's weights (the recipe's shape) with its tower's outputs cached as training caches them.
Prints seconds per step (forward and backward of both micro-batches; the optimiser step, the same on both
paths, is left out, so both see the same weights; the mean over `--repeats` batches, each run on both
paths in alternating order after one untimed warm-up batch), the ratio and the
largest relative difference of the losses.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import replace

import torch

from gaze.attention import prepare as prepare_attention
from gaze.attention import whole_matrix_path
from gaze.organism.train import (READOUT, OrganismConfig, PanelPool, PromptIds, batch_loss, cache_features,
                                 draw_examples, parse_mix, prepare)

LETTERS_MIX = "panel:0.07,short:0.02,vqa:0.03,this:0.02,narration:0.1,reverse:0.06,letter:0.6,reverse_letter:0.1"
STAGES = {  # the README recipe's settings of each language stage
    "stage 2": (2, {}),
    "stage 3": (2, dict(lr=1e-3, focus_from=0.0, row_readout=0.3, answer_loss="example")),
    "stage 4": (2, dict(lr=1e-3, focus_from=0.0, row_readout=0.3, answer_loss="example", gaze_augment_weights="even",
                        gaze_augment=0.5, gaze_augment_heads=32, mix=LETTERS_MIX)),
}


def main(argv=None) -> int:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from gaze.families import register_image_only_processors

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gaze/organism/weights", help="an organism folder (default: the shipped one)")
    ap.add_argument("--repeats", type=int, default=6, help="batches timed per stage, each on both paths")
    ap.add_argument("--strips", type=int, default=96, help="training strips drawn (the recipe draws 4,000)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.strips < 1:
        ap.error("--repeats and --strips must be at least 1")
    register_image_only_processors()
    base = OrganismConfig(pool_per_combo=1)
    model = prepare_attention(AutoModelForImageTextToText.from_pretrained(args.model))
    processor = AutoProcessor.from_pretrained(args.model)
    token_pixels = (base.patch_size * base.merge_size) ** 2
    processor.image_processor.size = {"shortest_edge": 8 * token_pixels,
                                      "longest_edge": base.max_image_tokens * token_pixels}
    pool, rng = PanelPool(base), random.Random(0)
    prepared = [prepare(processor, pool.strip(rng)) for _ in range(args.strips)]
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    cache_features(model, prepared)
    prompts = PromptIds(processor)
    text = model.config.text_config
    readout = torch.nn.Linear(text.hidden_size, sum(READOUT[:3]))
    model.train()
    model.model.visual.eval()
    print(f"model {args.model}, {text.num_hidden_layers} layers x {text.num_attention_heads} heads, batch "
          f"{base.batch}, {torch.get_num_threads()} torch threads")
    print(f"{'stage':8s} {'eager s/step':>13s} {'sdpa s/step':>12s} {'speed-up':>9s} {'loss rel diff':>14s}")
    for name, (stage, settings) in STAGES.items():
        cfg = replace(base, **settings)
        weights, draw = parse_mix(cfg.mix), random.Random(name)
        times: dict[str, list[float]] = {"eager": [], "sdpa": []}
        worst = 0.0
        for r in range(args.repeats + 1):  # the first turn warms up, untimed
            examples, aug_seed = draw_examples(prepared, draw, weights, cfg.batch), draw.random()
            losses = {}
            for path in ("eager", "sdpa") if r % 2 else ("sdpa", "eager"):
                t0 = time.perf_counter()
                with whole_matrix_path(path):
                    loss, _, _ = batch_loss(model, prompts, examples, cfg, random.Random(aug_seed), stage,
                                            text.num_hidden_layers, text.num_attention_heads, readout=readout)
                model.zero_grad(set_to_none=True)
                loss.backward()
                if r:
                    times[path].append(time.perf_counter() - t0)
                losses[path] = float(loss.detach())
            worst = max(worst, abs(losses["eager"] - losses["sdpa"]) / abs(losses["sdpa"]))
        eager, sdpa = sum(times["eager"]) / args.repeats, sum(times["sdpa"]) / args.repeats
        print(f"{name:8s} {eager:13.3f} {sdpa:12.3f} {sdpa / eager:8.2f}x {worst:14.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
