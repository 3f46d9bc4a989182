"""Head sets steered by each condition: top-K gaze heads, random low-score heads, all heads, prior work's
image and localization heads; and K itself (`resolve_top_k`)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from gaze.eval.config import CONDITIONS, EvalError
from gaze.prompts import NARRATION_PROMPT, STRIP_QUESTION, THIS_PANEL_QUESTION
from gaze.ranking import Head, Ranking, default_top_k
from gaze.strips import Strip

def resolve_top_k(top_k: int | None, n_total: int) -> int:
    """K: as given (capped at all heads), or the paper's share of heads (`gaze.ranking.default_top_k`)."""
    if top_k is None:
        return default_top_k(n_total)
    return min(top_k, n_total)


@dataclass(frozen=True)
class PriorScores:
    """Prior work's head criteria from the last prompt token's attention over the image."""

    image_mass: torch.Tensor  # [L, H] mean attention mass on image tokens
    concentration: torch.Tensor  # [L, H] 1 - entropy / log(T) of the attention renormalised over the image
    n_strips: int

    def image_heads(self, k: int) -> list[Head]:
        return _top(self.image_mass, k)

    def localization_heads(self, k: int) -> list[Head]:
        """Top-k concentration among heads with at least median image mass (then the rest, if too few)."""
        eligible = self.image_mass >= self.image_mass.flatten().median()
        first = _top(torch.where(eligible, self.concentration, torch.full_like(self.concentration, -math.inf)),
                     int(eligible.sum()))
        rest = [h for h in _top(self.concentration, self.concentration.numel()) if h not in first]
        return (first + rest)[:k]

    def to_dict(self) -> dict:
        return {"image_mass": self.image_mass.tolist(), "concentration": self.concentration.tolist(),
                "n_strips": self.n_strips}

    @classmethod
    def from_dict(cls, d: dict) -> "PriorScores":
        return cls(torch.tensor(d["image_mass"]), torch.tensor(d["concentration"]), int(d["n_strips"]))


def _top(scores: torch.Tensor, k: int) -> list[Head]:
    """The k best heads of a [L, H] score tensor, ties broken by (layer, head)."""
    flat = scores.flatten().tolist()
    n_heads = scores.shape[1]
    idx = sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:k]
    return [(i // n_heads, i % n_heads) for i in idx]


@torch.no_grad()
def prior_scores(loaded, strips: Sequence[Strip], questions: Sequence[str] = (STRIP_QUESTION, NARRATION_PROMPT,
                 THIS_PANEL_QUESTION)) -> PriorScores:
    """Image mass and spatial concentration of every head, from one shared-prefix pass per strip."""
    from gaze.scoring import query_rows

    if not strips:
        raise EvalError("the image / localization head criteria need at least one strip")
    mass, conc = [], []
    for strip in strips:
        rows, layout = query_rows(loaded.model, loaded.processor, strip.image, list(questions), family=loaded.family)
        image = rows[..., layout.positions.to(rows.device)].float().cpu()  # [L, Q, H, T]
        m = image.sum(-1)  # [L, Q, H]
        p = image / m.unsqueeze(-1).clamp_min(1e-12)  # [L, Q, H, T] distribution over image tokens
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)  # [L, Q, H]
        mass.append(m.mean(1))  # [L, H]
        conc.append(1 - entropy.mean(1) / math.log(max(2, layout.n_tokens)))  # [L, H]
    return PriorScores(torch.stack(mass).mean(0), torch.stack(conc).mean(0), len(strips))


def random_pool(ranking: Ranking, k: int, percentile: float = 5.0) -> list[Head]:
    """The low-score heads random heads are drawn from: the bottom `percentile`% of scores,
    widened to at least 2K heads (so K heads are a sample, not the whole pool) and never the top K."""
    order = ranking.order()
    n = len(order)
    size = max(math.ceil(n * percentile / 100), 2 * k)
    size = min(size, n - min(k, n - k))  # keep the top-K gaze heads out whenever the model has room
    return order[n - size:]


def head_sets(ranking: Ranking, k: int, seed: int = 0, kinds: Iterable[str] = ("gaze", "random"), *,
              prior: PriorScores | None = None, percentile: float = 5.0) -> dict[str, list[Head]]:
    """Condition name -> the heads it steers. `image` and `localization` need `prior` (see `prior_scores`)."""
    out: dict[str, list[Head]] = {}
    n_total = ranking.scores.numel()
    k = min(k, n_total)
    for kind in kinds:
        if kind == "gaze":
            out[kind] = ranking.top(k)
        elif kind == "random":
            pool = random_pool(ranking, k, percentile)
            out[kind] = sorted(random.Random(f"{seed}/random/{k}").sample(pool, min(k, len(pool))))
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
