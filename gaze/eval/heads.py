"""Head sets steered by each condition, and K itself (`resolve_top_k`).

    gaze          the top-K heads of the ranking
    random        N seeded control draws (`gaze.eval.controls`): conditions random:0 .. random:N-1
    all / none    every head / no head
    image         MaskCD's image heads (Deng & Yang 2025): per layer, the z-score of each head's attention
                  mass on the image; image heads have z > 2.5; K heads by z
    localization  Kang et al.'s localization heads (CVPR 2025): per prompt, heads whose image-attention sum
                  is at or above the elbow (chord method) of the sorted sums, outside layers 0-1, not
                  covering the whole bottom row, ranked by spatial entropy; K heads by how often they
                  are among each prompt's 10 lowest-entropy heads

Both prior criteria read the last prompt token's attention over the image for the six panel-query
prompts (the gaze score's questions, "... the k-th panel ..."), one shared-prefix pass per strip
(`prior_scores`). `head_overlap` / `overlap_table` give the Jaccard overlap of the three rankings.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from gaze.eval.config import CONDITIONS, EvalError
from gaze.eval.controls import RANDOM, ControlSpec, control_draws, control_pool, control_warning, draw_condition
from gaze.ranking import Head, Ranking, default_top_k
from gaze.strips import Strip

Z_THRESHOLD = 2.5  # MaskCD: a head is an image head when its layer z-score exceeds this
PER_SAMPLE = 10  # Kang et al.: each prompt votes for its 10 lowest-entropy heads
EXCLUDED_LAYERS = 2  # Kang et al.: layers 0 and 1 are never localization heads
BINARY_THRESHOLD = 1e-3  # Kang et al.'s code: a token belongs to a component when its thresholded mass exceeds this


def resolve_top_k(top_k: int | None, n_total: int) -> int:
    """K: as given (capped at all heads), or the paper's share of heads (`gaze.ranking.default_top_k`)."""
    if top_k is None:
        return default_top_k(n_total)
    return min(top_k, n_total)


# ---------------------------------------------------------------- MaskCD: image heads

def layer_zscores(mass: torch.Tensor) -> torch.Tensor:
    """[L, H] -> [L, H]: each head's z-score among its layer's heads (population sd; 0 in a constant layer)."""
    mean = mass.mean(1, keepdim=True)  # [L, 1]
    sd = mass.std(1, correction=0, keepdim=True)  # [L, 1]
    return torch.where(sd > 0, (mass - mean) / sd.clamp_min(1e-30), torch.zeros_like(mass))


# ---------------------------------------------------------------- Kang et al.: localization heads

def elbow_value(values: Sequence[float]) -> float:
    """The elbow of the ascending-sorted values by the chord method: the value farthest from the line
    joining the first and last sorted points (x = rank). Values at or above it pass."""
    y = np.sort(np.asarray(values, dtype=np.float64))
    if y.size <= 2:
        return float(y.min()) if y.size else 0.0
    x = np.arange(y.size, dtype=np.float64)
    start, end = np.array([x[0], y[0]]), np.array([x[-1], y[-1]])
    unit = (end - start) / np.linalg.norm(end - start)
    vec = np.stack([x, y], 1) - start  # [N, 2]
    dist = np.abs(vec[:, 0] * unit[1] - vec[:, 1] * unit[0])  # [N] perpendicular distance to the chord
    return float(y[int(np.argmax(dist))])


def label8(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a 2-D boolean mask: (labels 1..n, 0 outside; n), numbered in raster
    order of each component's first pixel, as `scipy.ndimage.label(mask, np.ones((3, 3)))` numbers them."""
    rows, cols = mask.shape
    labels = np.zeros((rows, cols), dtype=np.int32)
    n = 0
    for r0, c0 in zip(*np.nonzero(mask)):  # row-major
        if labels[r0, c0]:
            continue
        n += 1
        labels[r0, c0] = n
        stack = [(int(r0), int(c0))]
        while stack:
            r, c = stack.pop()
            for rr in range(max(r - 1, 0), min(r + 2, rows)):
                for cc in range(max(c - 1, 0), min(c + 2, cols)):
                    if mask[rr, cc] and not labels[rr, cc]:
                        labels[rr, cc] = n
                        stack.append((rr, cc))
    return labels, n


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    try:  # the same labels, faster, where scipy is installed (it is not a dependency)
        from scipy.ndimage import label
    except ImportError:
        return label8(mask)
    labels, n = label(mask, structure=np.ones((3, 3)))
    return labels.astype(np.int32), int(n)


def spatial_entropy(attn: np.ndarray, threshold: float = BINARY_THRESHOLD) -> tuple[float, np.ndarray]:
    """(entropy, labels) of a [rows, cols] attention map, after Kang et al.: subtract the map's mean and keep
    the positive part B; label the 8-connected components of B > threshold; the entropy of the components'
    shares of B's total mass (inf when B is all zero)."""
    b = np.maximum(attn - attn.mean(), 0.0)  # [rows, cols]
    labels, n = _label(b > threshold)
    total = float(b.sum())
    if total <= 0:
        return math.inf, labels
    shares = [float(b[labels == i].sum()) / total for i in range(1, n + 1)]
    return float(-sum(p * math.log(p) for p in shares if p > 0)), labels


def localization_votes(maps: torch.Tensor, per_sample: int = PER_SAMPLE,
                       threshold: float = BINARY_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt's [L, H, rows, cols] image-attention maps -> (votes, entropy), each [L, H].

    A head is a candidate when its attention sum is at or above the elbow, its layer is not 0 or 1 and its
    components do not cover the whole bottom row; votes are 1 for the `per_sample` candidates of lowest
    spatial entropy, entropy is inf for non-candidates."""
    n_layers, n_heads = maps.shape[:2]
    a = maps.double().cpu().numpy()
    sums = a.sum((2, 3))  # [L, H]
    cut = elbow_value(sums.flatten())
    entropy = np.full((n_layers, n_heads), math.inf)
    for l in range(EXCLUDED_LAYERS, n_layers):
        for h in range(n_heads):
            if sums[l, h] < cut:
                continue
            se, labels = spatial_entropy(a[l, h], threshold)
            if not (labels[-1] > 0).all():  # a head lying on the whole bottom row does not localize
                entropy[l, h] = se
    finite = [i for i in np.argsort(entropy, axis=None, kind="stable") if np.isfinite(entropy.flat[i])]
    votes = np.zeros(n_layers * n_heads)
    votes[finite[:per_sample]] = 1
    return torch.from_numpy(votes.reshape(n_layers, n_heads)), torch.from_numpy(entropy)


def token_maps(image_rows: torch.Tensor, layout) -> torch.Tensor:
    """[..., T] attention over image tokens -> [..., rows, cols] on the token grid (a layout without one
    grid, e.g. tiles, is rasterised by cell centres: tokens sharing a cell add up)."""
    if layout.grid is not None:
        return image_rows.reshape(*image_rows.shape[:-1], *layout.grid)
    centres = layout.centres  # [T, 2]
    ys, iy = torch.unique(centres[:, 1], return_inverse=True)
    xs, ix = torch.unique(centres[:, 0], return_inverse=True)
    out = image_rows.new_zeros(*image_rows.shape[:-1], len(ys) * len(xs))
    out.index_add_(-1, (iy * len(xs) + ix).to(image_rows.device), image_rows)
    return out.reshape(*image_rows.shape[:-1], len(ys), len(xs))


# ---------------------------------------------------------------- both criteria from the same rows

@dataclass(frozen=True)
class PriorScores:
    """Prior work's head criteria, from the last prompt token's attention over the image."""

    image_mass: torch.Tensor  # [L, H] mean attention mass on the image tokens (prompts x strips)
    image_z: torch.Tensor  # [L, H] MaskCD's per-layer z-score of image_mass
    votes: torch.Tensor  # [L, H] how many prompts rank the head among their PER_SAMPLE localization heads
    entropy: torch.Tensor  # [L, H] mean spatial entropy over the prompts where the head is a candidate (nan: never)
    n_strips: int
    n_samples: int  # prompts x strips

    def image_heads(self, k: int) -> list[Head]:
        """K heads by layer z-score (MaskCD's image heads first)."""
        return _top(self.image_z, k)

    def image_head_set(self, z: float = Z_THRESHOLD) -> list[Head]:
        """MaskCD's own set: z-score above 2.5."""
        return sorted(h for h in _top(self.image_z, self.image_z.numel()) if float(self.image_z[h]) > z)

    def localization_heads(self, k: int) -> list[Head]:
        """K heads by votes, then lower mean entropy, then more image mass."""
        n_heads = self.votes.shape[1]
        v, e, m = (t.flatten().tolist() for t in (self.votes, self.entropy, self.image_mass))
        key = lambda i: (-v[i], e[i] if not math.isnan(e[i]) else math.inf, -m[i], i)  # noqa: E731
        return [(i // n_heads, i % n_heads) for i in sorted(range(len(v)), key=key)[:k]]

    def localization_head_set(self) -> list[Head]:
        """The heads at least one prompt voted for."""
        return sorted(h for h in self.localization_heads(self.votes.numel()) if float(self.votes[h]) > 0)

    def to_dict(self) -> dict:
        def plain(t):
            return [[None if math.isnan(x) else x for x in row] for row in t.tolist()]

        return {"criteria": "maskcd-z2.5/kang-elbow-entropy", "image_mass": plain(self.image_mass),
                "image_z": plain(self.image_z), "votes": plain(self.votes), "entropy": plain(self.entropy),
                "n_strips": self.n_strips, "n_samples": self.n_samples}

    @classmethod
    def from_dict(cls, d: dict) -> "PriorScores":
        def tensor(rows):
            return torch.tensor([[math.nan if x is None else x for x in row] for row in rows], dtype=torch.float64)

        if d.get("criteria") != "maskcd-z2.5/kang-elbow-entropy":
            raise EvalError("prior head scores of an older format: delete prior_heads.json to recompute them")
        return cls(tensor(d["image_mass"]), tensor(d["image_z"]), tensor(d["votes"]), tensor(d["entropy"]),
                   int(d["n_strips"]), int(d["n_samples"]))


def _top(scores: torch.Tensor, k: int) -> list[Head]:
    """The k best heads of a [L, H] score tensor, ties broken by (layer, head)."""
    flat = scores.flatten().tolist()
    n_heads = scores.shape[1]
    idx = sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:k]
    return [(i // n_heads, i % n_heads) for i in idx]


def prior_from_maps(maps: Iterable[torch.Tensor], n_strips: int, per_sample: int = PER_SAMPLE) -> PriorScores:
    """Both criteria from per-prompt [L, H, rows, cols] image-attention maps (pure: no model)."""
    mass, votes, entropy = [], [], []
    for m in maps:
        mass.append(m.double().sum((-1, -2)))  # [L, H]
        v, e = localization_votes(m, per_sample)
        votes.append(v)
        entropy.append(e)
    if not mass:
        raise EvalError("the image / localization head criteria need at least one prompt")
    e = torch.stack(entropy)  # [S, L, H]
    finite = torch.isfinite(e)
    mean_e = torch.where(finite, e, torch.zeros_like(e)).sum(0) / finite.sum(0)  # nan where never a candidate
    image_mass = torch.stack(mass).mean(0)
    return PriorScores(image_mass, layer_zscores(image_mass), torch.stack(votes).sum(0), mean_e, n_strips, len(mass))


@torch.no_grad()
def prior_scores(loaded, strips: Sequence[Strip], questions: Sequence[str] | None = None) -> PriorScores:
    """Image and localization head criteria on the six panel-query prompts (the model's discovery question
    about each panel), one shared-prefix pass per strip."""
    from gaze.prompts import panel_question
    from gaze.scoring import query_rows

    if not strips:
        raise EvalError("the image / localization head criteria need at least one strip")
    template = loaded.prompts.discovery

    def maps():
        for strip in strips:
            qs = list(questions or [panel_question(k, template) for k in range(1, strip.n_panels + 1)])
            rows, layout = query_rows(loaded.model, loaded.processor, strip.image, qs, family=loaded.family)
            image = rows[..., layout.positions.to(rows.device)].float().cpu()  # [L, Q, H, T]
            grid = token_maps(image, layout)  # [L, Q, H, rows, cols]
            for q in range(grid.shape[1]):
                yield grid[:, q]  # [L, H, rows, cols]

    return prior_from_maps(maps(), len(strips))


# ---------------------------------------------------------------- overlap of the head rankings

def jaccard(a: Iterable[Head], b: Iterable[Head]) -> float:
    """|A & B| / |A | B| (1 for two empty sets)."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def head_overlap(sets: dict[str, Sequence[Head]]) -> dict[str, float]:
    """{'a|b': Jaccard} for every pair of named head sets, in the order given."""
    names = list(sets)
    return {f"{a}|{b}": jaccard(sets[a], sets[b]) for i, a in enumerate(names) for b in names[i + 1:]}


def overlap_table(ranking: Ranking, prior: PriorScores, ks: Sequence[int] = (10, 100)) -> dict:
    """Top-k Jaccard among gaze, image and localization heads for each k (capped at the model's heads)."""
    n_total = ranking.scores.numel()
    out = {}
    for k in sorted({min(k, n_total) for k in ks}):
        out[str(k)] = head_overlap({"gaze": ranking.top(k), "image": prior.image_heads(k),
                                    "localization": prior.localization_heads(k)})
    return {"ks": [int(k) for k in out], "jaccard": out, "image_set": len(prior.image_head_set()),
            "localization_set": len(prior.localization_head_set())}


# ---------------------------------------------------------------- head sets per condition

def random_pool(ranking: Ranking, k: int, percentile: float = 5.0, widen: bool = False) -> list[Head]:
    """The bottom-p control's pool: the bottom `percentile`% of scores minus the top K (`widen`: at least 2K)."""
    return control_pool(ranking, k, ControlSpec("bottom-p", 1, percentile=percentile, widen=widen))


def head_sets(ranking: Ranking, k: int, seed: int = 0, kinds: Iterable[str] = ("gaze", "random"), *,
              prior: PriorScores | None = None, percentile: float = 5.0,
              control: ControlSpec | None = None) -> dict[str, list[Head]]:
    """Condition name -> the heads it steers (`random`: the control's draw 0). `image` and `localization`
    need `prior` (see `prior_scores`)."""
    out: dict[str, list[Head]] = {}
    n_total = ranking.scores.numel()
    k = min(k, n_total)
    for kind in kinds:
        if kind == "gaze":
            out[kind] = ranking.top(k)
        elif kind == RANDOM:
            spec = control or ControlSpec("bottom-p", 1, percentile=percentile)
            out[kind] = control_draws(ranking, k, ControlSpec(spec.kind, 1, spec.band, spec.percentile, spec.widen),
                                      seed)[0]
        elif kind == "all":
            out[kind] = ranking.order()
        elif kind == "none":
            out[kind] = []
        elif kind in ("image", "localization"):
            if prior is None:
                raise EvalError(f"the {kind} heads need prior scores: pass prior=prior_scores(loaded, strips)")
            out[kind] = prior.image_heads(k) if kind == "image" else prior.localization_heads(k)
        else:
            raise EvalError(f"unknown condition {kind!r}; use one of {', '.join(CONDITIONS)}")
    return out


def condition_sets(ranking: Ranking, k: int, seed: int, kinds: Iterable[str], control: ControlSpec, *,
                   prior: PriorScores | None = None, warn: bool = True) -> dict[str, list[Head]]:
    """Like `head_sets`, with `random` expanded into the control's draws: random:0 .. random:N-1
    (printing one warning line when a draw cannot hold K heads)."""
    kinds = list(kinds)
    out: dict[str, list[Head]] = {}
    for kind in kinds:
        if kind != RANDOM:
            out.update(head_sets(ranking, k, seed, [kind], prior=prior))
            continue
        k_eff = min(k, ranking.scores.numel())
        message = control_warning(ranking, k_eff, control)
        if message and warn:
            print(f"warning: {message}", file=sys.stderr)
        for d, heads in enumerate(control_draws(ranking, k_eff, control, seed)):
            out[draw_condition(d)] = heads
    return out
