"""Control head sets for the `random` condition, drawn N times, and how the gaze heads fare against them.

    spec = ControlSpec("layer-band", draws=10, band=(0.55, 1.0))
    draws = control_draws(ranking, k=100, spec=spec, seed=0)   # [[Head] * K] * 10, each excluding the top K
    summary = control_summary(gaze_records, control_records)   # mean, spread, p-value, paired difference

Kinds of control (all exclude the top-K gaze heads):

    bottom-p       K heads from the bottom `percentile`% of gaze scores (the official code's control);
                   a pool smaller than K is reported, not silently widened (`widen=True` restores the
                   old widening to 2K heads)
    layer-band     K heads uniform over the layers in a band given as fractions of depth; the default
                   (0.55, 1.0) is the paper's rule, layers 20-35 of Qwen3-VL-8B's 36, at any depth
    layer-matched  K heads with the top set's histogram over layers: as many from each layer as the
                   gaze heads have there

Each draw is its own condition run (`random:0`, `random:1`, ...; records carry `draw` and `control`);
`gaze.eval.protocols.aggregate` pools them under `random` and adds `control_summary` as `random.draws`.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from gaze.eval.config import EvalError

if TYPE_CHECKING:  # light on purpose: `EvalConfig.check` reads ControlSpec without loading torch
    from gaze.ranking import Head, Ranking

CONTROLS = ("bottom-p", "layer-band", "layer-matched")
PAPER_BAND = (0.55, 1.0)  # layers 20-35 of 36: 20 / 36 = 0.556, so the first layer at or above 0.55 * depth
RANDOM = "random"


@dataclass(frozen=True)
class ControlSpec:
    """How the control head sets are drawn (`EvalConfig.control*` and `random_percentile`)."""

    kind: str = "bottom-p"  # one of CONTROLS
    draws: int = 10  # seeded draws, each a condition run of its own
    band: tuple[float, float] = PAPER_BAND  # layer-band: [low, high) as fractions of the model's depth
    percentile: float = 5.0  # bottom-p: the share of lowest gaze scores drawn from
    widen: bool = False  # bottom-p: widen the pool to at least 2K heads (the earlier behaviour)

    def check(self) -> "ControlSpec":
        if self.kind not in CONTROLS:
            raise EvalError(f"--control is one of {', '.join(CONTROLS)}, not {self.kind!r}")
        if self.draws < 1:
            raise EvalError(f"--control-draws must be at least 1, got {self.draws}")
        lo, hi = self.band
        if not 0 <= lo < hi <= 1:
            raise EvalError(f"--control-band LOW-HIGH needs 0 <= LOW < HIGH <= 1 (fractions of depth), got {lo}-{hi}")
        return self

    @classmethod
    def from_config(cls, cfg) -> "ControlSpec":
        return cls(cfg.control, cfg.control_draws, tuple(cfg.control_band), cfg.random_percentile,
                   cfg.control_widen).check()


def draw_condition(draw: int) -> str:
    """The condition name of one control draw: `random:3`."""
    return f"{RANDOM}:{draw}"


def base_condition(condition: str) -> str:
    """`random:3` -> `random`; other names unchanged."""
    return condition.split(":", 1)[0]


def draw_index(condition: str) -> int | None:
    """`random:3` -> 3; None for a condition that is not a draw."""
    base, sep, rest = condition.partition(":")
    return int(rest) if sep and rest.isdigit() else None


def draw_tags(condition: str, spec: ControlSpec) -> dict:
    """The fields a control draw's record carries: {"draw": d, "control": kind}; {} for other conditions."""
    d = draw_index(condition)
    return {} if d is None or base_condition(condition) != RANDOM else {"draw": d, "control": spec.kind}


def band_layers(n_layers: int, band: tuple[float, float]) -> list[int]:
    """The layers l with low * depth <= l < high * depth (at least one: the last layer if the band is empty)."""
    lo, hi = band
    eps = 1e-9
    layers = [l for l in range(n_layers) if lo * n_layers - eps <= l < hi * n_layers - eps]
    return layers or [n_layers - 1]


def control_pool(ranking: Ranking, k: int, spec: ControlSpec) -> list[Head]:
    """The heads a bottom-p or layer-band draw samples from (never the top K); layer-matched draws sample
    per layer from all non-top heads (`layer_matched_draw`)."""
    n_layers, n_heads = ranking.scores.shape
    order = ranking.order()
    top = set(order[:k])
    if spec.kind == "bottom-p":
        n = len(order)
        size = math.ceil(n * spec.percentile / 100)
        if spec.widen:
            size = max(size, 2 * k)
        size = min(size, n - min(k, n - k))  # keep the top-K gaze heads out whenever the model has room
        return [h for h in order[n - size:] if h not in top]
    if spec.kind == "layer-band":
        return [(l, h) for l in band_layers(n_layers, spec.band) for h in range(n_heads) if (l, h) not in top]
    return [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in top]


def layer_matched_draw(ranking: Ranking, k: int, rng: random.Random) -> list[Head]:
    """Heads with the top-K set's layer histogram (as many per layer as it has), none of the top K."""
    n_heads = ranking.scores.shape[1]
    top = ranking.top(k)
    taken = set(top)
    out: list[Head] = []
    for layer, count in sorted(Counter(l for l, _ in top).items()):
        free = [(layer, h) for h in range(n_heads) if (layer, h) not in taken]
        out += rng.sample(free, min(count, len(free)))
    return sorted(out)


def control_draws(ranking: Ranking, k: int, spec: ControlSpec, seed: int = 0) -> list[list[Head]]:
    """`spec.draws` seeded head sets of (up to) K heads each; draw d depends only on (seed, kind, K, d)."""
    spec.check()
    out = []
    pool = control_pool(ranking, k, spec)
    for d in range(spec.draws):
        rng = random.Random(f"{seed}/{spec.kind}/{k}/{d}")
        if spec.kind == "layer-matched":
            out.append(layer_matched_draw(ranking, k, rng))
        else:
            out.append(sorted(rng.sample(pool, min(k, len(pool)))))
    return out


def control_warning(ranking: Ranking, k: int, spec: ControlSpec) -> str | None:
    """One line when a draw cannot hold K heads (a pool or a layer too small), else None."""
    if spec.kind == "layer-matched":
        n_heads = ranking.scores.shape[1]
        per_layer = Counter(l for l, _ in ranking.top(k))
        short = {l: c for l, c in per_layer.items() if c > n_heads - c}
        if short:
            return (f"layer-matched control: layers {sorted(short)} hold more top-{k} gaze heads than other heads, "
                    f"so each draw has {sum(min(c, n_heads - c) for c in per_layer.values())} heads, not {k}")
        return None
    pool = control_pool(ranking, k, spec)
    if len(pool) >= k:
        return None
    where = (f"the bottom {spec.percentile:g}% of gaze scores" if spec.kind == "bottom-p"
             else f"layers {band_layers(ranking.scores.shape[0], spec.band)} minus the top {k}")
    fix = ("raise --random-percentile or pass --control-widen" if spec.kind == "bottom-p"
           else "widen --control-band")
    return f"{spec.kind} control: {where} hold {len(pool)} heads, fewer than K = {k}: each draw steers {len(pool)} ({fix})"


def control_meta(ranking: Ranking, k: int, spec: ControlSpec) -> dict:
    """What the run records about its control: the settings, the pool, and the warning if any."""
    return {"kind": spec.kind, "draws": spec.draws, "band": list(spec.band),
            "band_layers": band_layers(ranking.scores.shape[0], spec.band) if spec.kind == "layer-band" else None,
            "percentile": spec.percentile, "widen": spec.widen, "k": k,
            "pool": len(control_pool(ranking, k, spec)), "warning": control_warning(ranking, k, spec)}


def control_manifest(cfg) -> dict:
    """The control settings that fix the records' content (only when the run steers random heads)."""
    if RANDOM not in cfg.conditions:
        return {}
    return {"control": cfg.control, "control_draws": cfg.control_draws, "control_band": list(cfg.control_band),
            "control_widen": cfg.control_widen}


# ---------------------------------------------------------------- gaze vs control

def record_value(record: dict) -> float | None:
    """A record's score: dynamic segment accuracy, else correct (None for a skipped region)."""
    if record["protocol"] == "dynamic":
        return float(record["segment_accuracy"])
    return None if record.get("correct") is None else float(record["correct"])


def control_summary(gaze: Sequence[dict], controls: Sequence[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """The gaze heads against N control draws of one protocol.

    Per draw its rate; their mean, sd (ddof 1), min and max; the empirical p-value of the gaze rate; and
    gaze minus control with a strip-clustered paired bootstrap CI: records are paired on (strip, target),
    the draws of a pair averaged, and strips resampled with their pairs.
    """
    from gaze.eval.statistics import empirical_p, paired_strip_bootstrap  # imported here: it loads torch

    by_draw: dict[int, list[float]] = {}
    per_pair: dict[tuple[str, str], list[float]] = {}
    for r in controls:
        v = record_value(r)
        if v is None:
            continue
        by_draw.setdefault(int(r.get("draw", draw_index(r["condition"]) or 0)), []).append(v)
        per_pair.setdefault((r["strip_id"], str(r["target"])), []).append(v)
    rates = {d: float(np.mean(v)) for d, v in sorted(by_draw.items())}
    gaze_vals = {(r["strip_id"], str(r["target"])): record_value(r) for r in gaze}
    gaze_vals = {key: v for key, v in gaze_vals.items() if v is not None}
    gaze_rate = float(np.mean(list(gaze_vals.values()))) if gaze_vals else math.nan
    values = list(rates.values())
    pairs = [(strip, gaze_vals[(strip, t)] - float(np.mean(c))) for (strip, t), c in sorted(per_pair.items())
             if (strip, t) in gaze_vals]
    diff, lo, hi = paired_strip_bootstrap(pairs, n_boot, seed)
    return {"n_draws": len(values), "per_draw": {str(d): v for d, v in rates.items()},
            "mean": float(np.mean(values)) if values else math.nan,
            "sd": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
            "min": min(values) if values else math.nan, "max": max(values) if values else math.nan,
            "gaze": gaze_rate, "p_value": empirical_p(gaze_rate, values) if values and gaze_vals else math.nan,
            "difference": {"mean": diff, "ci": [lo, hi], "n_pairs": len(pairs),
                           "n_strips": len({s for s, _ in pairs})}}


def add_control_summaries(out: dict, records: Sequence[dict], n_boot: int = 2000, seed: int = 0) -> None:
    """Put `control_summary` under `out[protocol]["random"]["draws"]` for every protocol with both gaze and
    control records (the K, strength and paraphrase sweeps, keyed by their value, are left as they are)."""
    for protocol, by_cond in out.items():
        if protocol in ("sweep", "strength", "paraphrase") or RANDOM not in by_cond or "gaze" not in by_cond:
            continue
        mine = [r for r in records if r["protocol"] == protocol]
        by_cond[RANDOM]["draws"] = control_summary([r for r in mine if r["condition"] == "gaze"],
                                                   [r for r in mine if base_condition(r["condition"]) == RANDOM],
                                                   n_boot, seed)
