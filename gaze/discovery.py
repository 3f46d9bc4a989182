"""Discovery: rank every head of a model by its gaze score over many strips.

    ranking = discover(loaded, load_strips("strips/", n_strips=50), "runs/qwen3vl")

Each strip's [layers, heads, R, R] matrix is written to `OUT/strips/NNNNNN.safetensors`
as soon as it is computed, so an interrupted run continues where it stopped
(strips already on disk are not recomputed) and ends with the same ranking.
Each file records the id and content hash of its strip and a digest of its own
numbers: a file that is truncated, altered, swapped (another strip's) or of
an older format is named and rescored.
A run can be split over processes (`shard=(rank, world)`): each writes its own
strips, and `merge` averages all files in strip order, which gives exactly
the ranking of a single-process run.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from gaze.errors import GazeError
from gaze.models import Loaded
from gaze.prompts import PANEL_QUESTION
from gaze.ranking import Ranking
from gaze.scoring import VARIANTS, gaze_scores, strip_variants
from gaze.strips import Strip

MANIFEST = "manifest.json"


class DiscoveryError(GazeError):
    """A discovery output folder that cannot be used; the message says how to fix it."""


def weights_fingerprint(model) -> str:
    """A short hash of the model's weights (names, shapes, first and last values of every tensor).

    It tells two checkpoints with the same id apart (a retrained model saved to
    the same folder) at the cost of reading a few values per tensor, not all.
    """
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        flat = p.detach().flatten()
        h.update(f"{name}{tuple(p.shape)}".encode())
        if flat.numel() and not flat.is_meta:  # offloaded (meta) tensors: name and shape only
            h.update(torch.cat([flat[:4], flat[-4:]]).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _settings(loaded: Loaded, template: str) -> dict:
    # what fixes a strip's scores; the weights' fingerprint keeps a rerun from resuming on strips scored
    # by other weights of the same id
    return {"model_id": loaded.model_id, "weights": weights_fingerprint(loaded.model), "n_layers": loaded.n_layers,
            "n_heads": loaded.n_heads, "template": template, "dtype": str(loaded.model.dtype).replace("torch.", "")}


def write_manifest(path: Path, data: dict) -> None:
    """Write a run's manifest (JSON) atomically: an interrupted write never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def manifest_diff(path: Path, settings: dict, defaults: dict | None = None) -> dict:
    """{setting: (old, new)} for every setting the run recorded in `path` differently (`defaults` fill
    settings older runs did not record); {} when `path` does not exist. The one check every resumable run
    (discovery, evaluation) makes before reusing what an earlier run left in its folder."""
    if not path.exists():
        return {}
    old = {**(defaults or {}), **json.loads(path.read_text())}
    return {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}


def _check_settings(out: Path, settings: dict) -> None:
    """Refuse a folder whose scored strips came from other settings; a folder without scored strips (a run
    that failed before its first strip, e.g. a wrong --strips) is taken over."""
    path = out / MANIFEST
    if any((out / "strips").glob("*.safetensors")):
        diff = manifest_diff(path, settings)
        if diff:
            raise DiscoveryError(
                f"{out} holds a discovery run with other settings {diff} (old, new): "
                "use another --out folder, or delete this one to start over"
            )
        settings = {**json.loads(path.read_text()), **settings}
    write_manifest(path, settings)


def strip_file(out: Path, index: int) -> Path:
    return out / "strips" / f"{index:06d}.safetensors"


def _data_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A short SHA-256 of a per-strip file's numbers (names, shapes and bytes), kept in its metadata."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bfloat16 included
    return h.hexdigest()[:16]


def _scored_as(path: Path) -> tuple[str | None, str | None] | str:
    """(strip id, strip hash) a per-strip file was scored from, or why it cannot be trusted (a string)."""
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:  # noqa: BLE001 - a damaged file is rescored
        return f"truncated or unreadable ({str(e).splitlines()[0][:100]})"
    if "data_sha256" not in meta:
        return "written by an older version (no digest of its numbers)"
    if _data_digest(tensors) != meta["data_sha256"]:
        return "altered: its numbers differ from the digest recorded when it was written"
    return meta.get("strip_id"), meta.get("strip_hash")


def _why_not(found, strip_id: str, digest: str) -> str | None:
    """Why a per-strip file (as `_scored_as` read it) is not the score of strip `strip_id` with hash `digest`."""
    if isinstance(found, str):
        return found
    if found[0] != strip_id:
        return f"swapped: it holds strip {found[0]}, not {strip_id}"
    if found[1] != digest:
        return f"stale: strip {strip_id} has changed since it was scored"
    return None


def discover(
    loaded: Loaded,
    strips: Iterable[Strip],
    out: str | Path,
    *,
    template: str = PANEL_QUESTION,
    source: str = "",
    n_strips: int | None = None,
    shard: tuple[int, int] = (0, 1),
    barrier: Callable[[], None] | None = None,
    progress: bool = True,
    share_prefix: bool = True,
    variant: str = "raw",
) -> Ranking | None:
    """Score strips into `out` (resumable) and return the ranking (None on non-zero shards).

    Every per-strip file records the id and content hash of the strip it was
    scored from, and the manifest lists the run's strips: a rerun into the same
    folder reuses a file only for the very same strip at the same index, and
    rescores the rest (another --split, --start, --n-strips, or strips changed
    on disk); the ranking averages exactly this run's strips.

    With `shard=(rank, world)` this process scores strips `rank, rank + world, ...`;
    `barrier` (e.g. Accelerate's `wait_for_everyone`) is called before rank 0 merges.
    """
    out = Path(out)
    rank, world = shard
    settings = _settings(loaded, template)
    if rank == 0:
        _check_settings(out, settings)
    (out / "strips").mkdir(parents=True, exist_ok=True)
    run_strips = []  # every strip of the run, in order: {"id", "hash"}
    bar = tqdm(total=n_strips, desc="discovery", unit="strip", disable=not progress or rank != 0, file=sys.stderr)
    for index, strip in enumerate(strips):
        bar.update(1)
        digest = strip.content_hash()
        run_strips.append({"id": strip.strip_id, "hash": digest})
        if index % world != rank:
            continue
        path = strip_file(out, index)
        if path.exists():
            why = _why_not(_scored_as(path), strip.strip_id, digest)
            if why is None:
                continue
            print(f"{path} cannot be reused, {why}; rescoring it", file=sys.stderr)
        variants = strip_variants(loaded.model, loaded.processor, strip, template=template, share_prefix=share_prefix,
                                  family=loaded.family)
        tensors = {k: v.contiguous().cpu() for k, v in variants.items()}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp),
                  metadata={"strip_id": strip.strip_id, "strip_hash": digest, "data_sha256": _data_digest(tensors)})
        tmp.replace(path)  # atomic: a killed run never leaves a half-written strip
    bar.close()
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    if not run_strips:
        raise DiscoveryError(f"no strips to score into {out}: the strip source gave no strips")
    manifest = {**json.loads((out / MANIFEST).read_text()), "source": source, "strips": run_strips}
    write_manifest(out / MANIFEST, manifest)
    for stale in (out / "strips").glob("*.safetensors"):  # files of an earlier, longer run
        if int(stale.stem) >= len(run_strips):
            stale.unlink()
    return merge(out, model_id=loaded.model_id, template=template, source=source, dtype=settings["dtype"],
                 variant=variant)


def bootstrap_ci(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95):
    """(mean, low, high): the seeded percentile-bootstrap CI of a mean, the project's one bootstrap.

    `values` [N] gives floats (NaNs for no values); [N, ...] gives arrays: the
    CI of the mean over the first axis, per entry (e.g. per head over strips).
    Used by the ranking's stability and by every rate of `gaze.eval`.
    """
    x = np.asarray(values if hasattr(values, "shape") else list(values), dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[0], (n_boot, x.shape[0]))  # [n_boot, N] resampled rows
    # [n_boot, ...] resampled means (a loop keeps memory at one resample for many heads)
    means = x[idx].mean(axis=1) if x.ndim == 1 else np.stack([x[i].mean(0) for i in idx])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, tail, axis=0), np.percentile(means, 100 - tail, axis=0)
    if x.ndim == 1:
        return float(x.mean()), float(low), float(high)
    return x.mean(0), low, high


def stability(per_strip: torch.Tensor, ks: tuple[int, ...] = (5, 10, 20), n_boot: int = 1000, seed: int = 0) -> dict:
    """How much a ranking can be trusted: per-head bootstrap 95% CIs over strips, and the
    overlap of the top-K heads between two disjoint halves of the strips (even vs odd strips).

    per_strip: [N, L, H] scores per strip.
    """
    n = per_strip.shape[0]
    _, low, high = bootstrap_ci(per_strip.double().numpy(), n_boot=n_boot, seed=seed)  # [L, H] each
    overlap = {}
    if n >= 2:
        a, b = per_strip[0::2].mean(0).flatten(), per_strip[1::2].mean(0).flatten()
        for k in ks:
            k = min(k, a.numel())
            top_a, top_b = set(a.topk(k).indices.tolist()), set(b.topk(k).indices.tolist())
            overlap[str(k)] = len(top_a & top_b) / k
    return {"ci_low": low.tolist(), "ci_high": high.tolist(),
            "half_overlap": overlap, "n_boot": n_boot}


def merge(out: str | Path, *, model_id: str, template: str, source: str = "", dtype: str = "",
          variant: str = "raw") -> Ranking:
    """Average the strip files of the run in `out` (strip order) into a ranking, saved as `out/ranking.json`.

    The run's strips are those its manifest lists (id and content hash each);
    a file scored from another strip is an error. `variant` picks the score
    (see `gaze.scoring.VARIANTS`); every variant's scores are kept in
    `meta["variant_scores"]`, all from the same pass.
    """
    if variant not in VARIANTS:
        raise DiscoveryError(f"unknown score variant {variant!r}; use one of {sorted(VARIANTS)}")
    out = Path(out)
    manifest = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).exists() else {}
    run_strips = manifest.get("strips")
    if not run_strips:
        raise DiscoveryError(f"no finished discovery run in {out}: run `gaze discover ... --out {out}`")
    files = [strip_file(out, i) for i in range(len(run_strips))]
    missing = [i for i, f in enumerate(files) if not f.exists()]
    if missing:
        raise DiscoveryError(f"strips {missing[:10]} are not scored yet in {out}: run discovery again to finish them")
    for f, s in zip(files, run_strips):
        why = _why_not(_scored_as(f), s["id"], s["hash"])
        if why is not None:
            raise DiscoveryError(f"{f} cannot be used, {why}: run discovery again to rescore it")
    loaded = [load_file(str(f)) for f in files]
    strip_ids = [s["id"] for s in run_strips]
    variant_scores, chosen = {}, None
    for name in VARIANTS:
        if all(name in x for x in loaded):
            stack = torch.stack([x[name] for x in loaded])  # [N, L, H, R, R]
            variant_scores[name] = gaze_scores(stack.mean(0)).tolist()
            if name == variant:
                chosen = stack
    if chosen is None:
        raise DiscoveryError(f"the strips in {out} lack the {variant!r} variant: rerun discovery in a new folder")
    mean = chosen.mean(0)  # [L, H, R, R]
    ranking = Ranking(
        model_id=model_id,
        scores=gaze_scores(mean),
        matrices=mean,
        n_strips=len(files),
        prompt=template,
        method=variant,
        meta={"source": source, "dtype": dtype, "strip_ids": strip_ids, "variant_scores": variant_scores,
              "stability": stability(gaze_scores(chosen))},
    )
    ranking.save(out / "ranking.json")
    return ranking


def summary(ranking: Ranking, k: int = 10) -> str:
    """Top heads and the layer band they sit in, as printed by `gaze discover`."""
    n_layers, n_heads = ranking.shape
    lines = [f"{ranking.model_id}: {n_layers} layers x {n_heads} heads, {ranking.n_strips} strips"]
    lines.append(f"top {k} gaze heads (layer, head): score")
    for l, h in ranking.top(k):
        lines.append(f"  L{l:>2} H{h:>2}: {float(ranking.scores[l, h]):.4f}")
    lo, hi = ranking.layer_band(k)
    med = float(ranking.scores.flatten().median())
    lines.append(f"top {k} heads sit in layers {lo}-{hi} of 0-{n_layers - 1}; median score {med:.4f}")
    stab = ranking.meta.get("stability")
    if stab:
        low, high = torch.tensor(stab["ci_low"]), torch.tensor(stab["ci_high"])
        (l, h), = ranking.top(1) or [(0, 0)]
        lines.append(f"stability: top head 95% CI [{float(low[l, h]):.4f}, {float(high[l, h]):.4f}] over strips; "
                     "top-K overlap between two halves of the strips: "
                     + ", ".join(f"K={k}: {v:.0%}" for k, v in stab["half_overlap"].items()))
    return "\n".join(lines)
