"""Statistics of an evaluation (pure): the bootstrap CI every rate carries (the core's one bootstrap,
`gaze.discovery.bootstrap_ci`), and Spearman's rho."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from gaze.discovery import bootstrap_ci

__all__ = ["bootstrap_ci", "spearman"]


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
