"""gaze: find the attention heads of a VLM that look where it is describing, and move them.

Modules, in the order a reader needs them (docs/architecture.md has one line each):
    regions     image tokens -> pixel cells -> panels and boxes; region mass (pure)
    attention   the "gaze_sdpa" attention: capture rows, add biases, on fused SDPA; every hook class
    scoring     per-strip [layers, heads, R, R] attention mass, gaze scores and their variants
    discovery   many strips -> a Ranking (resumable, shardable)
    ranking     the Ranking artifact (JSON)
    steering    the bias builder and the `steer` context manager, targets and schedules
    tracking    where the chosen heads look at every step, per-token maps
    generation  ask + steer + track in one call
    families    per-family image-token layout and positions (+ image-only processors)
    models      loading (hub id, folder, or "organism")
    strips      the Strip type, stitching, strip sources and dataset schemas
    prompts     the paper's questions (or a model folder's own, prompts.json); model inputs with their layout
    residual    add a direction to the residual stream, capture it: one `with` block each
    plots       figures and heat maps
    cli         the `gaze` command
    errors      GazeError, the user errors the CLIs print as one line

`import gaze` is cheap: the names below load their module (and torch) on first use.
Evaluation lives in `gaze.eval`, which the core never imports.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Box": "gaze.steering", "Panel": "gaze.steering", "Schedule": "gaze.steering", "Tokens": "gaze.steering",
    "parse_schedule": "gaze.steering", "steer": "gaze.steering", "LiveTarget": "gaze.steering",
    "Generation": "gaze.generation", "generate": "gaze.generation", "prepare_inputs": "gaze.generation",
    "PrefixCache": "gaze.generation", "Prompts": "gaze.prompts",
    "Loaded": "gaze.models", "load": "gaze.models",
    "Head": "gaze.ranking", "Ranking": "gaze.ranking",
    "ImageLayout": "gaze.regions", "RegionMap": "gaze.regions", "region_mass": "gaze.regions",
    "Strip": "gaze.strips", "load_strips": "gaze.strips", "stitch_panels": "gaze.strips",
    "Tracker": "gaze.tracking",
    "GazeError": "gaze.errors",
    "add_direction": "gaze.residual", "capture_residual": "gaze.residual",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'gaze' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
