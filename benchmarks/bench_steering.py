"""Steered decoding speed: fused SDPA steering vs unsteered SDPA vs steering through eager attention.

    python benchmarks/bench_steering.py --model organism --tokens 64
    python benchmarks/bench_steering.py --model 2b-shape --tokens 32 --top-k 100
    python benchmarks/bench_steering.py --model 2b-shape --device cuda --dtype bfloat16 --tokens 256 --top-k 100

All three generate greedily from the same prompt, with a fixed token count
(no early stop), in one process on one model; each is run `--repeats` times
and the best time kept. "eager" switches the language backbone to eager
attention and adds the same bias to the attention mask of the chosen heads
(what steering costs without a fused kernel). Prints tokens/s and ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, eager_mask

sys.path.insert(0, str(Path(__file__).parent))
from bench_discovery import build_2b_shape  # noqa: E402

from gaze.attention import _ACTIVE  # noqa: E402


def eager_with_hooks(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention (full probability matrix) plus the active hooks' biases."""
    bias = None
    for hook in _ACTIVE.get():
        b = hook.bias(module.layer_idx, query, key)
        if b is not None:
            bias = b if bias is None else bias + b
    k = repeat_kv(key, query.shape[1] // key.shape[1])
    v = repeat_kv(value, query.shape[1] // value.shape[1])
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : k.shape[-2]]
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="organism")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--panel-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from datagen import make_strip
    from gaze.generation import prepare_inputs
    from gaze.models import load, resolve
    from gaze.steering import Panel, steer

    path = str(build_2b_shape(Path(tempfile.mkdtemp()) / "2b")) if args.model == "2b-shape" else resolve(args.model)
    loaded = load(path, device=args.device, dtype=args.dtype)
    model = loaded.model
    strip = make_strip(4_000_000, panel_size=args.panel_size)
    inputs, layout = prepare_inputs(loaded, strip.image, "Describe this comic strip panel by panel.")
    n = inputs["input_ids"].shape[1]
    g = torch.Generator().manual_seed(0)
    flat = torch.randperm(loaded.n_layers * loaded.n_heads, generator=g)[: args.top_k].tolist()
    heads = [(i // loaded.n_heads, i % loaded.n_heads) for i in flat]
    kw = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
    cuda = args.device.startswith("cuda")

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                fn()
            if cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return args.tokens / best

    def steered():
        with steer(model, heads, Panel(3), inputs=inputs, panels=strip.panels):
            model.generate(**inputs, **kw)

    unsteered = timed(lambda: model.generate(**inputs, **kw))
    fused = timed(steered)
    AttentionInterface.register("bench_eager_hooks", eager_with_hooks)
    AttentionMaskInterface.register("bench_eager_hooks", eager_mask)
    model.set_attn_implementation({"text_config": "bench_eager_hooks"})
    eager = timed(steered)
    print(f"model {args.model}  device {args.device}  dtype {args.dtype}  prompt {n} tokens  generate {args.tokens}  "
          f"K={args.top_k} of {loaded.n_layers * loaded.n_heads} heads")
    print(f"{'unsteered (sdpa)':<24} {unsteered:>9.1f} tok/s")
    print(f"{'steered (fused sdpa)':<24} {fused:>9.1f} tok/s   {fused / unsteered:.3f}x of unsteered "
          f"({(1 - fused / unsteered) * 100:+.1f}% slower)")
    print(f"{'steered (eager)':<24} {eager:>9.1f} tok/s   fused is {fused / eager:.2f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
