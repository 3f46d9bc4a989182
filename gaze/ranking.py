"""A head ranking: the product of discovery, saved as plain JSON (never pickle).

`Ranking.scores[l][h]` is head (l, h)'s gaze score; `Ranking.matrices[l][h]`
its mean [R queried x R attended] attention-mass matrix. `top(k)` gives the
K best heads, best first. `check(model)` refuses a ranking made for another
model (different shape, or a different model id when both are known).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gaze.errors import GazeError

Head = tuple[int, int]  # (layer, head) in the language backbone

RANKING_FILE = "ranking.json"
SCORES_FILE = "scores.safetensors"
CONFIG_FILE = "config.json"
PAPER_SHARE = (100, 1152)  # the paper steers K = 100 of Qwen3-VL-8B's 1,152 heads


def default_top_k(n_heads: int) -> int:
    """The paper's share of heads, rounded up, at least 1: ceil(n_heads * 100 / 1152) (3 of the organism's 32)."""
    k, total = PAPER_SHARE
    return max(1, math.ceil(n_heads * k / total))


class RankingError(GazeError):
    """A missing, broken or mismatched ranking; the message says how to fix it."""


@dataclass(frozen=True)
class Ranking:
    """Gaze scores of every head of one model."""

    model_id: str  # what the model was loaded from (hub id or folder)
    scores: torch.Tensor  # [layers, heads] gaze score (mean diagonal of `matrices`)
    matrices: torch.Tensor  # [layers, heads, R, R] mean raw attention mass, queried x attended panel
    n_strips: int  # strips averaged over
    prompt: str  # question template used for the queries
    method: str = "raw"  # score variant (gaze.scoring.VARIANTS)
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

    @property
    def default_k(self) -> int:
        """How many heads to steer when K is not given (`default_top_k` of this model's head count)."""
        return default_top_k(self.scores.numel())

    def top(self, k: int) -> list[Head]:
        if k < 0:
            raise RankingError(f"top-K needs K >= 0, got {k}")
        return self.order()[:k]

    def layer_band(self, k: int) -> tuple[int, int]:
        """(first, last) layer holding the top-k heads."""
        layers = [l for l, _ in self.top(k)]
        return (min(layers), max(layers)) if layers else (0, 0)

    def check(self, model, model_id: str | None = None) -> "Ranking":
        """Raise if this ranking was not made for `model` (its layers x heads) or for `model_id` (when both
        ids are known); return self. `model=None` checks the id only (before the model is loaded)."""
        if model_id is not None and self.model_id and not same_model(model_id, self.model_id):
            raise RankingError(
                f"this ranking was made for {self.model_id!r}, not {model_id!r}: rank this model's heads with "
                f"`gaze discover --model {model_id} --out DIR` and pass --ranking DIR"
            )
        if model is None:
            return self
        cfg = model.config.get_text_config()
        shape = (cfg.num_hidden_layers, cfg.num_attention_heads)
        if tuple(self.shape) != shape:
            raise RankingError(
                f"this ranking is for a model with {self.shape[0]} layers x {self.shape[1]} heads "
                f"({self.model_id}), but the model has {shape[0]} x {shape[1]}: "
                f"run `gaze discover --model {model_id or '...'}` to rank its heads"
            )
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scores"] = self.scores.tolist()
        d["matrices"] = self.matrices.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "the ranking") -> "Ranking":
        """A ranking from its JSON form, refusing (naming `where`) anything that is not a whole, finite ranking."""
        def bad(what: str) -> RankingError:
            return RankingError(f"{where} is not a usable ranking: {what}; re-run `gaze discover` to make one")

        if not isinstance(d, dict):
            raise bad(f"it holds a JSON {type(d).__name__}, not an object with model_id, scores and matrices")
        missing = [k for k in ("model_id", "scores", "matrices", "n_strips", "prompt") if k not in d]
        if missing:
            raise bad(f"it lacks the field(s) {', '.join(missing)}")
        tensors = {}
        for name, dims in (("scores", 2), ("matrices", 4)):
            value = d[name]
            try:
                if _has_non_number(value):
                    raise TypeError("a value that is not a number")
                tensors[name] = torch.tensor(value, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError) as e:
                raise bad(f"its {name} are not a table of numbers ({str(e).splitlines()[0]})") from None
            if tensors[name].dim() != dims or 0 in tensors[name].shape:
                raise bad(f"its {name} have shape {list(tensors[name].shape)}, not {dims} non-empty dimensions")
        scores, matrices = tensors["scores"], tensors["matrices"]
        if tuple(matrices.shape[:2]) != tuple(scores.shape) or matrices.shape[2] != matrices.shape[3]:
            raise bad(f"its matrices {list(matrices.shape)} do not match its scores {list(scores.shape)} "
                      "(layers x heads x R x R)")
        n_bad = int((~torch.isfinite(scores)).sum())
        if n_bad:
            raise bad((f"all {n_bad} of its scores are" if n_bad == scores.numel() else
                       f"{n_bad} of its {scores.numel()} scores are") + " NaN or infinite")
        if not isinstance(d["model_id"], str) or not isinstance(d["prompt"], str):
            raise bad("its model_id and prompt must be strings")
        try:
            n_strips = int(d["n_strips"])
        except (TypeError, ValueError):
            raise bad(f"its n_strips {d['n_strips']!r} is not a whole number") from None
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise bad("its meta is not an object")
        return cls(model_id=d["model_id"], scores=scores, matrices=matrices, n_strips=n_strips, prompt=d["prompt"],
                   method=str(d.get("method", "raw")), meta=meta)

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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RankingError(f"{path} is not a valid ranking JSON ({e}): re-run `gaze discover`") from None
        return cls.from_dict(data, where=str(path))


    # ---------------------------------------------------------------- folders and the Hub

    def save_pretrained(self, folder: str | Path, *, model_revision: str | None = None,
                        data_revision: str | None = None) -> Path:
        """A shareable ranking folder: config.json, scores.safetensors, ranking.json, README.md (+ figures)."""
        from safetensors.torch import save_file

        from gaze.plots import plot_matrices, plot_score_map

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"model_id": self.model_id, "model_revision": model_revision, "source": self.meta.get("source", ""),
                  "source_revision": data_revision, "variant": self.method, "n_strips": self.n_strips,
                  "prompt": self.prompt, "layers": self.shape[0], "heads": self.shape[1]}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        tensors = {"scores": self.scores.contiguous(), "matrices": self.matrices.contiguous()}
        for name, scores in self.meta.get("variant_scores", {}).items():
            tensors[f"scores.{name}"] = torch.tensor(scores, dtype=torch.float32)
        save_file(tensors, str(folder / SCORES_FILE), metadata={"model_id": self.model_id, "variant": self.method})
        self.save(folder / RANKING_FILE)
        plot_score_map(self.scores, folder / "score_map.png", title=f"{self.method} gaze score")
        top = self.top(min(6, self.scores.numel()))
        plot_matrices(self.matrices, top, folder / "top_matrices.png")
        (folder / "README.md").write_text(self.card(config, top))
        return folder

    def card(self, config: dict, top: list[Head]) -> str:
        rows = "\n".join(f"| {i + 1} | {l} | {h} | {float(self.scores[l, h]):.4f} |" for i, (l, h) in enumerate(top))
        stab = self.meta.get("stability", {}).get("half_overlap", {})
        stability = ", ".join(f"top-{k} overlap {v:.0%}" for k, v in stab.items()) or "not computed"
        return (
            "---\n"
            f"base_model: {self.model_id}\n"
            "tags:\n- gaze-heads\n- interpretability\n- vision-language\n"
            "---\n\n"
            f"# Gaze-head ranking of {self.model_id}\n\n"
            f"Every attention head of the language backbone ({self.shape[0]} layers x {self.shape[1]} heads) "
            f"ranked by its `{self.method}` gaze score over {self.n_strips} six-panel strips "
            f"(source: {config['source'] or 'unknown'}), made with `gaze discover`. The question was "
            f"\"{self.prompt}\"; a head's score is the mean attention mass of the last prompt token on the "
            "queried panel.\n\n"
            "| rank | layer | head | score |\n| --- | --- | --- | --- |\n" + rows + "\n\n"
            f"Stability between two halves of the strips: {stability}.\n\n"
            "![layer x head score map](score_map.png)\n\n![top heads' queried x attended matrices](top_matrices.png)\n\n"
            "Load it with `gaze.Ranking.from_pretrained(...)`, or pass it as `--ranking` to any `gaze` command.\n"
        )

    @classmethod
    def from_pretrained(cls, name: str | Path, *, revision: str | None = None) -> "Ranking":
        """A ranking from a folder, a ranking JSON, or a hub repo id OWNER/NAME (downloaded with huggingface_hub)."""
        import os

        from gaze.errors import is_hub_id

        path = Path(name)
        if path.exists():
            return cls.load(path)
        if not is_hub_id(name):
            raise RankingError(f"no ranking folder or file {name}: give the --out folder of `gaze discover`, its "
                               "ranking.json, or a hub id OWNER/NAME")
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(repo_id=str(name), revision=revision, allow_patterns=[RANKING_FILE, CONFIG_FILE])
        except Exception as e:  # noqa: BLE001 - network, auth and missing repos all end here
            why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else \
                f"the Hub gave: {str(e).splitlines()[0][:200]}"
            raise RankingError(f"no ranking folder {name} here, and it cannot be downloaded as a hub id ({why}): "
                               "give the --out folder of `gaze discover` or its ranking.json") from None
        return cls.load(folder)

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | None = None,
                    model_revision: str | None = None, data_revision: str | None = None) -> str:
        """Upload the ranking folder to a model repo; the token comes from HF_TOKEN when not given."""
        import os
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token or os.environ.get("HF_TOKEN"))
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, model_revision=model_revision, data_revision=data_revision)
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="model",
                                     commit_message=f"gaze-head ranking of {self.model_id}")
        return str(getattr(info, "commit_url", info))


def _has_non_number(value) -> bool:
    """Whether a nested list holds anything but numbers (strings, None, booleans, objects)."""
    if isinstance(value, list):
        return any(_has_non_number(v) for v in value)
    return isinstance(value, bool) or not isinstance(value, (int, float))


def same_model(a: str, b: str) -> bool:
    """Whether two model ids name the same model: short names ('organism') are their folders; two local
    folders are the same folder; a local folder and a hub id share their last part (a downloaded copy)."""
    from gaze.models import SHORT_NAMES

    def local(x: str) -> Path | None:
        p = Path(SHORT_NAMES.get(x, x))
        return p.resolve() if p.exists() else None

    la, lb = local(str(a)), local(str(b))
    if la is not None and lb is not None:
        return la == lb
    if la is None and lb is None:
        return str(a).rstrip("/") == str(b).rstrip("/")
    return (la or lb).name == str(b if la else a).rstrip("/").split("/")[-1]
