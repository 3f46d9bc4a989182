"""Statistics of an evaluation (pure): the bootstrap CI every rate carries (the core's one bootstrap,
`gaze.discovery.bootstrap_ci`), Spearman's rho, and for controls the empirical p-value of a rate against
N draws and the strip-clustered paired bootstrap of a difference."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from gaze.discovery import bootstrap_ci

__all__ = ["bootstrap_ci", "empirical_p", "paired_strip_bootstrap", "spearman"]


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (ties averaged, as scipy); None for < 2 pairs or a constant side."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.size != b.size:
        raise ValueError(f"spearman needs equal lengths, got {a.size} and {b.size}")
    if a.size < 2:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra ** 2).sum() * (rb ** 2).sum()))
    return None if den == 0 else float((ra * rb).sum() / den)


def empirical_p(gaze: float, controls: Sequence[float]) -> float:
    """(1 + #draws scoring >= gaze) / (1 + N): the chance a control draw does as well as the gaze heads."""
    return (1 + sum(c >= gaze for c in controls)) / (1 + len(controls))


def paired_strip_bootstrap(pairs: Sequence[tuple[str, float]], n_boot: int = 2000, seed: int = 0,
                           level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of a mean paired difference, resampling strips: each strip's pairs stay together.

    `pairs` holds (strip id, difference) per (strip, target); the statistic is the mean over all pairs of the
    resampled strips (strips with more pairs weigh more, as in the plain mean)."""
    if not pairs:
        return (math.nan, math.nan, math.nan)
    total: dict[str, list[float]] = {}
    for strip, d in pairs:
        total.setdefault(strip, [0.0, 0.0])
        total[strip][0] += d
        total[strip][1] += 1
    strips = sorted(total)
    sums = np.array([total[s][0] for s in strips], dtype=np.float64)  # [S] summed differences per strip
    counts = np.array([total[s][1] for s in strips], dtype=np.float64)  # [S] pairs per strip
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(strips), (n_boot, len(strips)))  # [n_boot, S] resampled strips
    means = sums[idx].sum(1) / counts[idx].sum(1)  # [n_boot]
    tail = (1 - level) / 2 * 100
    return (float(sums.sum() / counts.sum()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail)))
