"""`gaze probe reading-order`: where reading order lives in the residual stream (the paper's section 4, appendix B).

    gaze probe reading-order --model organism --strips procedural:eval --n-strips 40 --out runs/probe
    gaze probe reading-order ... --ranking runs/organism --orderings 720      # every panel ordering

Panels carry letter overlays (datagen's; a strip's `.letters`), so every answer is one letter, judged
exactly (`gaze.eval.judges.LetterJudge`: the answer must name one of the strip's letters).

1. Pairs. For every strip and panel k: the normal prompt "Which letter is on the {ordinal} panel?" and the
   reverse prompt, the same question after "Read the comic in reverse, " (the paper's wording; answered
   by the letter of the k-th panel counted from the right). The residual stream at the last prompt token
   (the position whose logits pick the answer) is captured at the output of every decoder layer
   (`gaze.residual.capture_residual`).
2. Direction. Per layer, mean(reverse) - mean(normal) over the BUILD strips (even-indexed strips of the
   run); everything below is measured on the held-out EVAL strips (odd-indexed), so a direction is never
   scored on the pairs it was averaged from.
3. Layer sweep. The direction of layer l is added at layer l alone (alpha = 1; `gaze.residual.add_direction`,
   every position by default) while the NORMAL prompt is answered: flip rate = share of answers naming the
   reverse answer's letter; logit difference = logit(reverse letter) - logit(normal letter) at the first
   answer token (a letter's logit: the larger of its token with and without a leading space). Bootstrap
   95% CIs over the (strip, panel) items.
4. Ordering sweep. For a panel ordering pi (the panel read k-th is pi[k]), the prompt
   "Read the comic in the order 4, 2, 6, 1, 3, 5, which letter is on the 2nd panel?" (answer: the letter
   of panel pi[2]); its direction at the ordering layer (default: the layer sweep's best) is
   mean(ordered) - mean(normal) over the build strips, and its flip rate is measured on the eval strips
   over the questions whose answer it changes (pi[k] != k). "reverse" is always included and is built from
   the reverse prompt (exactly the layer sweep's direction); "reverse as an order" (6, 5, 4, 3, 2, 1
   through the ordering template) is a control for the wording; the identity ordering is the default
   reading, so its prompt IS the normal prompt: its direction is exactly zero and it changes no answer.
   All 720 orderings (`--orderings 720`), or a seeded sample.
5. Narration. Free narration ("Please describe what happens in each panel, in order.") with and without
   the directions added at every layer of the band (each layer its own direction; the band: the
   contiguous layers around the best one whose flip rate is at least half the best). The order the
   narration describes is read by matching each segment ("Panel k:" parts, else sentences) to the strip's
   captions (`gaze.eval.judges.CaptionJudge`; first mention of each panel); Spearman's rho of that order
   against the REVERSED order (the paper's sign: left-to-right reading gives -1), and the share of
   narrations whose first described panel is the last panel.
6. PCA. The answer-position activations of the normal prompts of all strips, per layer, projected on their
   top two principal components: the silhouette of the six queried-panel clusters (numpy only).

Resumable: every item (a strip's pairs, a strip's layer sweep, an ordering, a narration) is one file under
OUT/items/, named by the strip's id and a hash of its content (pixels, boxes, letters) and of what the
item depends on (the direction it used), written atomically; a rerun reuses what matches and recomputes
the rest (missing, damaged or stale files). OUT/probe.json records the settings that fix every item
(model and weights, prompts, alpha, positions, answer length): a folder made with others is refused.
OUT/aggregate.json, OUT/directions.safetensors, OUT/figures/*.png and OUT/report.md are rewritten at the end.

Wired into `gaze` by `add_parser(subparsers)`; `run(args)` runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import random
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gaze.errors import GazeError
from gaze.prompts import REVERSE_PREFIX, in_reverse, lower_first

QUESTION = "Which letter is on the {ordinal} panel?"
ORDER_PREFIX = "Read the comic in the order {order}, "
NARRATION_PROMPT = "Please describe what happens in each panel, in order."
POSITIONS = ("all", "answer")  # every position | the last prompt token and every generated token

MANIFEST = "probe.json"
AGGREGATE = "aggregate.json"
DIRECTIONS = "directions.safetensors"
REPORT = "report.md"
FIGURES = "figures"
DPI = 80

# The paper's numbers (Qwen3-VL-8B, 36 layers; section 4 and appendix B).
PAPER = {
    "model": "Qwen3-VL-8B (36 layers)",
    "band": "flips only in layers 20-28 of 36",
    "peak": "97% at layer 22",
    "reverse": "91.3% (reverse) vs a mean of 39.9% (max 60.4%) for the other 719 orderings",
    "narration_rho": "Spearman -0.78 -> +0.46 (against the reversed order)",
    "narration_last": "65% of steered narrations start with the last panel",
    "silhouette": "panel clusters separate in layers ~20-28, silhouette peaks at layer 23",
    "pairs": "500 (normal, reverse) pairs; 100 strips x 3 seeds for narration",
}


class ProbeError(GazeError):
    """A probe that cannot run as asked; the message says how to fix it."""


# ---------------------------------------------------------------- settings and prompts


@dataclass(frozen=True)
class ProbeConfig:
    """One field per `gaze probe reading-order` flag."""

    model: str = "organism"
    strips: str = "procedural:eval"
    out: str = "runs/probe"
    n_strips: int = 40
    orderings: int = 24  # orderings of the sweep besides "reverse" (720: all)
    extra_orderings: tuple[tuple[int, ...], ...] = ()  # orderings always included (--ordering 4,2,6,1,3,5)
    ordering_layer: int | None = None  # default: the layer sweep's best layer
    layers: tuple[int, ...] | None = None  # layers of the sweep (default: all)
    narration_strips: int = 10
    narration_layers: tuple[int, ...] | None = None  # default: the band
    narration_tokens: int = 120
    answer_tokens: int = 3
    alpha: float = 1.0
    positions: str = "all"
    question: str | None = None  # default: QUESTION, or the model folder's prompts.json "letter"
    reverse_prefix: str = REVERSE_PREFIX
    order_prefix: str = ORDER_PREFIX
    narration_prompt: str | None = None  # default: NARRATION_PROMPT, or prompts.json "narration"
    ranking: str | None = None
    top_k: int | None = None  # gaze heads drawn from the ranking (default: the paper's share)
    skip: tuple[str, ...] = ()  # of "orderings", "narration", "pca"
    seed: int = 0
    n_boot: int = 2000
    panel_size: int = 64
    device: str | None = None
    dtype: str = "float32"
    device_map: str | None = None
    no_report: bool = False  # aggregate.json only: no report.md, no figures


SECTIONS = ("orderings", "narration", "pca")


def check_config(cfg: ProbeConfig) -> ProbeConfig:
    """Refuse settings that cannot run, before any model loads."""
    if cfg.n_strips < 2:
        raise ProbeError(f"--n-strips {cfg.n_strips}: the probe needs at least 2 strips (directions are built on "
                         "the even-indexed strips and measured on the odd-indexed ones)")
    if not 0 <= cfg.orderings <= 720:
        raise ProbeError(f"--orderings {cfg.orderings}: give 0..720 (720: every ordering of six panels)")
    if cfg.narration_strips < 0 or cfg.narration_tokens < 1 or cfg.answer_tokens < 1:
        raise ProbeError("--narration-strips must be >= 0, --narration-tokens and --answer-tokens >= 1")
    if not math.isfinite(cfg.alpha):
        raise ProbeError(f"--alpha {cfg.alpha} is not a finite number")
    if cfg.positions not in POSITIONS:
        raise ProbeError(f"--positions {cfg.positions!r}: use one of {', '.join(POSITIONS)}")
    bad = set(cfg.skip) - set(SECTIONS)
    if bad:
        raise ProbeError(f"--skip {','.join(sorted(bad))}: choose from {','.join(SECTIONS)}")
    for name, text, need in (("--question", cfg.question, "{ordinal}"), ("--order-prefix", cfg.order_prefix, "{order}")):
        if text is not None and need not in text:
            raise ProbeError(f"{name} {text!r} has no {need}: write it where the {need[1:-1]} goes")
    if cfg.n_boot < 1 or cfg.panel_size < 16:
        raise ProbeError("--n-boot must be >= 1 and --panel-size >= 16")
    src = cfg.strips
    if src.startswith("procedural:"):
        spec = src.split(":", 1)[1]
        if spec not in ("eval", "discovery") and not spec.replace("_", "").isdigit():
            raise ProbeError(f"bad strip source {src}: use procedural:eval, procedural:discovery or procedural:SEED0")
    elif not Path(src).exists() and (Path(src).is_absolute() or src.startswith(".") or src.count("/") != 1):
        raise ProbeError(f"strip source {src} not found: give procedural:eval, a folder, a dataset or a hub id")
    r = cfg.ranking
    if r is not None and not Path(r).exists() and (r.count("/") != 1 or r.startswith((".", "/"))):
        raise ProbeError(f"ranking {r} not found: give a ranking folder, a ranking.json from `gaze discover` or a "
                         "hub id OWNER/NAME")
    return cfg


@dataclass(frozen=True)
class Prompts:
    question: str
    reverse_prefix: str
    order_prefix: str
    narration: str

    def normal(self, k: int) -> str:
        from gaze.prompts import panel_question

        return panel_question(k, self.question)

    def reverse(self, k: int) -> str:
        return in_reverse(self.normal(k), self.reverse_prefix)

    def ordered(self, order: tuple[int, ...], k: int) -> str:
        return self.order_prefix.format(order=", ".join(map(str, order))) + lower_first(self.normal(k))


def trained_prompts(model: str) -> dict:
    """The prompts a model folder says it was trained on (`prompts.json`, the organism's), or {}."""
    from gaze.models import SHORT_NAMES

    folder = Path(SHORT_NAMES.get(model, model))
    path = folder / "prompts.json"
    if folder.is_dir() and path.exists():
        try:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else {}
        except json.JSONDecodeError:
            return {}
    return {}


def prompts_for(cfg: ProbeConfig) -> Prompts:
    trained = trained_prompts(cfg.model)
    question = cfg.question or trained.get("letter") or QUESTION
    narration = cfg.narration_prompt or trained.get("narration") or NARRATION_PROMPT
    return Prompts(question=question, reverse_prefix=cfg.reverse_prefix, order_prefix=cfg.order_prefix,
                   narration=narration)


# ---------------------------------------------------------------- orderings


@dataclass(frozen=True)
class Ordering:
    """A panel ordering: `order[k - 1]` is the panel read k-th. `kind` picks its prompt: "normal" (the
    identity, the default reading), "reverse" (the reverse prompt) or "order" (the ordering template)."""

    name: str
    order: tuple[int, ...]
    kind: str

    def prompt(self, prompts: Prompts, k: int) -> str:
        if self.kind == "normal":
            return prompts.normal(k)
        if self.kind == "reverse":
            return prompts.reverse(k)
        return prompts.ordered(self.order, k)


def orderings(n_panels: int, count: int, seed: int, extra: tuple[tuple[int, ...], ...] = ()) -> list[Ordering]:
    """"reverse", "reverse as an order", `count` other orderings (all of them when count covers them, else a
    seeded sample; the identity only if drawn) and the `extra` ones."""
    identity = tuple(range(1, n_panels + 1))
    rev = identity[::-1]
    out = [Ordering("reverse", rev, "reverse"), Ordering("reverse as an order", rev, "order")]
    rng = random.Random(f"orderings/{seed}")
    if n_panels <= 7:  # at most 5,040 orderings: enumerate them
        others = [p for p in itertools.permutations(identity) if p != rev]
        chosen = others if count >= len(others) else rng.sample(others, count)
    else:  # too many to list: draw distinct random ones
        seen: set = set()
        while len(seen) < count:
            p = list(identity)
            rng.shuffle(p)
            if tuple(p) != rev:
                seen.add(tuple(p))
        chosen = list(seen)
    for p in extra:
        if sorted(p) != list(identity):
            raise ProbeError(f"ordering {','.join(map(str, p))} is not an ordering of panels 1..{n_panels}")
    chosen = sorted(set(chosen) | {tuple(p) for p in extra if tuple(p) != rev})
    for p in chosen:
        out.append(Ordering("identity", p, "normal") if p == identity else Ordering(",".join(map(str, p)), p, "order"))
    return out


# ---------------------------------------------------------------- files


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:60] or "item"


def strip_key(strip) -> str:
    """A strip's identity in file names: its id and a hash of its pixels, boxes and letters."""
    return f"{_slug(strip.strip_id)}-{_digest(strip.strip_id, strip.content_hash(), list(strip.letters or ()))}"


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    tmp.replace(path)  # atomic: a killed run never leaves half a file


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def _read_json(path: Path, key: str) -> dict | None:
    """An item file's content if it is readable and made for `key`; None (recompute) otherwise."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def _save_tensors(path: Path, tensors: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"json": json.dumps(meta)})
    tmp.replace(path)


def _load_tensors(path: Path, key: str) -> tuple[dict, dict] | None:
    from safetensors.torch import load_file
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("json", "{}"))
        if meta.get("key") != key:
            return None
        return load_file(str(path)), meta
    except Exception:  # noqa: BLE001 - a damaged or foreign file is recomputed
        return None


# ---------------------------------------------------------------- asking


class Asker:
    """Answers letter questions (greedy, `answer_tokens` tokens) and reads the letters' first-token logits."""

    def __init__(self, loaded, answer_tokens: int):
        self.loaded = loaded
        self.answer_tokens = answer_tokens
        self.tok = loaded.processor.tokenizer
        self._ids: dict[str, list[int]] = {}

    def letter_ids(self, letter: str) -> list[int]:
        if letter not in self._ids:
            ids = set()
            for text in (letter, " " + letter):
                enc = self.tok.encode(text, add_special_tokens=False)
                if enc:
                    ids.add(int(enc[0]))
            self._ids[letter] = sorted(ids)
        return self._ids[letter]

    def ask(self, strip, question: str, max_new_tokens: int | None = None) -> tuple[str, list[float]]:
        """(answer text, [n_panels] logits of each panel's letter at the first answer token)."""
        import torch

        from gaze.generation import prepare_inputs

        inputs, _ = prepare_inputs(self.loaded, strip.image, question)
        n = int(inputs["input_ids"].shape[1])
        with torch.no_grad():
            out = self.loaded.model.generate(**inputs, max_new_tokens=max_new_tokens or self.answer_tokens,
                                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                                             pad_token_id=self.tok.pad_token_id)
        ids = out.sequences[0, n:].tolist()
        specials = set(self.tok.all_special_ids)
        while ids and ids[-1] in specials:
            ids.pop()
        text = self.tok.decode(ids, skip_special_tokens=True).strip()
        first = out.logits[0][0].float()
        logits = [max(float(first[i]) for i in self.letter_ids(l)) for l in strip.letters]
        return text, logits


def _names_panel(answer: str, strip) -> int | None:
    """The panel whose letter the answer names (exact, one letter), or None."""
    from gaze.eval.judges import LetterJudge

    return LetterJudge().judge(answer, strip, 1).matched_panel


def _edits(model, directions: dict, alpha: float, positions: str):
    """An ExitStack adding each layer's direction (layer -> [hidden])."""
    import contextlib

    from gaze.residual import add_direction

    stack = contextlib.ExitStack()
    where = None if positions == "all" else slice(-1, None)
    for layer, vector in sorted(directions.items()):
        stack.enter_context(add_direction(model, int(layer), vector, alpha=alpha, positions=where))
    return stack


# ---------------------------------------------------------------- the stages


@dataclass
class Run:
    cfg: ProbeConfig
    loaded: object
    prompts: Prompts
    out: Path
    strips: list
    build: list
    eval: list
    asker: Asker
    n_layers: int
    progress: bool = True
    captures: dict = field(default_factory=dict)  # strip key -> (tensors, meta)

    def bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="item", disable=not self.progress, file=sys.stderr, leave=False)


def capture_pairs(run: Run) -> None:
    """Stage 1: per strip, the normal and reverse answers and the residual at the answer position, every layer."""
    import torch

    from gaze.residual import capture_residual

    bar = run.bar(len(run.strips), "pairs")
    for strip in run.strips:
        key = strip_key(strip)
        path = run.out / "items" / "pairs" / f"{key}.safetensors"
        got = _load_tensors(path, key)
        if got is None:
            tensors, meta = {}, {"key": key, "strip_id": strip.strip_id, "letters": list(strip.letters)}
            for kind, make in (("normal", run.prompts.normal), ("reverse", run.prompts.reverse)):
                acts, answers, logits = [], [], []
                for k in range(1, strip.n_panels + 1):
                    with capture_residual(run.loaded.model, None, positions=-1) as cap:
                        text, lg = run.asker.ask(strip, make(k))
                    acts.append(cap.activations[:, 0].float())  # [L, H]
                    answers.append(text)
                    logits.append(lg)
                tensors[kind] = torch.stack(acts)  # [n, L, H]
                tensors[f"{kind}_logits"] = torch.tensor(logits, dtype=torch.float32)  # [n(k), n(letters)]
                meta[f"{kind}_answers"] = answers
            _save_tensors(path, tensors, meta)
            got = (tensors, meta)
        run.captures[key] = got
        bar.update(1)
    bar.close()


def reverse_directions(run: Run):
    """[L, H] float32: mean(reverse) - mean(normal) over the build strips' pairs (float64 sums)."""
    import torch

    rev = torch.cat([run.captures[strip_key(s)][0]["reverse"] for s in run.build]).double()  # [N, L, H]
    nor = torch.cat([run.captures[strip_key(s)][0]["normal"] for s in run.build]).double()
    return (rev.mean(0) - nor.mean(0)).float()


def tensor_digest(t) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def layer_sweep(run: Run, directions, layers: list[int]) -> dict:
    """Stage 3: per eval strip, per layer, the normal prompts answered with that layer's direction added."""
    dig = tensor_digest(directions)
    results = {}
    bar = run.bar(len(run.eval) * len(layers), "layer sweep")
    for strip in run.eval:
        key = f"{strip_key(strip)}-{dig}"
        path = run.out / "items" / "layers" / f"{key}.json"
        item = _read_json(path, key) or {"key": key, "strip_id": strip.strip_id, "layers": {}}
        for layer in layers:
            if str(layer) not in item["layers"]:
                answers, logits = [], []
                with _edits(run.loaded.model, {layer: directions[layer]}, run.cfg.alpha, run.cfg.positions):
                    for k in range(1, strip.n_panels + 1):
                        text, lg = run.asker.ask(strip, run.prompts.normal(k))
                        answers.append(text)
                        logits.append(lg)
                item["layers"][str(layer)] = {"answers": answers, "logits": logits}
                _write_json(path, item)
            bar.update(1)
        results[strip_key(strip)] = item
    bar.close()
    return results


def ordering_sweep(run: Run, directions, layer: int, chosen: list[Ordering], sweep: dict) -> list[dict]:
    """Stage 4: per ordering, its direction at `layer` (build strips) and its flips (eval strips)."""
    import torch

    from gaze.residual import add_direction, capture_residual

    base = torch.cat([run.captures[strip_key(s)][0]["normal"][:, layer] for s in run.build]).double()  # [N, H]
    build_keys = [strip_key(s) for s in run.build]
    eval_keys = [strip_key(s) for s in run.eval]
    rev = directions[layer]
    out = []
    bar = run.bar(len(chosen), "orderings")
    for o in chosen:
        key = f"{_slug(o.name)}-{_digest(o.name, o.order, o.kind, layer, build_keys, eval_keys, tensor_digest(rev))}"
        path = run.out / "items" / "orderings" / f"{key}.json"
        item = _read_json(path, key)
        if item is None:
            prompted = []  # (answer names pi[k]) on the build strips
            if o.kind == "reverse":
                d = rev.double()
                for s in run.build:
                    for k, a in enumerate(run.captures[strip_key(s)][1]["reverse_answers"], start=1):
                        prompted.append(_names_panel(a, s) == o.order[k - 1])
            elif o.kind == "normal":
                d = torch.zeros_like(base[0])
                for s in run.build:
                    for k, a in enumerate(run.captures[strip_key(s)][1]["normal_answers"], start=1):
                        prompted.append(_names_panel(a, s) == o.order[k - 1])
            else:
                acts = []
                for s in run.build:
                    for k in range(1, s.n_panels + 1):
                        with capture_residual(run.loaded.model, [layer], positions=-1) as cap:
                            a, _ = run.asker.ask(s, o.prompt(run.prompts, k))
                        acts.append(cap.activations[0, 0].double())
                        prompted.append(_names_panel(a, s) == o.order[k - 1])
                d = torch.stack(acts).mean(0) - base.mean(0)
            d = d.float()
            flips, changed = [], []
            for s in run.eval:
                normal_answers = run.captures[strip_key(s)][1]["normal_answers"]
                steered = None
                if o.kind == "reverse" and str(layer) in sweep.get(strip_key(s), {}).get("layers", {}):
                    steered = sweep[strip_key(s)]["layers"][str(layer)]["answers"]  # the layer sweep's own answers
                if steered is None:
                    steered = []
                    where = None if run.cfg.positions == "all" else slice(-1, None)
                    with add_direction(run.loaded.model, layer, d, alpha=run.cfg.alpha, positions=where):
                        for k in range(1, s.n_panels + 1):
                            steered.append(run.asker.ask(s, run.prompts.normal(k))[0])
                for k, (a, a0) in enumerate(zip(steered, normal_answers), start=1):
                    changed.append(a != a0)
                    if o.order[k - 1] != k:
                        flips.append(_names_panel(a, s) == o.order[k - 1])
            norm_rev = float(rev.double().norm())
            cos = float(d.double() @ rev.double() / (float(d.double().norm()) * norm_rev)) \
                if float(d.norm()) > 0 and norm_rev > 0 else None
            item = {"key": key, "name": o.name, "order": list(o.order), "kind": o.kind, "layer": layer,
                    "flips": flips, "changed": changed, "prompted": prompted, "norm": float(d.double().norm()),
                    "cosine_with_reverse": cos}
            _write_json(path, item)
        out.append(item)
        bar.update(1)
    bar.close()
    return out


def caption_segments(text: str) -> list[str]:
    """'Panel k:' parts of a narration, else its sentences."""
    parts = re.split(r"(?i)\bpanel\s*\d+\s*[:.)-]", text)
    parts = [p for p in parts if p.strip()]
    if len(parts) > 1:
        return parts
    return [p for p in re.split(r"(?<=[.!?\n])\s+", text) if p.strip()]


def described_order(text: str, captions) -> list[int]:
    """Panels (1-based) in the order a narration first describes them: each segment matched to a caption
    (`CaptionJudge`, offline); unmatched segments are skipped; each panel counts at its first mention."""
    from gaze.eval.judges import CaptionJudge

    judge, seen = CaptionJudge(), []
    for seg in caption_segments(text):
        index, _ = judge.match(seg, list(captions))
        if index is not None and index + 1 not in seen:
            seen.append(index + 1)
    return seen


def reversed_rho(order: list[int], n_panels: int) -> float | None:
    """Spearman of the described order against the reversed order (left to right: -1, right to left: +1)."""
    from gaze.eval.statistics import spearman

    if len(order) < 2:
        return None
    return spearman(list(range(len(order))), [n_panels + 1 - p for p in order])


def narration(run: Run, directions, layers: list[int]) -> list[dict]:
    """Stage 5: free narration with and without the band's directions."""
    from gaze.generation import generate

    strips = [s for s in run.eval if s.captions is not None][: run.cfg.narration_strips]
    dig = tensor_digest(directions[layers]) if layers else "none"
    out = []
    bar = run.bar(len(strips), "narration")
    for s in strips:
        key = f"{strip_key(s)}-{_digest(layers, dig, run.prompts.narration, run.cfg.narration_tokens)}"
        path = run.out / "items" / "narration" / f"{key}.json"
        item = _read_json(path, key)
        if item is None:
            base = generate(run.loaded, s.image, run.prompts.narration, max_new_tokens=run.cfg.narration_tokens)
            with _edits(run.loaded.model, {l: directions[l] for l in layers}, run.cfg.alpha, run.cfg.positions):
                steered = generate(run.loaded, s.image, run.prompts.narration, max_new_tokens=run.cfg.narration_tokens)
            item = {"key": key, "strip_id": s.strip_id, "layers": layers}
            for name, g in (("base", base), ("steered", steered)):
                order = described_order(g.text, s.captions)
                item[name] = {"text": g.text, "order": order, "rho": reversed_rho(order, s.n_panels),
                              "starts_last": bool(order) and order[0] == s.n_panels, "degenerate": g.degenerate}
            _write_json(path, item)
        out.append(item)
        bar.update(1)
    bar.close()
    return out


def silhouette(x, labels) -> float | None:
    """Mean silhouette of points x [N, D] in clusters `labels` [N] (Euclidean; numpy only)."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    kinds = np.unique(labels)
    if len(kinds) < 2 or len(x) <= len(kinds):
        return None
    sq = (x ** 2).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0))
    scores = []
    for i in range(len(x)):
        own = labels == labels[i]
        n_own = own.sum() - 1
        if n_own == 0:
            scores.append(0.0)
            continue
        a = dist[i, own].sum() / n_own
        b = min(dist[i, labels == c].mean() for c in kinds if c != labels[i])
        scores.append(0.0 if max(a, b) == 0 else (b - a) / max(a, b))
    return float(np.mean(scores))


def pca(x, dims: int = 2):
    """x [N, D] -> its projection on the top `dims` principal components [N, dims]."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    return u[:, :dims] * s[:dims]


def pca_silhouettes(run: Run, dims: int = 2) -> list[float | None]:
    """Stage 6: per layer, the silhouette of the queried-panel clusters of the normal prompts' activations."""
    import torch

    acts = torch.cat([run.captures[strip_key(s)][0]["normal"] for s in run.strips]).numpy()  # [N*n, L, H]
    labels = [k for s in run.strips for k in range(1, s.n_panels + 1)]
    return [silhouette(pca(acts[:, l], dims), labels) for l in range(acts.shape[1])]


# ---------------------------------------------------------------- aggregate


def _ci(values, run: Run):
    from gaze.eval.statistics import bootstrap_ci

    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    mean, lo, hi = bootstrap_ci(values, n_boot=run.cfg.n_boot, seed=run.cfg.seed)
    return {"mean": mean, "low": lo, "high": hi, "n": len(values)}


def band_of(flip: list[float | None], logit: list[float | None]) -> tuple[list[int], int]:
    """(the band, the best layer): the contiguous layers around the best flip rate holding at least half of
    it; without any flip, the layer of the largest logit difference alone."""
    rates = [-1.0 if f is None else f for f in flip]
    best = max(range(len(rates)), key=lambda l: (rates[l], -math.inf if logit[l] is None else logit[l]))
    if rates[best] <= 0:
        best = max(range(len(logit)), key=lambda l: -math.inf if logit[l] is None else logit[l])
        return [best], best
    lo = hi = best
    while lo > 0 and rates[lo - 1] >= rates[best] / 2:
        lo -= 1
    while hi < len(rates) - 1 and rates[hi + 1] >= rates[best] / 2:
        hi += 1
    return list(range(lo, hi + 1)), best


def aggregate(run: Run, layers: list[int], sweep: dict, ords: list[dict] | None, narr: list[dict] | None,
              sil: list | None, gaze_layers: dict | None) -> dict:
    per_layer = {}
    base_diff = []
    for s in run.eval:
        lg = run.captures[strip_key(s)][0]["normal_logits"]
        n = s.n_panels
        base_diff += [float(lg[k - 1, n - k] - lg[k - 1, k - 1]) for k in range(1, n + 1) if n + 1 - k != k]
    for layer in layers:
        flips, diffs, changed = [], [], []
        for s in run.eval:
            entry = sweep[strip_key(s)]["layers"][str(layer)]
            normal_answers = run.captures[strip_key(s)][1]["normal_answers"]
            n = s.n_panels
            for k in range(1, n + 1):
                if n + 1 - k == k:
                    continue
                a = entry["answers"][k - 1]
                flips.append(_names_panel(a, s) == n + 1 - k)
                lg = entry["logits"][k - 1]
                diffs.append(lg[n - k] - lg[k - 1])
                changed.append(a != normal_answers[k - 1])
        per_layer[layer] = {"flip": _ci(flips, run), "logit_diff": _ci(diffs, run), "changed": _ci(changed, run),
                            "silhouette": None if sil is None else sil[layer]}
    flip_means = [per_layer[l]["flip"]["mean"] if l in per_layer and per_layer[l]["flip"] else None
                  for l in range(run.n_layers)]
    logit_means = [per_layer[l]["logit_diff"]["mean"] if l in per_layer and per_layer[l]["logit_diff"] else None
                   for l in range(run.n_layers)]
    band, best = band_of(flip_means, logit_means)
    competence = {}
    for kind, target in (("normal", lambda n, k: k), ("reverse", lambda n, k: n + 1 - k)):
        hits = [_names_panel(a, s) == target(s.n_panels, k) for s in run.strips
                for k, a in enumerate(run.captures[strip_key(s)][1][f"{kind}_answers"], start=1)]
        competence[kind] = _ci(hits, run)
    agg = {
        "meta": {"model": run.cfg.model, "n_layers": run.n_layers, "n_strips": len(run.strips),
                 "build_strips": [s.strip_id for s in run.build], "eval_strips": [s.strip_id for s in run.eval],
                 "prompts": asdict(run.prompts), "alpha": run.cfg.alpha, "positions": run.cfg.positions,
                 "answer_tokens": run.cfg.answer_tokens, "source": run.cfg.strips, "seed": run.cfg.seed,
                 "n_boot": run.cfg.n_boot},
        "competence": competence,
        "unsteered_logit_diff": _ci(base_diff, run),
        "layers": {str(l): v for l, v in per_layer.items()},
        "band": band, "best_layer": best,
        "paper": PAPER,
    }
    if sil is not None:
        valid = [(v, l) for l, v in enumerate(sil) if v is not None]
        agg["silhouette"] = {"per_layer": sil, "peak_layer": max(valid)[1] if valid else None}
    if ords is not None:
        rows = []
        for o in ords:
            rows.append({"name": o["name"], "order": o["order"], "kind": o["kind"], "layer": o["layer"],
                         "flip": _ci(o["flips"], run), "changed": _ci(o["changed"], run),
                         "prompted": _ci(o["prompted"], run), "norm": o["norm"],
                         "cosine_with_reverse": o["cosine_with_reverse"]})
        others = [r["flip"]["mean"] for r in rows if r["kind"] == "order" and r["name"] != "reverse as an order"
                  and r["flip"] is not None]
        rev = next(r for r in rows if r["name"] == "reverse")
        agg["orderings"] = {
            "layer": ords[0]["layer"] if ords else None, "rows": rows,
            "reverse": rev["flip"], "others_mean": sum(others) / len(others) if others else None,
            "others_max": max(others) if others else None, "n_others": len(others),
            "reverse_rank": (1 + sum(v > rev["flip"]["mean"] for v in others)) if others and rev["flip"] else None,
        }
    if narr is not None:
        summary = {"layers": narr[0]["layers"] if narr else [], "n": len(narr)}
        for name in ("base", "steered"):
            summary[name] = {"rho": _ci([x[name]["rho"] for x in narr], run),
                             "starts_last": _ci([x[name]["starts_last"] for x in narr], run),
                             "identified": sum(len(x[name]["order"]) >= 2 for x in narr),
                             "degenerate": sum(bool(x[name]["degenerate"]) for x in narr)}
        agg["narration"] = summary
    if gaze_layers is not None:
        agg["gaze_heads"] = gaze_layers
    return agg


# ---------------------------------------------------------------- figures and report


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _gaze_bars(ax, agg: dict):
    g = agg.get("gaze_heads")
    if not g:
        return
    twin = ax.twinx()
    counts = g["per_layer"]
    twin.bar(range(len(counts)), counts, color="#ff7f0e", alpha=0.25, width=0.8,
             label=f"top-{g['k']} gaze heads per layer")
    twin.set_ylabel(f"top-{g['k']} gaze heads")
    twin.legend(loc="upper right", fontsize=7)


def _save(plt, fig, path: Path) -> str:
    """Lay out, write and close a figure; its file name, for the report."""
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path.name


def _layer_plot(agg: dict, field_: str, ylabel: str, path: Path, baseline: float | None = None) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    layers = sorted(int(l) for l in agg["layers"])
    ys = [agg["layers"][str(l)][field_] for l in layers]
    xs = [l for l, y in zip(layers, ys) if y]
    mean = [y["mean"] for y in ys if y]
    lo = [y["low"] for y in ys if y]
    hi = [y["high"] for y in ys if y]
    ax.plot(xs, mean, marker="o", color="#1f77b4", label=ylabel)
    ax.fill_between(xs, lo, hi, color="#1f77b4", alpha=0.2, label="95% CI")
    if baseline is not None:
        ax.axhline(baseline, color="#7f7f7f", linestyle="--", linewidth=1, label="unsteered")
    for l in agg["band"]:
        ax.axvspan(l - 0.5, l + 0.5, color="#2ca02c", alpha=0.08)
    ax.set_xlabel(f"layer (of {agg['meta']['n_layers']}; band shaded)")
    ax.set_ylabel(ylabel)
    ax.legend(loc="upper left", fontsize=7)
    _gaze_bars(ax, agg)
    return _save(plt, fig, path)


def _silhouette_plot(agg: dict, path: Path) -> str | None:
    sil = agg.get("silhouette", {}).get("per_layer")
    if not sil or all(v is None for v in sil):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    xs = [l for l, v in enumerate(sil) if v is not None]
    ax.plot(xs, [sil[l] for l in xs], marker="o", color="#9467bd", label="silhouette (PCA 2-D, by queried panel)")
    ax.set_xlabel("layer")
    ax.set_ylabel("silhouette")
    ax.legend(loc="upper left", fontsize=7)
    _gaze_bars(ax, agg)
    return _save(plt, fig, path)


def _ordering_plot(agg: dict, path: Path) -> str | None:
    o = agg.get("orderings")
    if not o:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    others = [r["flip"]["mean"] for r in o["rows"] if r["kind"] == "order" and r["name"] != "reverse as an order"
              and r["flip"]]
    if others:
        ax.hist(others, bins=20, range=(0, 1), color="#7f7f7f", label=f"{len(others)} other orderings")
    if o["reverse"]:
        ax.axvline(o["reverse"]["mean"], color="#d62728", linewidth=2, label="reverse")
    control = next((r for r in o["rows"] if r["name"] == "reverse as an order"), None)
    if control and control["flip"]:
        ax.axvline(control["flip"]["mean"], color="#d62728", linestyle=":", linewidth=2, label="reverse as an order")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"flip rate at layer {o['layer']}")
    ax.set_ylabel("orderings")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def pct(x) -> str:
    if isinstance(x, dict):
        x = x.get("mean") if x else None
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def ci_pct(c) -> str:
    return "n/a" if not c else f"{100 * c['mean']:.1f}% [{100 * c['low']:.1f}, {100 * c['high']:.1f}] (n={c['n']})"


def ci_num(c) -> str:
    return "n/a" if not c else f"{c['mean']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}] (n={c['n']})"


def write_report(out: Path, agg: dict) -> Path:
    """report.md and the figures, from aggregate.json's content."""
    fig_dir = out / FIGURES
    fig_dir.mkdir(parents=True, exist_ok=True)
    figs = {
        "flip": _layer_plot(agg, "flip", "flip rate to the reverse answer", fig_dir / "flip_vs_layer.png"),
        "logit": _layer_plot(agg, "logit_diff", "logit(reverse) - logit(normal)", fig_dir / "logit_diff_vs_layer.png",
                             baseline=(agg.get("unsteered_logit_diff") or {}).get("mean")),
        "orderings": _ordering_plot(agg, fig_dir / "orderings_hist.png"),
        "silhouette": _silhouette_plot(agg, fig_dir / "silhouette_vs_layer.png"),
    }
    m = agg["meta"]
    n_layers = m["n_layers"]
    best = agg["best_layer"]
    band = agg["band"]
    lines = [f"# Where reading order lives: {m['model']}", "",
             f"The paper's residual-direction probe (section 4, appendix B) on `{m['model']}` ({n_layers} layers), "
             f"{m['n_strips']} strips from `{m['source']}`: directions built on {len(m['build_strips'])}, measured on "
             f"the other {len(m['eval_strips'])} (held out). Answers judged by exact letter match. alpha = {m['alpha']}, "
             f"added at {'every position' if m['positions'] == 'all' else 'the last prompt token and every generated token'}.",
             "", "Prompts:", "",
             f"- normal: `{m['prompts']['question']}`",
             f"- reverse: `{m['prompts']['reverse_prefix']}` + the normal question",
             f"- orderings: `{m['prompts']['order_prefix']}` + the normal question",
             f"- narration: `{m['prompts']['narration']}`", "",
             "## Beside the paper", "",
             f"| | paper ({PAPER['model']}) | this run |", "| --- | --- | --- |"]
    bf = agg["layers"].get(str(best), {}).get("flip")
    lines.append(f"| where the reverse direction flips answers | {PAPER['band']} | band {band[0]}-{band[-1]} of {n_layers} "
                 f"(relative depth {band[0] / max(1, n_layers - 1):.2f}-{band[-1] / max(1, n_layers - 1):.2f}; "
                 f"paper 0.57-0.80) |")
    lines.append(f"| best layer | {PAPER['peak']} | {pct(bf)} at layer {best} |")
    o = agg.get("orderings")
    if o:
        lines.append(f"| reverse vs other orderings | {PAPER['reverse']} | {pct(o['reverse'])} (reverse) vs a mean of "
                     f"{pct(o['others_mean'])} (max {pct(o['others_max'])}) for {o['n_others']} other orderings, at "
                     f"layer {o['layer']}; reverse ranks {o['reverse_rank']} of {o['n_others'] + 1} |")
    nr = agg.get("narration")
    if nr:
        lines.append(f"| narration order | {PAPER['narration_rho']} | Spearman {_mean(nr['base']['rho'])} -> "
                     f"{_mean(nr['steered']['rho'])} ({nr['n']} narrations, {_span(nr['layers'])}) |")
        lines.append(f"| narrations starting with the last panel | {PAPER['narration_last']} | "
                     f"{pct(nr['steered']['starts_last'])} steered, {pct(nr['base']['starts_last'])} unsteered |")
    sil = agg.get("silhouette")
    if sil:
        lines.append(f"| PCA silhouette by queried panel | {PAPER['silhouette']} | peaks at layer {sil['peak_layer']} |")
    g = agg.get("gaze_heads")
    if g:
        lines.append(f"| gaze heads | top heads in layers 20-28, the same band | top-{g['k']} gaze heads in layers "
                     f"{g['band'][0]}-{g['band'][1]} |")
    c = agg["competence"]
    lines += ["", "## Can the model do the task at all?", "",
              f"- normal prompt answered with the k-th panel's letter: {ci_pct(c['normal'])}",
              f"- reverse prompt answered with the k-th panel from the right: {ci_pct(c['reverse'])}", "",
              "A direction can only carry what the model computes: if the reverse prompt is not followed, the "
              "'reverse' direction is the difference the prefix makes, not a reading order.", "",
              "## Layer sweep", "", f"![flip rate vs layer]({FIGURES}/{figs['flip']})", "",
              f"![logit difference vs layer]({FIGURES}/{figs['logit']})", "",
              f"Unsteered logit difference (reverse letter minus normal letter): {ci_num(agg['unsteered_logit_diff'])}.",
              "", "| layer | flip rate to reverse [95% CI] | logit(reverse) - logit(normal) | answer changed | silhouette |",
              "| --- | --- | --- | --- | --- |"]
    for l in sorted(int(x) for x in agg["layers"]):
        e = agg["layers"][str(l)]
        s = "n/a" if e["silhouette"] is None else f"{e['silhouette']:.3f}"
        lines.append(f"| {l}{' *' if l in band else ''} | {ci_pct(e['flip'])} | {ci_num(e['logit_diff'])} | "
                     f"{pct(e['changed'])} | {s} |")
    lines += ["", "`*`: the band (contiguous layers around the best holding at least half its flip rate"
              + ("; no layer flips any answer here, so it is the layer of the largest logit difference)."
                 if not bf or not bf["mean"] else ")."), ""]
    if o:
        lines += ["## Orderings", "", f"![orderings]({FIGURES}/{figs['orderings']})", "",
                  "Each ordering's direction is mean(ordered prompt) - mean(normal prompt) at the answer position of "
                  f"layer {o['layer']}; flip rate over the questions whose answer it changes. `prompted`: how often the "
                  "ordered prompt itself is answered by the ordered panel's letter.", "",
                  "| ordering | flip rate | prompted | cosine with reverse | norm |", "| --- | --- | --- | --- | --- |"]
        shown = [r for r in o["rows"] if r["kind"] != "order" or r["name"] == "reverse as an order"]
        rest = sorted((r for r in o["rows"] if r not in shown), key=lambda r: -(r["flip"]["mean"] if r["flip"] else -1))
        for r in shown + rest[:10]:
            cos = "n/a" if r["cosine_with_reverse"] is None else f"{r['cosine_with_reverse']:+.2f}"
            lines.append(f"| {r['name']} | {ci_pct(r['flip'])} | {pct(r['prompted'])} | {cos} | {r['norm']:.3g} |")
        if len(rest) > 10:
            lines.append(f"| ... {len(rest) - 10} more in aggregate.json | | | | |")
        lines.append("")
    if nr:
        lines += ["## Narration", "",
                  f"Narration with each band layer's direction added ({_span(nr['layers'])}). Spearman of the order the "
                  "narration describes (segments matched to the strip's captions) against the reversed order: -1 is "
                  "left to right, +1 right to left.", "",
                  "| | Spearman vs reversed [95% CI] | starts with the last panel | narrations with >= 2 panels "
                  "identified | degenerate |", "| --- | --- | --- | --- | --- |"]
        for name in ("base", "steered"):
            e = nr[name]
            lines.append(f"| {'unsteered' if name == 'base' else 'steered'} | {ci_num(e['rho'])} | "
                         f"{ci_pct(e['starts_last'])} | {e['identified']} of {nr['n']} | {e['degenerate']} |")
        lines.append("")
    if figs["silhouette"]:
        lines += ["## Panel positions (PCA)", "", f"![silhouette vs layer]({FIGURES}/{figs['silhouette']})", "",
                  "Answer-position activations of the normal prompts of every strip, projected on their top two "
                  "principal components per layer; silhouette of the clusters by queried panel.", ""]
    path = out / REPORT
    tmp = path.with_name(REPORT + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def _mean(c) -> str:
    return "n/a" if not c else f"{c['mean']:+.2f}"


def _span(layers) -> str:
    return "none" if not layers else (f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}")


# ---------------------------------------------------------------- the run


def _plain_settings(cfg: ProbeConfig, prompts: Prompts) -> dict:
    """The settings that fix every item and are known before the model loads."""
    return {"model_id": cfg.model, "prompts": asdict(prompts), "alpha": cfg.alpha, "positions": cfg.positions,
            "answer_tokens": cfg.answer_tokens, "narration_tokens": cfg.narration_tokens}


def _settings(cfg: ProbeConfig, loaded, prompts: Prompts) -> dict:
    from gaze.discovery import weights_fingerprint

    return {**_plain_settings(cfg, prompts), "model_id": loaded.model_id, "weights": weights_fingerprint(loaded.model),
            "n_layers": loaded.n_layers, "dtype": str(loaded.model.dtype).replace("torch.", "")}


def _check_manifest(out: Path, settings: dict, write: bool = True) -> None:
    """Refuse a folder whose items were made with other settings (`write`: then record these)."""
    from gaze.discovery import manifest_diff, write_manifest

    items = out / "items"
    if items.exists() and any(items.rglob("*.*")):
        diff = manifest_diff(out / MANIFEST, settings)
        if diff:
            raise ProbeError(f"{out} holds a probe run with other settings {diff} (old, new): use another --out "
                             "folder, or delete this one to start over")
    if write:
        write_manifest(out / MANIFEST, settings)


def _layer_list(spec: tuple[int, ...] | None, n_layers: int, flag: str) -> list[int] | None:
    if spec is None:
        return None
    bad = [l for l in spec if not 0 <= l < n_layers]
    if bad:
        raise ProbeError(f"{flag}: layers {bad} are outside the model (layers 0..{n_layers - 1})")
    return sorted(set(spec))


def _gaze_layers(cfg: ProbeConfig, loaded) -> dict | None:
    if cfg.ranking is None:
        return None
    from gaze.ranking import Ranking

    ranking = Ranking.from_pretrained(cfg.ranking).check(loaded.model, None)
    k = cfg.top_k or ranking.default_k
    per_layer = [0] * loaded.n_layers
    for l, _ in ranking.top(k):
        per_layer[l] += 1
    return {"k": k, "per_layer": per_layer, "band": list(ranking.layer_band(k)), "ranking": cfg.ranking}


def load_strips_for(cfg: ProbeConfig, align: int | None):
    from gaze.eval.protocols import eval_strips

    strips = eval_strips(cfg.strips, cfg.n_strips, align=align, panel_size=cfg.panel_size)
    if len(strips) < 2:
        raise ProbeError(f"{cfg.strips} gave {len(strips)} strip(s): the probe needs at least 2")
    lacking = [s.strip_id for s in strips if s.letters is None]
    if lacking:
        raise ProbeError(f"strips {lacking[:5]} have no letter overlays: use datagen strips (procedural:eval) or "
                         "strips with letters in captions.json")
    if len({s.n_panels for s in strips}) != 1:
        raise ProbeError("the strips have different panel counts: give strips of one panel count")
    if len({l.upper() for l in strips[0].letters}) != strips[0].n_panels:
        raise ProbeError(f"strip {strips[0].strip_id}: the letters must be distinct, one per panel")
    return strips


def probe(cfg: ProbeConfig, *, loaded=None, progress: bool = True) -> dict:
    """Run (or resume) the reading-order probe into `cfg.out`; return the aggregate (also in OUT/aggregate.json)."""
    from safetensors.torch import save_file

    cfg = check_config(cfg)
    out = Path(cfg.out)
    prompts = prompts_for(cfg)
    _check_manifest(out, _plain_settings(cfg, prompts), write=False)  # before the model loads
    if loaded is None:
        from gaze.models import load

        loaded = load(cfg.model, device=cfg.device, dtype=cfg.dtype, device_map=cfg.device_map)
    gaze_layers = _gaze_layers(cfg, loaded)
    layers = _layer_list(cfg.layers, loaded.n_layers, "--layers") or list(range(loaded.n_layers))
    narration_layers = _layer_list(cfg.narration_layers, loaded.n_layers, "--narration-layers")
    if cfg.ordering_layer is not None:
        _layer_list((cfg.ordering_layer,), loaded.n_layers, "--ordering-layer")
    strips = load_strips_for(cfg, loaded.family.merged_patch(loaded.processor))
    _check_manifest(out, _settings(cfg, loaded, prompts))
    run = Run(cfg=cfg, loaded=loaded, prompts=prompts, out=out, strips=strips, build=strips[0::2], eval=strips[1::2],
              asker=Asker(loaded, cfg.answer_tokens), n_layers=loaded.n_layers, progress=progress)
    capture_pairs(run)
    directions = reverse_directions(run)  # [L, H]
    save_file({"reverse": directions.contiguous()}, str(out / (DIRECTIONS + ".tmp")),
              metadata={"build_strips": json.dumps([strip_key(s) for s in run.build]),
                        "what": "per layer: mean(reverse) - mean(normal) at the last prompt token, decoder layer output"})
    (out / (DIRECTIONS + ".tmp")).replace(out / DIRECTIONS)
    sweep = layer_sweep(run, directions, layers)
    sil = None if "pca" in cfg.skip else pca_silhouettes(run)
    agg = aggregate(run, layers, sweep, None, None, sil, gaze_layers)  # the band and best layer come from here
    ords = narr = None
    if "orderings" not in cfg.skip:
        layer = cfg.ordering_layer if cfg.ordering_layer is not None else agg["best_layer"]
        chosen = orderings(strips[0].n_panels, cfg.orderings, cfg.seed, cfg.extra_orderings)
        ords = ordering_sweep(run, directions, layer, chosen, sweep)
    if "narration" not in cfg.skip and cfg.narration_strips > 0:
        narr = narration(run, directions, narration_layers or agg["band"])
    agg = aggregate(run, layers, sweep, ords, narr, sil, gaze_layers)
    _write_json(out / AGGREGATE, agg)
    if not cfg.no_report:
        write_report(out, agg)
    return agg


def summary(agg: dict) -> str:
    lines = []
    c = agg["competence"]
    lines.append(f"task: normal {pct(c['normal'])}, reverse prompt {pct(c['reverse'])} answered right")
    best = agg["best_layer"]
    lines.append(f"layer sweep: best layer {best} flips {pct(agg['layers'][str(best)]['flip'])}; "
                 f"band {_span(agg['band'])} of {agg['meta']['n_layers']}")
    o = agg.get("orderings")
    if o:
        lines.append(f"orderings at layer {o['layer']}: reverse {pct(o['reverse'])} vs mean {pct(o['others_mean'])} "
                     f"of {o['n_others']} others")
    n = agg.get("narration")
    if n:
        lines.append(f"narration: Spearman vs reversed {_mean(n['base']['rho'])} -> {_mean(n['steered']['rho'])}, "
                     f"starts with the last panel {pct(n['base']['starts_last'])} -> {pct(n['steered']['starts_last'])}")
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def _layers_arg(text: str) -> tuple[int, ...]:
    """'20-28', '3,5,7' or '22' -> layer indices (range-checked once the model is loaded)."""
    out = []
    for part in (p for p in text.replace(" ", "").split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise argparse.ArgumentTypeError(f"{text!r}: give layers as 20-28, 3,5,7 or 22")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise argparse.ArgumentTypeError(f"{part!r}: a range goes low-high, e.g. 20-28")
        out += range(lo, hi + 1)
    return tuple(out)


def _order_arg(text: str) -> tuple[int, ...]:
    try:
        order = tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give an ordering of the panels, e.g. 4,2,6,1,3,5") from None
    if sorted(order) != list(range(1, len(order) + 1)):
        raise argparse.ArgumentTypeError(f"{text!r}: name each panel 1..N once, e.g. 4,2,6,1,3,5")
    return order


def _orderings_arg(text: str) -> int:
    if text == "all":
        return 720
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of orderings (0..720) or 'all'") from None
    if not 0 <= value <= 720:
        raise argparse.ArgumentTypeError(f"{value}: give 0..720 orderings (720 or 'all': every ordering)")
    return value




def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `probe reading-order` to a `gaze` argparse subparsers object."""
    from gaze.cli import HelpFormatter, _at_least, _number, device_arg

    d = ProbeConfig()
    probe_p = subparsers.add_parser("probe", help="probes of the residual stream (reading-order)")
    kinds = probe_p.add_subparsers(dest="probe", required=True)
    p = kinds.add_parser("reading-order", help="the paper's read-in-reverse residual direction, layer by layer",
                         description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default=d.model, help="hub id, local folder, or 'organism' (default)")
    p.add_argument("--strips", default=d.strips,
                   help="strips with letter overlays: procedural:eval (datagen, default), procedural:SEED0, folders or a dataset")
    p.add_argument("--out", required=True, help="output folder (resumable): items, aggregate.json, figures, report.md")
    p.add_argument("--n-strips", type=_at_least(2), default=d.n_strips,
                   help=f"strips (even-indexed build the directions, odd-indexed measure them; default {d.n_strips})")
    p.add_argument("--ranking", default=None, help="a ranking from `gaze discover`: its top gaze heads' layers in the figures")
    p.add_argument("--top-k", type=_at_least(1), default=None, help="gaze heads drawn from --ranking (default: the paper's share)")
    p.add_argument("--orderings", type=_orderings_arg, default=d.orderings,
                   help=f"panel orderings besides reverse: a seeded sample of N, or 'all' (720; default {d.orderings})")
    p.add_argument("--ordering", type=_order_arg, action="append", default=[], metavar="4,2,6,1,3,5",
                   help="an ordering to include in the sweep (repeatable; 1,2,3,4,5,6 is the zero-direction control)")
    p.add_argument("--ordering-layer", type=_at_least(0), default=None, help="layer of the ordering sweep (default: the best)")
    p.add_argument("--layers", type=_layers_arg, default=None, help="layers of the sweep, e.g. 16-30 (default: all)")
    p.add_argument("--narration-strips", type=_at_least(0), default=d.narration_strips,
                   help=f"held-out strips narrated with and without the direction (default {d.narration_strips})")
    p.add_argument("--narration-layers", type=_layers_arg, default=None, help="layers steered in narration (default: the band)")
    p.add_argument("--narration-tokens", type=_at_least(1), default=d.narration_tokens,
                   help="tokens generated per narration (with and without the direction)")
    p.add_argument("--answer-tokens", type=_at_least(1), default=d.answer_tokens, help="tokens per letter answer")
    p.add_argument("--alpha", type=_number(math.isfinite, "{text} is not a finite number"), default=d.alpha, help="scale of the added direction (paper: 1.0)")
    p.add_argument("--positions", default=d.positions, choices=POSITIONS,
                   help="where the direction is added: every position (default) or the answer (last prompt token "
                        "and every generated token)")
    p.add_argument("--question", default=None, help=f"letter question with {{ordinal}} (default: {QUESTION!r}, or the "
                                                     "model folder's prompts.json 'letter')")
    p.add_argument("--reverse-prefix", default=d.reverse_prefix, help="prepended to the question for the reverse prompt")
    p.add_argument("--order-prefix", default=d.order_prefix, help="prepended for an ordering, with {order}")
    p.add_argument("--narration-prompt", default=None, help=f"default: {NARRATION_PROMPT!r} (or prompts.json 'narration')")
    p.add_argument("--skip", type=lambda t: tuple(x for x in t.split(",") if x), default=(),
                   help=f"sections to skip: {','.join(SECTIONS)}")
    p.add_argument("--seed", type=int, default=d.seed, help="the ordering sample and the bootstrap")
    p.add_argument("--n-boot", type=_at_least(1), default=d.n_boot, help="bootstrap resamples")
    p.add_argument("--panel-size", type=_at_least(16), default=d.panel_size, help="procedural strips: panel side in px")
    p.add_argument("--device", default=None, type=device_arg, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=d.dtype, help="float32 | bfloat16 | float16")
    p.add_argument("--device-map", default=None, help="'auto' to spread a large model over all GPUs")
    p.add_argument("--no-report", action="store_true", help="aggregate.json only: no report.md, no figures")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> ProbeConfig:
    from gaze.models import resolve_dtype

    resolve_dtype(args.dtype)  # a bad dtype is refused before loading
    return check_config(ProbeConfig(
        model=args.model, strips=args.strips, out=args.out, n_strips=args.n_strips, orderings=args.orderings,
        extra_orderings=tuple(args.ordering),
        ordering_layer=args.ordering_layer, layers=args.layers, narration_strips=args.narration_strips,
        narration_layers=args.narration_layers, narration_tokens=args.narration_tokens,
        answer_tokens=args.answer_tokens, alpha=args.alpha, positions=args.positions, question=args.question,
        reverse_prefix=args.reverse_prefix, order_prefix=args.order_prefix, narration_prompt=args.narration_prompt,
        ranking=args.ranking, top_k=args.top_k, skip=tuple(args.skip), seed=args.seed, n_boot=args.n_boot,
        panel_size=args.panel_size, device=args.device, dtype=args.dtype, device_map=args.device_map,
        no_report=args.no_report))


def run(args: argparse.Namespace) -> int:
    """`gaze probe reading-order`."""
    cfg = config_from_args(args)  # every flag checked before the model loads
    try:
        agg = probe(cfg, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"gaze probe: interrupted: what was finished is kept in {cfg.out}; rerun the same command to resume",
              file=sys.stderr)
        return 130
    print(summary(agg))
    print(f"{'aggregate' if cfg.no_report else 'report'} written to {Path(cfg.out) / (AGGREGATE if cfg.no_report else REPORT)}")
    return 0
