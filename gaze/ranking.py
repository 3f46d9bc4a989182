"""A head ranking: the product of discovery, saved as plain JSON (never pickle).

`Ranking.scores[l][h]` is head (l, h)'s gaze score; `Ranking.matrices[l][h]`
its mean [R queried x R attended] attention-mass matrix. `top(k)` gives the
K best heads, best first. `check(model)` refuses a ranking made for another
model (different shape, or a different model id when both are known).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

Head = tuple[int, int]  # (layer, head) in the language backbone

RANKING_FILE = "ranking.json"


class RankingError(ValueError):
    """A missing, broken or mismatched ranking; the message says how to fix it."""


@dataclass(frozen=True)
class Ranking:
    """Gaze scores of every head of one model."""

    model_id: str  # what the model was loaded from (hub id or folder)
    scores: torch.Tensor  # [layers, heads] gaze score (mean diagonal of `matrices`)
    matrices: torch.Tensor  # [layers, heads, R, R] mean raw attention mass, queried x attended panel
    n_strips: int  # strips averaged over
    prompt: str  # question template used for the queries
    method: str = "raw_mass_diagonal"  # score variant
    meta: dict = field(default_factory=dict)  # data source, dtype, stability, ...

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.scores.shape)  # (layers, heads)

    def order(self) -> list[Head]:
        """All heads, best first (ties broken by (layer, head) for determinism)."""
        flat = self.scores.flatten()
        n_heads = self.scores.shape[1]
        idx = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))
        return [(i // n_heads, i % n_heads) for i in idx]

    def top(self, k: int) -> list[Head]:
        if k < 0:
            raise RankingError(f"top-K needs K >= 0, got {k}")
        return self.order()[:k]

    def layer_band(self, k: int) -> tuple[int, int]:
        """(first, last) layer holding the top-k heads."""
        layers = [l for l, _ in self.top(k)]
        return (min(layers), max(layers)) if layers else (0, 0)

    def check(self, model, model_id: str | None = None) -> "Ranking":
        """Raise if this ranking was not made for `model`; return self."""
        cfg = model.config.get_text_config()
        shape = (cfg.num_hidden_layers, cfg.num_attention_heads)
        if tuple(self.shape) != shape:
            raise RankingError(
                f"this ranking is for a model with {self.shape[0]} layers x {self.shape[1]} heads "
                f"({self.model_id}), but the model has {shape[0]} x {shape[1]}: "
                f"run `gaze discover --model {model_id or '...'}` to rank its heads"
            )
        if model_id is not None and self.model_id and _norm(model_id) != _norm(self.model_id):
            raise RankingError(
                f"this ranking was made for {self.model_id!r}, not {model_id!r}: "
                f"run `gaze discover --model {model_id}` (or pass --allow-other-model if the weights are the same)"
            )
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scores"] = self.scores.tolist()
        d["matrices"] = self.matrices.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Ranking":
        try:
            return cls(
                model_id=d["model_id"],
                scores=torch.tensor(d["scores"], dtype=torch.float32),
                matrices=torch.tensor(d["matrices"], dtype=torch.float32),
                n_strips=int(d["n_strips"]),
                prompt=d["prompt"],
                method=d.get("method", "raw_mass_diagonal"),
                meta=d.get("meta", {}),
            )
        except KeyError as e:
            raise RankingError(f"ranking file lacks field {e}: re-run `gaze discover`") from None

    def save(self, path: str | Path) -> Path:
        """Write JSON to `path` (a .json file, or a folder that gets `ranking.json`)."""
        path = Path(path)
        if path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / RANKING_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        tmp.replace(path)  # atomic: an interrupted save never leaves half a ranking
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Ranking":
        path = Path(path)
        if path.is_dir():
            path = path / RANKING_FILE
        if not path.exists():
            raise RankingError(f"no ranking at {path}: run `gaze discover --model ... --out DIR` first")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RankingError(f"{path} is not a valid ranking JSON ({e}): re-run `gaze discover`") from None
        return cls.from_dict(data)


def _norm(model_id: str) -> str:
    return str(model_id).rstrip("/").split("/")[-1] if Path(str(model_id)).exists() else str(model_id).rstrip("/")
