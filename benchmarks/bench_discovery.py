"""Discovery: our path vs the reference formulation, side by side on the same model and strips.

    python benchmarks/bench_discovery.py --model organism --n-strips 8
    python benchmarks/bench_discovery.py --model 2b-shape --n-strips 2 --panel-size 128
    python benchmarks/bench_discovery.py --model 2b-shape --device cuda --dtype bfloat16 --n-strips 20

Reference: eager attention, `output_attentions=True`, six full prefills per
strip (what the paper's code does). Ours: "gaze_sdpa", one image prefill,
six question suffixes as one batch, last attention row only. Each method runs
in its own subprocess so peak memory is measured cleanly (CPU: the peak
resident set size during the timed run, reset before it, over the RSS at its
start; CUDA: `max_memory_allocated` over what was allocated before the run).
Prints strips/s, peak memory, their ratios, and the max abs diff of the gaze
scores (float32: should be <= 1e-4).

`--model 2b-shape` builds a randomly initialised Qwen3-VL with the language
shape of Qwen3-VL-2B (28 layers, 16 heads, 8 KV heads, head_dim 128, hidden
2048) and a smaller vision tower (the vision tower is outside what is compared).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_2b_shape(folder: Path, vision_depth: int = 2) -> Path:
    from gaze.testing import build_tiny_vlm

    if not (folder / "config.json").exists():
        build_tiny_vlm("qwen3_vl", folder, num_layers=28, num_heads=16, num_kv_heads=8, hidden_size=2048, head_dim=128,
                       intermediate_size=6144, vision_depth=vision_depth, vision_hidden=256)
    return folder


def strips_for(n: int, panel_size: int):
    from datagen import make_strip

    return [make_strip(3_000_000 + i, panel_size=panel_size) for i in range(n)]


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM) to the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(args) -> None:
    """Run one method and print one JSON line."""
    from gaze.models import load
    from gaze.scoring import gaze_scores, reference_strip_matrices, strip_matrices

    torch.manual_seed(0)
    attn = "eager" if args.method == "reference" else "sdpa"
    loaded = load(args.path, device=args.device, dtype=args.dtype, attn_implementation=attn)
    strips = strips_for(args.n_strips, args.panel_size)
    cuda = args.device.startswith("cuda")
    # warm-up on one strip (kernels, allocator), not timed
    fn = reference_strip_matrices if args.method == "reference" else strip_matrices
    fn(loaded.model, loaded.processor, strips[0])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    reset_peak_rss()
    base_rss = status_mb("VmRSS")
    t0 = time.perf_counter()
    mats = [fn(loaded.model, loaded.processor, s) for s in strips]
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = status_mb("VmHWM") - base_rss
    scores = gaze_scores(torch.stack(mats).mean(0))
    torch.save(scores, args.scores_out)
    print(json.dumps({"method": args.method, "seconds": dt, "strips_per_s": len(strips) / dt, "peak_mb": peak}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="organism", help="'organism', '2b-shape', or a folder / hub id")
    p.add_argument("--n-strips", type=int, default=8)
    p.add_argument("--panel-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--scores-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.method:
        worker(args)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="bench-discovery-"))
    from gaze.models import resolve

    path = str(build_2b_shape(tmp / "2b-shape")) if args.model == "2b-shape" else resolve(args.model)
    results = {}
    for method in ("reference", "ours"):
        out = subprocess.run(
            [sys.executable, __file__, "--method", method, "--path", path, "--n-strips", str(args.n_strips),
             "--panel-size", str(args.panel_size), "--device", args.device, "--dtype", args.dtype,
             "--scores-out", str(tmp / f"{method}.pt")],
            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    diff = float((torch.load(tmp / "reference.pt") - torch.load(tmp / "ours.pt")).abs().max())
    ref, ours = results["reference"], results["ours"]
    print(f"model {args.model}  device {args.device}  dtype {args.dtype}  strips {args.n_strips}  panel {args.panel_size}px")
    print(f"{'method':<10} {'strips/s':>10} {'peak MB':>10}")
    for name in ("reference", "ours"):
        r = results[name]
        print(f"{name:<10} {r['strips_per_s']:>10.3f} {r['peak_mb']:>10.1f}")
    print(f"speed-up {ours['strips_per_s'] / ref['strips_per_s']:.2f}x   "
          f"memory {ref['peak_mb'] / max(ours['peak_mb'], 1e-9):.2f}x lower   score max abs diff {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
