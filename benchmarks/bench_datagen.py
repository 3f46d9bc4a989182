"""Benchmark (not a test): how fast datagen makes strips on this machine.

    python -m benchmarks.bench_datagen                      # from the repo root: procedural + tiny pipeline
    python -m benchmarks.bench_datagen --model-id stabilityai/sdxl-turbo --device cuda --dtype float16

Prints:
- procedural `make_strip` strips/s at 64 px and 256 px panels (PIL, one core);
- a whole `run` at 64 px: strips/s including PNG encoding, Parquet shards,
  the final dataset files and the card;
- seconds per diffusion panel: the `--model-id` checkpoint if given, else the
  tiny random-weight pipeline of `datagen.testing` (plumbing cost only: it says
  nothing about a real model's speed), on CUDA when present, else the CPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from datagen import DiffusionRenderer, GenerateConfig, load_pipeline, make_strip, run


def strips_per_second(n: int, **kwargs) -> float:
    make_strip(0, **kwargs)  # warm-up: font cache, imports
    start = time.perf_counter()
    for seed in range(n):
        make_strip(seed, **kwargs)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=400, help="strips per procedural measurement")
    parser.add_argument("--model-id", default=None, help="diffusers checkpoint to time (default: tiny pipeline)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--diffusion-size", type=int, default=None, help="panel px (default 512 real, 64 tiny)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: stable numbers on a shared 2-core machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    for size, n in ((64, args.n), (256, max(1, args.n // 4))):
        print(f"procedural make_strip, {size:>3} px panels: {strips_per_second(n, panel_size=size):7.1f} strips/s "
              f"({n} strips, one core)")

    with tempfile.TemporaryDirectory() as tmp:
        n = args.n
        start = time.perf_counter()
        run(GenerateConfig(out=str(Path(tmp) / "ds"), n_strips=n, shard_size=64), progress=False)
        print(f"procedural run to dataset, 64 px panels: {n / (time.perf_counter() - start):7.1f} strips/s "
              f"({n} strips: render, PNG, Parquet shards, save_to_disk, data/*.parquet, card)")

        if args.model_id:
            model_id, size, label = args.model_id, args.diffusion_size or 512, args.model_id
        else:
            from datagen.testing import save_tiny_sd_pipeline

            model_id = str(save_tiny_sd_pipeline(Path(tmp) / "tiny-sd"))
            size, label = args.diffusion_size or 64, "tiny random-weight SD pipeline (plumbing only)"
        renderer = DiffusionRenderer(load_pipeline(model_id, device=args.device, dtype=args.dtype),
                                     model_id=model_id, steps=args.steps)
        make_strip(0, panel_size=size, renderer=renderer)  # warm-up
        strips = 3
        start = time.perf_counter()
        for seed in range(1, strips + 1):
            make_strip(seed, panel_size=size, renderer=renderer)
        per_panel = (time.perf_counter() - start) / (6 * strips)
        print(f"diffusion, {label}, {size} px, {args.steps} steps, batch 6, {args.device} {args.dtype}: "
              f"{per_panel:.3f} s/panel")


if __name__ == "__main__":
    main()
