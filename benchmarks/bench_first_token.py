"""Time to the first generated token: with the image prefix cached (`gaze.generation.PrefixCache`) vs without.

    python benchmarks/bench_first_token.py                       # the organism and the 2B-shaped model
    python benchmarks/bench_first_token.py --model organism --repeats 5
    python benchmarks/bench_first_token.py --model 2b-shape --panel-size 128   # a smaller strip (96 image tokens)

Both columns call `gaze.generation.generate` on the same model, image and
question, greedy, and time from the call to the first token's `on_token`
event (preprocessing, prefix lookup, the cache copy, the prefill and the first
token's logits all included). "cached" runs after one warm-up call has put the
image prefix in the cache (what every click, hover or question after the
first on an image gets); "first use" is the warm-up itself (prefix + suffix).
The steering is the live/hover setting: top-K heads, phase "after_image"
(exact on a cached prefix; see `gaze.generation`). Best of `--repeats`.

`2b-shape` is a randomly initialised Qwen3-VL whose language backbone has the
shape of Qwen3-VL-2B (28 layers, 16 heads, 8 KV heads, head dim 128, hidden
2048, MLP 6144; `bench_discovery.build_2b_shape`), with a small vision tower:
the vision tower the cache also skips is not 2B-sized, so its ratio is a lower bound.

Measured 2026-12-03 on the project's CPU machine (2 cores shared with a training
job, niced, float32, OMP_NUM_THREADS=1, --repeats 2 for the 2B shape, 3 for the organism):

| model | prompt (image) tokens | uncached | cached | ratio | target |
| --- | --- | --- | --- | --- | --- |
| organism | 38 (6) | 31.5 ms | 16.2 ms | 1.94x | cached < 300 ms (met) |
| 2b-shape, 256 px panels (default) | 422 (384) | 9353 ms | 1498 ms | 6.24x | >= 3x (met) |
| 2b-shape, --panel-size 128 | 134 (96) | 3312 ms | 2194 ms | 1.51x | (small image: the ~38-token question suffix dominates) |

On CPU a forward over a few dozen tokens is bound by reading the 2B weights, so
the cached first token costs about one decode step whatever the image; the
ratio grows with the image's token count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_discovery import build_2b_shape  # noqa: E402

QUESTION = "What is the main action happening in this comic strip? Answer briefly."


def first_token_s(loaded, image, panels, heads, cache) -> float:
    from gaze.generation import generate
    from gaze.steering import LiveTarget, Panel

    seen: list[float] = []
    start = time.perf_counter()

    def on_token(event):
        if not seen:
            seen.append(time.perf_counter() - start)

    generate(loaded, image, QUESTION, heads=heads, target=LiveTarget(Panel(2)), panels=panels, phase="after_image",
             max_new_tokens=1, on_token=on_token, prefix_cache=cache)
    return seen[0]


def bench(name: str, args) -> dict:
    from datagen import make_strip
    from gaze.generation import PrefixCache, prepare_inputs
    from gaze.models import load, resolve

    path = str(build_2b_shape(Path(tempfile.mkdtemp()) / "2b")) if name == "2b-shape" else resolve(name)
    loaded = load(path, device=args.device, dtype=args.dtype)
    if name == "organism":
        from space.scene import example_entries, load_example

        scene = load_example(example_entries("strip")[0]["name"])
        image, panels = scene.image, scene.panels
    else:
        strip = make_strip(4_000_000, panel_size=args.panel_size)
        image, panels = strip.image, strip.panels
    inputs, layout = prepare_inputs(loaded, image, QUESTION)
    g = torch.Generator().manual_seed(0)
    flat = torch.randperm(loaded.n_layers * loaded.n_heads, generator=g)[: args.top_k].tolist()
    heads = [(i // loaded.n_heads, i % loaded.n_heads) for i in flat]
    first_token_s(loaded, image, panels, heads, None)  # warm-up (allocator, kernels)
    uncached = [first_token_s(loaded, image, panels, heads, None) for _ in range(args.repeats)]
    firsts, cached = [], []
    for _ in range(args.repeats):
        cache = PrefixCache()
        firsts.append(first_token_s(loaded, image, panels, heads, cache))
        cached += [first_token_s(loaded, image, panels, heads, cache) for _ in range(2)]
    return dict(model=name, prompt=int(inputs["input_ids"].shape[1]), image_tokens=layout.n_tokens,
                uncached=min(uncached), first=min(firsts), cached=min(cached),
                cached_median=statistics.median(cached))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="both", help="organism, 2b-shape, a folder or hub id, or 'both'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--panel-size", type=int, default=256, help="px per panel of the 2B-shape's six-panel strip")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    names = ["organism", "2b-shape"] if args.model == "both" else [args.model]
    rows = []
    for name in names:
        r = bench(name, args)
        rows.append(r)
        print(f"{r['model']}: {r['prompt']}-token prompt ({r['image_tokens']} image tokens), K = {args.top_k}: "
              f"first token {r['uncached'] * 1e3:.1f} ms uncached vs {r['cached'] * 1e3:.1f} ms cached "
              f"(median {r['cached_median'] * 1e3:.1f}): {r['uncached'] / r['cached']:.2f}x faster; "
              f"first use of an image {r['first'] * 1e3:.1f} ms", flush=True)
    print(f"\n| model | prompt tokens | uncached ms | cached ms | ratio | first use ms |  "
          f"({args.device}, {args.dtype}, torch threads {torch.get_num_threads()})")
    for r in rows:
        print(f"| {r['model']} | {r['prompt']} | {r['uncached'] * 1e3:.1f} | {r['cached'] * 1e3:.1f} | "
              f"{r['uncached'] / r['cached']:.2f}x | {r['first'] * 1e3:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
