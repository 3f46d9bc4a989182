"""Evaluation: the paper's protocols over many (strip, target) pairs, judged offline, resumable.

    cfg = EvalConfig(model="organism", ranking="gaze/organism/weights", strips="procedural:eval", n_strips=50,
                     out="reports/organism")
    aggregate = run_eval(cfg)                 # records.jsonl, aggregate.json, trajectories.json in cfg.out
    gaze.eval.report.write_report(cfg.out)    # README.md + figures/*.png

Protocols (each a function yielding one JSON record per generation):

    vqa        the whole-strip question, steered to each panel in turn            (paper: 83.1%)
    narration  the ambiguous "What is happening in this panel?", longer answers   (paper: 79.4%)
    dynamic    narration on a random derangement schedule switching every N
               tokens; per-segment accuracy and Spearman(schedule, described)    (paper: 0.87)
    region     steer to one object box of a multi-object scene, by size class
    sweep      vqa accuracy vs the number K of steered heads                      (paper: peak at K=100)

Conditions, i.e. which heads are steered (`head_sets`):

    gaze          the top-K heads of the ranking
    random        N seeded control draws of K heads (`gaze.eval.controls`: bottom-p,
                  layer-band or layer-matched), conditions random:0 .. random:N-1
    all           every head of the backbone
    image         MaskCD's "image heads": per-layer z-score of image-attention mass > 2.5
    localization  Kang et al.'s "localization heads": image-attention sum above the elbow,
                  then lowest spatial entropy (`gaze.eval.heads`)
    none          no steering: the chance level the model itself sets

Every record is keyed by (protocol, condition, strip, target, K) and appended to
`records.jsonl` as soon as it is judged: rerunning the same command skips what is
there. Each record carries the run's identity, its strip's content hash and its
own digest (`gaze.eval.records`): a line broken by an interruption, or one that
is stale, swapped or altered, is named and recomputed.
Aggregates carry seeded percentile-bootstrap 95% CIs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Container, Iterable, Iterator, Sequence

import numpy as np

from gaze.eval.config import (AGGREGATE, MANIFEST, PRIOR, PROTOCOL_ORDER, PROTOCOLS, RECORDS,
                              SIZE_CLASSES, SPLIT_SEEDS, TRAJECTORIES, EvalConfig, EvalError, resolve_preset)
from gaze.eval.controls import (ControlSpec, add_control_summaries, base_condition, control_manifest, control_meta,
                                draw_tags)
from gaze.eval.heads import PriorScores, condition_sets, overlap_table, prior_scores, resolve_top_k
from gaze.eval.image_judges import calibrate_for_run
from gaze.eval.judges import CaptionJudge, CandidateJudge, Judge, judge_for, public_url
from gaze.eval.records import RecordLog, record_key, run_identity
from gaze.eval.statistics import bootstrap_ci, spearman
from gaze.discovery import manifest_diff, write_manifest
from gaze.prompts import NARRATION_PROMPT
from gaze.ranking import Head, Ranking
from gaze.regions import RegionError, box_membership, one_row, region_mass
from gaze.steering import Box, Panel, Schedule
from gaze.strips import OFFICIAL_MULTIPLE, Strip, StripError, aligned_size, load_strips

def derangement(n: int, rng: random.Random) -> list[int]:
    """A random order of panels 1..n with no panel in its own place (so never left to right)."""
    if n < 2:
        raise EvalError("a derangement needs at least 2 panels")
    while True:
        order = list(range(1, n + 1))
        rng.shuffle(order)
        if all(p != i + 1 for i, p in enumerate(order)):
            return order


def size_class(n_tokens: int) -> str:
    """'small' (<= 2 image tokens), 'medium' (<= 8) or 'large'."""
    for name, upto in SIZE_CLASSES:
        if n_tokens <= upto:
            return name
    return SIZE_CLASSES[-1][0]


# ---------------------------------------------------------------- strips and scenes

def _procedural_seed0(spec: str, what: str) -> int:
    if spec in SPLIT_SEEDS:
        return SPLIT_SEEDS[spec]
    try:
        return int(spec.replace("_", ""))
    except ValueError:
        raise EvalError(f"bad {what} source procedural:{spec}: use procedural:eval, procedural:discovery "
                        "or procedural:SEED0 (an integer)") from None


PAPER_GAP = 6  # px of white between panels, as the paper assembles its strips


def paper_widths(height: int) -> tuple[int, int]:
    """The range panel widths are drawn from at a common panel height: 1 to 1.75 times it (not multiples
    of the token size), as the paper's strips keep each panel's aspect at one height."""
    return height, height * 7 // 4


def painted_seams(strip: Strip, gap: int = PAPER_GAP) -> Strip:
    """`strip` with `gap` px of white painted over each seam between its abutting panels (`strips.paint_seams`)."""
    from gaze.strips import paint_seams

    return dataclasses.replace(strip, image=paint_seams(strip.image, strip.panels, gap))


def eval_strips(source: str, n_strips: int, *, align: int | None = None, panel_size: int = 64,
                assembly: str = "paper") -> list[Strip]:
    """Strips from `source`: `procedural:SPLIT` (datagen strips, seeds SPLIT_SEEDS[SPLIT] + i) or any
    `load_strips` source (folders, datasets, an image). Procedural strips are assembled as the paper does
    (`assembly="paper"`: panels at the common height `panel_size`, widths drawn from 1 to 1.75 times it,
    6 px white gaps), as its official code does (`"official"`: height and widths rounded to multiples of
    32 px, panels abutting, 6 px of white painted over each seam), or as square panels snapped to the
    model's token grid (`"aligned"`). Other sources' separate panels (comic folders, paper-schema datasets)
    are stitched the official way under `"official"` (`gaze.strips.stitch_official` at `panel_size`), else
    on one cell size as `load_strips` does."""
    if source.startswith("procedural:"):
        from datagen import make_strip

        seed0 = _procedural_seed0(source.split(":", 1)[1], "strip")
        if assembly == "official":
            height = aligned_size(panel_size, OFFICIAL_MULTIPLE)
            return [painted_seams(make_strip(seed0 + i, panel_size=height, widths=paper_widths(height),
                                             width_multiple=OFFICIAL_MULTIPLE)) for i in range(n_strips)]
        if assembly == "paper":
            return [make_strip(seed0 + i, panel_size=panel_size, gap=PAPER_GAP, widths=paper_widths(panel_size))
                    for i in range(n_strips)]
        snap = align if align and panel_size % align == 0 else None
        return [make_strip(seed0 + i, panel_size=panel_size, align=snap) for i in range(n_strips)]
    stitch = dict(assembly="official", height=panel_size) if assembly == "official" else {}
    strips = list(load_strips(source, n_strips=n_strips, align=align, **stitch))
    if not strips:
        raise StripError(f"the strip source {source} gave no strips")
    return strips


def scene_strip(image, objects: Sequence[tuple[str, Sequence[float]]], scene_id: str, meta: dict | None = None) -> Strip:
    """A scene as a `Strip` whose panels are its object boxes and whose captions are their labels."""
    boxes = tuple(tuple(int(round(v)) for v in box) for _, box in objects)
    return Strip(image=image, panels=boxes, strip_id=scene_id, captions=tuple(label for label, _ in objects),
                 meta={"kind": "scene", **(meta or {})})


def eval_scenes(source: str, n: int, *, size: tuple[int, int] = (384, 192), n_objects: int = 4,
                strips: Sequence[Strip] = (), seed: int = 0) -> list[Strip]:
    """Scenes with labelled object boxes for region steering.

    - `procedural` / `procedural:SEED0`: datagen's multi-object scenes (seeds SEED0 + i, default the eval range);
    - `strip-objects`: the objects drawn in the eval strips (not the recurring character), one box per panel;
    - `coco:PATH`: `n` images of a COCO folder, sampled with `seed` (`gaze.eval.coco`, the paper's protocol);
    - a folder of `NAME.json` files {"image": "NAME.png", "objects": [{"label": ..., "box": [x0, y0, x1, y1]}]}.
    """
    if source.startswith("coco:"):
        from gaze.eval.coco import coco_scenes

        return coco_scenes(source.split(":", 1)[1], n, seed=seed)
    if source == "procedural" or source.startswith("procedural:"):
        from datagen import make_scene

        seed0 = _procedural_seed0(source.split(":", 1)[1], "scene") if ":" in source else SPLIT_SEEDS["eval"]
        out = []
        for i in range(n):
            image, objects = make_scene(seed0 + i, size=tuple(size), n_objects=n_objects)
            out.append(scene_strip(image, [(o["label"], o["box"]) for o in objects], f"scene-{seed0 + i}"))
        return out
    if source == "strip-objects":
        out = []
        for strip in strips[:n]:
            boxes = strip.meta.get("object_boxes")
            character = (strip.meta.get("story") or {}).get("character")
            if not boxes:
                raise EvalError(f"strip {strip.strip_id} has no object boxes: use procedural strips or --scenes procedural")
            objects = [(o["label"], o["box"]) for panel in boxes for o in panel if o["label"] != character]
            out.append(scene_strip(strip.image, objects, f"{strip.strip_id}-objects", {"from_strip": strip.strip_id}))
        return out
    folder = Path(source)
    if not folder.is_dir():
        raise EvalError(f"scene source {source} not found: use procedural, strip-objects, or a folder of NAME.json "
                        "(+ image) files")
    from gaze.strips import open_image

    out = []
    for spec in sorted(folder.glob("*.json"))[:n]:
        data = json.loads(spec.read_text())
        image = open_image(folder / data.get("image", spec.with_suffix(".png").name))
        out.append(scene_strip(image, [(o["label"], o["box"]) for o in data["objects"]], spec.stem))
    if not out:
        raise EvalError(f"{folder} holds no scene files (NAME.json with an image and labelled boxes)")
    return out


# ---------------------------------------------------------------- protocols

@dataclass
class Context:
    """What every protocol needs: the model, the judges, the settings, and a generation cache."""

    loaded: object  # gaze.models.Loaded
    cfg: EvalConfig
    judge: Judge  # for vqa, narration, sweep
    candidate_judge: CandidateJudge  # for dynamic segments and regions (captions or labels)
    track_heads: list[Head] = field(default_factory=list)  # heads whose attention dynamic records keep
    cache: dict = field(default_factory=dict)
    _mapped: dict = field(default_factory=dict)  # strip id -> panel boxes under `cfg.mapping`

    def panels_of(self, strip: Strip) -> tuple:
        """The boxes that stand for `strip`'s panels when they become image tokens: the panels themselves
        (mapping "centre"), or the boxes of the official code's column split (`regions.proportional_boxes`;
        one layout per strip, as the grid does not depend on the question)."""
        if self.cfg.mapping != "proportional":
            return strip.panels
        if strip.strip_id not in self._mapped:
            self._mapped[strip.strip_id] = mapped_panels(self.loaded, strip)
        return self._mapped[strip.strip_id]

    def ask(self, strip: Strip, question: str, heads: Sequence[Head], target=None, schedule: Schedule | None = None,
            max_new_tokens: int = 24, track: Sequence[Head] = ()):
        """One greedy generation. Untracked ones are cached for the run: the unsteered answer serves every
        target, and the sweep's K = top-K reuses the vqa generations."""
        from gaze.generation import generate

        if not heads:  # unsteered: the same answer for every target
            target = schedule = None
        key = (strip.strip_id, question, tuple(heads), repr(target), repr(schedule), max_new_tokens)
        if not track and key in self.cache:
            return self.cache[key]
        t0 = time.perf_counter()
        panels = self.panels_of(strip) if isinstance(target, Panel) or schedule is not None else strip.panels
        g = generate(self.loaded, strip.image, question, heads=list(heads), target=target,
                     schedule=schedule, panels=panels, strength=self.cfg.strength,
                     mode=self.cfg.mode, max_new_tokens=max_new_tokens, track=list(track) or False,
                     phase=self.cfg.dynamic_phase if schedule is not None else self.cfg.phase)
        if not track:
            self.cache[key] = (g, time.perf_counter() - t0)
        return g, time.perf_counter() - t0


def mapped_panels(loaded, strip: Strip) -> tuple:
    """`strip`'s panels as the official code's proportional column split of this model's token grid."""
    from gaze.generation import proportional_panels

    return proportional_panels(loaded, strip)


# ---------------------------------------------------------------- baseline-identical answers

def answer_words(text: str) -> list[str]:
    """The words the baseline-identical rule compares: lower case, a leading "Panel k:" dropped, anything but
    letters, digits and spaces made a space (as the official code normalises answers before comparing)."""
    text = re.sub(r"^panel\s*\d+\s*:\s*", "", text.strip().lower())
    return re.sub(r"[^a-z0-9 ]+", " ", text).split()


def jaccard(a: Iterable, b: Iterable) -> float | None:
    """|A & B| / |A | B| of the two sets; None when either is empty (an empty answer is never "identical")."""
    a, b = set(a), set(b)
    if not a or not b:
        return None
    return len(a & b) / len(a | b)


def answer_similarity(steered: str, baseline: str, unit: str = "word", tokenize=None) -> float | None:
    """Jaccard similarity of a steered and an unsteered answer over their words (`answer_words`) or, with
    `unit="token"`, over the ids `tokenize(text)` gives (the model's tokenizer)."""
    if unit == "word":
        return jaccard(answer_words(steered), answer_words(baseline))
    if tokenize is None:
        raise EvalError("--identical-tokens token needs the model's tokenizer")
    return jaccard(tokenize(steered.strip()), tokenize(baseline.strip()))


def identical_rule(record: dict, baseline: str | None, similarity: float | None, threshold: float) -> dict:
    """Record the baseline comparison; a steered answer at least `threshold` similar to the unsteered one is a
    miss (steering that changed nothing is no hit). The judge's own verdict stays in `judged_correct`."""
    record.setdefault("judged_correct", record["correct"])
    identical = baseline is not None and similarity is not None and similarity >= threshold
    record.update(baseline_answer=baseline, similarity=None if similarity is None else round(similarity, 4),
                  identical=bool(identical) if baseline is not None else None)
    if identical:
        record.update(correct=False, why=f"identical to the unsteered answer (Jaccard {similarity:.2f} >= "
                                         f"{threshold:g}); the judge said: {record.get('why', '')}")
    return record


def _tokenizer_of(ctx):  # text -> the model tokenizer's ids
    tok = ctx.loaded.processor.tokenizer
    return lambda text: tok(text, add_special_tokens=False)["input_ids"]


def _base(protocol: str, condition: str, strip: Strip, target, k: int, question: str, g, seconds: float) -> dict:
    return {"key": record_key(protocol, condition, strip.strip_id, target, k), "protocol": protocol,
            "condition": condition, "k": k, "strip_id": strip.strip_id, "target": target, "question": question,
            "answer": g.text, "n_tokens": len(g.token_ids), "degenerate": bool(g.degenerate),
            "seconds": round(seconds, 4)}


def _judged(record: dict, verdict, judge_name: str, degenerate: bool) -> dict:
    if degenerate:  # the generation itself looped or said nothing: a miss, whatever the text resembles
        record.update(matched=None, correct=False, why="degenerate generation", judge=judge_name)
    else:
        record.update(matched=verdict.matched_panel, correct=bool(verdict.correct), why=verdict.why, judge=judge_name)
    # each judge's verdict (raw reply included) beside the answer, so that `image_judges.rejudge` can add others
    stored = verdict.to_record() if not degenerate else {"matched": None, "correct": False, "why": record["why"]}
    record["verdicts"] = {**record.get("verdicts", {}), judge_name: stored}
    return record


def panel_protocol(ctx: Context, protocol: str, strips: Sequence[Strip], condition: str, heads: Sequence[Head], k: int,
                   *, done: Container[str] = (), max_new_tokens: int | None = None) -> Iterator[dict]:
    """vqa / narration / sweep: one question per strip, steered to each target panel in turn."""
    question = ctx.cfg.question(protocol)
    budget = max_new_tokens or (ctx.cfg.narration_tokens if protocol == "narration" else ctx.cfg.max_new_tokens)
    for strip in strips:
        for target in ctx.cfg.targets or range(1, strip.n_panels + 1):
            if target > strip.n_panels:
                continue
            if record_key(protocol, condition, strip.strip_id, target, k) in done:
                continue
            g, seconds = ctx.ask(strip, question, heads, Panel(target), max_new_tokens=budget)
            verdict = ctx.judge.judge(g.text, strip, target)
            rec = _judged(_base(protocol, condition, strip, target, k, question, g, seconds), verdict,
                          ctx.judge.name, g.degenerate)
            yield _against_baseline(ctx, rec, strip, question, heads, target, budget, g.text)


def _against_baseline(ctx: Context, rec: dict, strip: Strip, question: str, heads, target: int, budget: int,
                      text: str) -> dict:
    """A steered record compared with the unsteered answer to the same (strip, question) (cached: one
    generation per strip); unsteered records get `identical: None`."""
    cfg = ctx.cfg
    if not heads:
        return identical_rule(rec, None, None, cfg.identical_threshold)
    base, _ = ctx.ask(strip, question, [], Panel(target), max_new_tokens=budget)
    tokenize = _tokenizer_of(ctx) if cfg.identical_tokens == "token" else None
    sim = answer_similarity(text, base.text, cfg.identical_tokens, tokenize)
    return identical_rule(rec, base.text, sim, cfg.identical_threshold)


def vqa(ctx: Context, strips, condition, heads, k, *, done=()) -> Iterator[dict]:
    """The whole-strip question, steered to each panel (the paper's 83.1% protocol)."""
    return panel_protocol(ctx, "vqa", strips, condition, heads, k, done=done)


def static_narration(ctx: Context, strips, condition, heads, k, *, done=()) -> Iterator[dict]:
    """The ambiguous "this panel" question with longer answers, steered to each panel (the paper's 79.4%)."""
    return panel_protocol(ctx, "narration", strips, condition, heads, k, done=done)


def head_count_sweep(ctx: Context, strips, condition, heads, k, *, done=()) -> Iterator[dict]:
    """The vqa protocol at one K; call it for every K (records are keyed by K)."""
    return panel_protocol(ctx, "sweep", strips, condition, heads, k, done=done)


def segments(pieces: Sequence[str], targets: Sequence[int] | None, n_targets: int, every: int) -> list[str]:
    """The text produced under each schedule entry (an entry with no tokens gives '')."""
    index = list(targets) if targets is not None else [min(i // every, n_targets - 1) for i in range(len(pieces))]
    out = [""] * n_targets
    for piece, t in zip(pieces, index):
        out[t] += piece
    return out


def dynamic_narration(ctx: Context, strips, condition, heads, k, *, done=()) -> Iterator[dict]:
    """Narration steered along a random derangement of the panels, switching every `every` tokens.

    Each segment (the tokens generated under one schedule entry) is judged against
    its scheduled panel; Spearman correlates the scheduled panels with the judged
    ones (segments the judge cannot place are left out of the correlation).
    """
    from gaze.generation import regions_for

    cfg = ctx.cfg
    question = cfg.question("dynamic")
    for strip in strips:
        order = derangement(strip.n_panels, random.Random(f"{cfg.seed}/derangement/{strip.strip_id}"))
        target = ",".join(map(str, order))
        if record_key("dynamic", condition, strip.strip_id, target, k) in done:
            continue
        schedule = Schedule(tuple(Panel(p) for p in order), every=cfg.every, at_sentence=cfg.at_sentence)
        budget = cfg.every * len(order) * (2 if cfg.at_sentence else 1)  # sentence ends come after `every` tokens
        g, seconds = ctx.ask(strip, question, heads, schedule=schedule, max_new_tokens=budget, track=ctx.track_heads)
        texts = segments(g.pieces, g.targets, len(order), cfg.every)
        segs = []
        for panel, text in zip(order, texts):
            v = ctx.candidate_judge.judge(text, strip, panel)
            segs.append({"panel": panel, "text": text, "matched": v.matched_panel, "correct": bool(v.correct),
                         "why": v.why})
        if g.degenerate:
            for s in segs:
                s.update(matched=None, correct=False, why="degenerate generation")
        pairs = [(s["panel"], s["matched"]) for s in segs if s["matched"] is not None]
        rho = spearman(*zip(*pairs)) if len(pairs) >= 2 else None
        rec = _base("dynamic", condition, strip, target, k, question, g, seconds)
        rec.update(schedule=order, every=cfg.every, segments=segs, judge=ctx.candidate_judge.name,
                   segment_accuracy=sum(s["correct"] for s in segs) / len(segs),
                   described=[s["matched"] for s in segs], spearman=rho,
                   correct=sum(s["correct"] for s in segs) / len(segs) > 0.5, matched=None,
                   why=f"{sum(s['correct'] for s in segs)}/{len(segs)} segments on schedule")
        if g.tracker is not None:
            regions = regions_for(g.layout, strip.panels, mapping=cfg.mapping)
            traj = g.trajectory(regions, normalise=True)  # [tokens, R]
            rec["trajectory"] = [[round(float(v), 3) for v in row] for row in traj]
            rec["tracked"] = [list(h) for h in ctx.track_heads]
        yield rec


def region_steering(ctx: Context, scenes: Sequence[Strip], condition, heads, k, *, done=()) -> Iterator[dict]:
    """Steer to each object box of each scene; the answer must name that object and no other."""
    from gaze.eval.coco import region_judge

    question = ctx.cfg.question("region")
    for scene in scenes:
        judge = region_judge(scene, ctx.candidate_judge)  # COCO scenes: does the answer name the category?
        sizes = scene.meta.get("size_classes")  # COCO scenes: COCO's classes by box area, else by image tokens
        for i, (label, box) in enumerate(zip(scene.captions, scene.panels), start=1):
            target = f"{i}:{label}"
            if record_key("region", condition, scene.strip_id, target, k) in done:
                continue
            rec = {"key": record_key("region", condition, scene.strip_id, target, k), "protocol": "region",
                   "condition": condition, "k": k, "strip_id": scene.strip_id, "target": target, "label": label,
                   "box": list(box), "n_objects": scene.n_panels, "question": question, "judge": judge.name}
            try:
                g, seconds = ctx.ask(scene, question, heads, Box(tuple(float(v) for v in box)),
                                     max_new_tokens=ctx.cfg.max_new_tokens)
                n_tokens = int(box_membership(g.layout, box).sum())
            except RegionError as e:  # a box too small to own an image token cannot be steered to
                rec.update(skipped=str(e), size_class=sizes[i - 1] if sizes else "none", box_tokens=0, correct=None,
                           matched=None, why=str(e),
                           answer="", degenerate=False)
                yield rec
                continue
            verdict = judge.judge(g.text, scene, i)
            rec.update(answer=g.text, n_tokens=len(g.token_ids), degenerate=bool(g.degenerate),
                       seconds=round(seconds, 4), box_tokens=n_tokens,
                       size_class=sizes[i - 1] if sizes else size_class(n_tokens))
            yield _judged(rec, verdict, judge.name, g.degenerate)


# ---------------------------------------------------------------- aggregation

def _rate(records: list[dict], field_: str, n_boot: int, seed: int) -> dict:
    values = [float(r[field_]) for r in records]
    mean, lo, hi = bootstrap_ci(values, n_boot, seed)
    return {"n": len(values), "accuracy": mean, "ci": [lo, hi]}


def _panel_summary(records: list[dict], n_boot: int, seed: int) -> dict:
    out = _rate(records, "correct", n_boot, seed)
    out.update(_identical_summary(records, n_boot, seed))
    out["degenerate"] = float(np.mean([r["degenerate"] for r in records])) if records else math.nan
    out["unmatched"] = float(np.mean([r["matched"] is None for r in records])) if records else math.nan
    by_panel: dict[str, list[dict]] = {}
    for r in records:
        by_panel.setdefault(str(r["target"]), []).append(r)
    out["per_panel"] = {p: _rate(rs, "correct", n_boot, seed) for p, rs in sorted(by_panel.items(), key=lambda x: int(x[0]))}
    # where the answers went: share of answers matched to each panel (None = unmatched)
    matched: dict[str, int] = {}
    for r in records:
        matched[str(r["matched"])] = matched.get(str(r["matched"]), 0) + 1
    out["matched_share"] = {m: c / len(records) for m, c in sorted(matched.items())}
    return out


def _identical_summary(records: list[dict], n_boot: int, seed: int) -> dict:
    """The share of steered answers identical to the unsteered one (None where none was compared), and the
    accuracy the judge alone gave (before the rule)."""
    compared = [r for r in records if r.get("identical") is not None]
    judged = [{"c": r.get("judged_correct", r["correct"])} for r in records]
    raw = _rate(judged, "c", n_boot, seed)
    return {"identical": float(np.mean([r["identical"] for r in compared])) if compared else None,
            "judged_accuracy": raw["accuracy"], "judged_ci": raw["ci"]}


def aggregate(records: Iterable[dict], *, n_boot: int = 2000, seed: int = 0, meta: dict | None = None) -> dict:
    """Records -> accuracies with bootstrap 95% CIs per protocol, condition (and K, panel, size class).

    Records are sorted by key first, so the result does not depend on the order they were written in.
    """
    recs = sorted(records, key=lambda r: r["key"])
    groups: dict[tuple, list[dict]] = {}
    for r in recs:
        groups.setdefault((r["protocol"], base_condition(r["condition"])), []).append(r)  # draws pool
    out: dict = {}
    for (protocol, condition), rs in sorted(groups.items()):
        p = out.setdefault(protocol, {})
        if protocol in ("vqa", "narration"):
            p[condition] = {"k": rs[0]["k"], **_panel_summary(rs, n_boot, seed)}
        elif protocol == "sweep":
            by_k: dict[int, list[dict]] = {}
            for r in rs:
                by_k.setdefault(int(r["k"]), []).append(r)
            p[condition] = {str(k): _panel_summary(v, n_boot, seed) for k, v in sorted(by_k.items())}
        elif protocol == "dynamic":
            seg = _rate(rs, "segment_accuracy", n_boot, seed)
            rhos = [r["spearman"] for r in rs if r["spearman"] is not None]
            mean, lo, hi = bootstrap_ci(rhos, n_boot, seed)
            p[condition] = {"k": rs[0]["k"], "n": len(rs), "segment_accuracy": seg["accuracy"], "ci": seg["ci"],
                            "spearman": {"mean": mean, "ci": [lo, hi], "n_defined": len(rhos)},
                            "degenerate": float(np.mean([r["degenerate"] for r in rs]))}
        elif protocol == "region":
            judged = [r for r in rs if r.get("correct") is not None]
            summary = _rate(judged, "correct", n_boot, seed)
            summary.update(k=rs[0]["k"], skipped=len(rs) - len(judged),
                           unmatched=float(np.mean([r["matched"] is None for r in judged])) if judged else math.nan,
                           chance=float(np.mean([1 / r["n_objects"] for r in judged])) if judged else math.nan,
                           degenerate=float(np.mean([r["degenerate"] for r in judged])) if judged else math.nan)
            by_size: dict[str, list[dict]] = {}
            for r in judged:
                by_size.setdefault(r["size_class"], []).append(r)
            summary["per_size"] = {s: _rate(by_size[s], "correct", n_boot, seed) for s, _ in SIZE_CLASSES if s in by_size}
            p[condition] = summary
        elif protocol in ("strength", "paraphrase"):  # gaze.eval.sweeps: {B or wording: rate}
            from gaze.eval.sweeps import summarise

            p[condition] = summarise(protocol, rs, n_boot, seed)
    add_control_summaries(out, recs, n_boot, seed)  # random: mean, spread and p-value over draws; gaze - control
    return {"meta": meta or {}, "protocols": out, "n_records": len(recs)}


# ---------------------------------------------------------------- the run

def _manifest(cfg: EvalConfig, loaded, ranking: Ranking, k: int) -> dict:
    """What fixes the records' content: a rerun with other values must not mix into the same file."""
    digest = hashlib.sha1(np.asarray(ranking.scores, dtype=np.float32).tobytes()).hexdigest()[:12]
    keep = ("strips", "every", "at_sentence", "seed", "judge", "judge_model", "max_new_tokens", "narration_tokens",
            "strength", "mode", "phase", "random_percentile", "prior_strips", "scenes", "n_objects", "scene_size",
            "panel_size", "preset", "dynamic_phase", "assembly", "mapping", "identical_threshold", "identical_tokens")
    m = {name: getattr(cfg, name) for name in keep}
    m["scene_size"] = list(cfg.scene_size)
    m.update(model_id=loaded.model_id, ranking_digest=digest, top_k=k,
             questions={p: cfg.question(p) for p in PROTOCOLS if p not in ("strength", "paraphrase")},  # those
             dtype=cfg.dtype)  # ask the vqa question, or name their wording in their records' keys
    m.update(control_manifest(cfg))
    # which hosted judge answered (its API and endpoint, without credentials or query): another is another run
    m.update(judge_api=cfg.judge_api, judge_endpoint=public_url(cfg.judge_endpoint) if cfg.judge_endpoint else None)
    return m


def _check_manifest(out: Path, manifest: dict) -> None:
    path = out / MANIFEST
    if path.exists():
        old = json.loads(path.read_text())  # runs from before `phase` recorded `prefill_only`, or (older) nothing
        legacy = {"phase": "prefill" if old.get("prefill_only") else "all"}  # manifests from before the presets:
        phase = old.get("phase", legacy["phase"])
        legacy.update(preset="organism", dynamic_phase="all" if phase == "prefill" else phase,
                      assembly="paper", mapping="centre", identical_threshold=None, identical_tokens=None,
                      judge_api="openai", judge_endpoint=None)
        diff = manifest_diff(path, manifest, defaults=legacy)
        if diff:
            raise EvalError(f"{out} holds an evaluation with other settings {diff} (old, new): use another --out, "
                            f"or delete {out / RECORDS} and {path} to start over")
    else:
        write_manifest(path, manifest)


def check_targets(targets: Sequence[int] | None, n_panels: int) -> None:
    """Refuse `--targets` beyond the strips' panels (a target no strip has would give no records)."""
    bad = [t for t in targets or () if not 1 <= t <= n_panels]
    if bad:
        raise EvalError(f"--targets {','.join(map(str, bad))}: the strips have {n_panels} panels, so give targets "
                        f"1..{n_panels}")


def _check_strips(cfg: EvalConfig, strips: Sequence[Strip]) -> None:
    """Fail before generating anything when the strips lack what the judges compare against."""
    check_targets(cfg.targets, max(s.n_panels for s in strips))
    several = next((s for s in strips if not one_row(s.panels)), None) if cfg.mapping == "proportional" else None
    if several is not None:
        raise EvalError(f"strip {several.strip_id} has its panels in several rows, which the proportional mapping "
                        "(the official code's, one row only) cannot split: use --mapping centre")
    panel = {"vqa", "narration", "sweep", "strength", "paraphrase"} & set(cfg.protocols)
    letters = cfg.judge == "letter"
    for s in strips:
        if panel and letters and s.letters is None:
            raise EvalError(f"strip {s.strip_id} has no letters for --judge letter: use letter-overlaid strips "
                            "(procedural:eval) or --judge caption")
        if ((panel and not letters) or "dynamic" in cfg.protocols) and s.captions is None:
            raise EvalError(f"strip {s.strip_id} has no captions to judge answers against: use captioned strips "
                            "(procedural:eval, or captions.json beside p1..p6), or --judge letter with --protocols vqa")


def _get_ranking(cfg: EvalConfig, loaded, out: Path, align: int | None, progress: bool) -> Ranking:
    from gaze.discovery import discover

    strips = eval_strips(cfg.discovery_strips, cfg.n_discovery, align=align, panel_size=cfg.panel_size,
                         assembly=cfg.assembly)
    if cfg.mapping == "proportional":  # discovery reads the panels as steering will target them
        strips = [dataclasses.replace(s, panels=mapped_panels(loaded, s)) for s in strips]
    if cfg.discovery_strips == cfg.strips:
        print("warning: discovering on the evaluation strips themselves; pass --discovery-strips to keep them apart",
              file=sys.stderr)
    return discover(loaded, strips, out / "discovery", template=loaded.prompts.discovery, source=cfg.discovery_strips,
                    n_strips=len(strips), progress=progress)


def _prior(cfg: EvalConfig, loaded, strips: Sequence[Strip], out: Path) -> PriorScores:
    path = out / PRIOR
    if path.exists():
        return PriorScores.from_dict(json.loads(path.read_text()))
    prior = prior_scores(loaded, strips[: cfg.prior_strips])
    path.write_text(json.dumps(prior.to_dict()))
    return prior


def _trajectories(ctx: Context, strip: Strip, sets: dict[str, list[Head]]) -> dict:
    """Free (unsteered) narration of one strip, with each head set's attention over the panels per token."""
    from gaze.generation import regions_for

    names = [n for n, hs in sets.items() if hs]
    tracked = sorted({h for n in names for h in sets[n]})  # one tracker, each head once
    g, _ = ctx.ask(strip, NARRATION_PROMPT, [], max_new_tokens=ctx.cfg.narration_tokens, track=tracked)
    regions = regions_for(g.layout, strip.panels, mapping=ctx.cfg.mapping)
    att = g.tracker.attention()[: len(g.token_ids)]  # [tokens, heads, T]
    out = {}
    for n in names:
        part = att[:, [tracked.index(h) for h in sets[n]]]  # [tokens, h, T]
        traj = region_mass(part, regions).mean(1)  # [tokens, R]
        out[n] = {"heads": [list(h) for h in sets[n]], "trajectory": [[round(float(v), 4) for v in row] for row in traj]}
    return {"strip_id": strip.strip_id, "question": NARRATION_PROMPT, "text": g.text, "pieces": g.pieces,
            "captions": list(strip.captions or []), "sets": out}


def with_model_prompts(cfg: EvalConfig, prompts) -> EvalConfig:
    """`cfg` asking the model its own questions (`Loaded.prompts`: the organism's prompts.json, else the
    paper's) for the caption protocols; `--question` overrides still win, letter judges keep theirs."""
    from dataclasses import replace

    if cfg.judge == "letter":
        return cfg
    own = {"vqa": prompts.vqa, "sweep": prompts.vqa, "narration": prompts.static_narration,
           "dynamic": prompts.narration, "region": prompts.static_narration}
    if cfg.scenes.startswith("coco:"):  # the paper's COCO question (`EvalConfig.question`), not a panel one
        own.pop("region")
    given = dict(cfg.questions)
    return replace(cfg, questions=tuple({**own, **given}.items()))


def run_eval(cfg: EvalConfig, *, loaded=None, ranking: Ranking | None = None, limit: int | None = None,
             progress: bool = True) -> dict:
    """Run (or resume) an evaluation into `cfg.out`; return the aggregate (also saved as aggregate.json).

    `limit` stops after that many NEW records (the aggregate then says complete: false);
    rerunning continues where it stopped.
    """
    from tqdm.auto import tqdm

    from gaze.models import load

    cfg = resolve_preset(cfg)
    out = Path(cfg.out)
    if ranking is None and cfg.ranking is not None:  # read and checked against the model id before it loads
        ranking = Ranking.from_pretrained(cfg.ranking).check(None, cfg.model)
    out.mkdir(parents=True, exist_ok=True)
    loaded = loaded or load(cfg.model, device=cfg.device, dtype=cfg.dtype, device_map=cfg.device_map)
    if cfg.preset == "organism":  # the paper preset asks the paper's questions, whatever the folder records
        cfg = with_model_prompts(cfg, loaded.prompts)
    align = loaded.family.merged_patch(loaded.processor)
    ranking = ranking or _get_ranking(cfg, loaded, out, align, progress)
    ranking.check(loaded.model, loaded.model_id)
    n_total = ranking.scores.numel()
    k = resolve_top_k(cfg.top_k, n_total)
    manifest = _manifest(cfg, loaded, ranking, k)
    _check_manifest(out, manifest)
    ranking.save(out / "ranking.json")

    strips = eval_strips(cfg.strips, cfg.n_strips, align=align, panel_size=cfg.panel_size, assembly=cfg.assembly)
    _check_strips(cfg, strips)
    kinds = [c for c in cfg.conditions]
    prior = _prior(cfg, loaded, strips, out) if {"image", "localization"} & set(kinds) else None
    control = ControlSpec.from_config(cfg)
    sets = condition_sets(ranking, k, cfg.seed, kinds, control, prior=prior)  # random -> random:0 .. random:N-1
    judge = judge_for(cfg, str(loaded.model.device))
    calibration = calibrate_for_run(cfg, judge, strips, out, loaded=loaded)  # image judges: refused if below the gate
    candidate = judge if isinstance(judge, CandidateJudge) else CaptionJudge()
    ctx = Context(loaded, cfg, judge, candidate, track_heads=sets.get("gaze") or ranking.top(k))
    scenes = (eval_scenes(cfg.scenes, cfg.n_scenes or cfg.n_strips, size=cfg.scene_size, n_objects=cfg.n_objects,
                          strips=strips, seed=cfg.seed) if "region" in cfg.protocols else [])
    log = RecordLog(out / RECORDS, identity=run_identity(manifest))
    strip_hashes = {s.strip_id: s.content_hash() for s in [*strips, *scenes]}
    log.drop_stale(strip_hashes)
    for line in log.report():
        print(line, file=sys.stderr)

    def jobs(done: Container[str]) -> Iterator[Iterator[dict]]:
        for protocol in sorted(cfg.protocols, key=PROTOCOL_ORDER.index):
            if protocol in ("vqa", "narration", "dynamic"):
                fn = {"vqa": vqa, "narration": static_narration, "dynamic": dynamic_narration}[protocol]
                for c in sets:
                    yield fn(ctx, strips, c, sets[c], len(sets[c]), done=done)
            elif protocol == "region":
                for c in sets:
                    yield region_steering(ctx, scenes, c, sets[c], len(sets[c]), done=done)
            elif protocol == "sweep":
                for kk in sorted({min(x, n_total) for x in cfg.ks}):
                    swept = condition_sets(ranking, kk, cfg.seed, [c for c in ("gaze", "random") if c in kinds] or
                                           ["gaze"], dataclasses.replace(control, draws=1), warn=False)
                    for c, hs in swept.items():
                        yield head_count_sweep(ctx, strips, c, hs, kk, done=done)
            elif protocol in ("strength", "paraphrase"):  # gaze.eval.sweeps
                from gaze.eval.sweeps import sweep_jobs

                yield from sweep_jobs(protocol, ctx, strips, sets, ranking, k, done)

    planned = _Planned()  # the protocols ask about every key they would generate, before generating it
    for job in jobs(planned):
        for _ in job:
            pass
    todo = sum(key not in log for key in planned.keys)
    t0 = time.time()
    new = 0
    bar = tqdm(desc="eval", unit="gen", total=todo if limit is None else min(todo, limit), disable=not progress,
               file=sys.stderr)
    stopped = False
    for job in jobs(log):
        for rec in job:
            log.append({**rec, **draw_tags(rec["condition"], control), "strip_hash": strip_hashes[rec["strip_id"]]})
            new += 1
            bar.update(1)
            if limit is not None and new >= limit:
                stopped = True
                break
        if stopped:
            break
    bar.close()
    if not stopped and "paraphrase" in cfg.protocols:  # discovery under other wordings: do the top sets agree?
        from gaze.eval.sweeps import paraphrase_discovery

        paraphrase_discovery(loaded, cfg, out, k, progress=progress)
    if not stopped and not (out / TRAJECTORIES).exists():
        show = {n: sets.get(n, sets.get(f"{n}:0")) for n in ("gaze", "random", "image", "localization")
                if n in sets or f"{n}:0" in sets}
        show = show or {"gaze": ranking.top(k)}
        (out / TRAJECTORIES).write_text(json.dumps(_trajectories(ctx, strips[0], show)))
    meta = {
        "model_id": loaded.model_id, "n_layers": loaded.n_layers, "n_heads": loaded.n_heads, "n_total_heads": n_total,
        "top_k": k, "strips": cfg.strips, "n_strips": len(strips), "scenes": cfg.scenes, "judge": cfg.judge,
        "seed": cfg.seed, "every": cfg.every, "at_sentence": cfg.at_sentence, "strength": cfg.strength, "mode": cfg.mode,
        "phase": cfg.phase, "dynamic_phase": cfg.dynamic_phase, "preset": cfg.preset, "mapping": cfg.mapping,
        "assembly": cfg.assembly, "panel_size": cfg.panel_size,
        "identical": {"threshold": cfg.identical_threshold, "tokens": cfg.identical_tokens},
        "random_percentile": cfg.random_percentile,
        "control": control_meta(ranking, k, control), "overlap": overlap_table(ranking, prior) if prior else None,
        "questions": {p: cfg.question(p) for p in cfg.protocols}, "protocols": list(cfg.protocols),
        "conditions": list(kinds), "heads": {c: [list(h) for h in hs] for c, hs in sets.items() if c != "all"},
        "chance": 1 / strips[0].n_panels, "ranking_strips": ranking.n_strips,
        "ranking_source": ranking.meta.get("source", ""),
        "judge_name": judge.name, "judge_calibration": calibration.to_dict() if calibration else None,
        "complete": not stopped, "size_classes": {n: (None if math.isinf(u) else u) for n, u in SIZE_CLASSES},
        "config": {**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)},  # no credentials on disk
                   "judge_endpoint": public_url(cfg.judge_endpoint) if cfg.judge_endpoint else None},
    }
    agg = aggregate(log.records.values(), n_boot=cfg.n_boot, seed=cfg.seed, meta=meta)
    agg["cost"] = {"generation_seconds": round(sum(r.get("seconds", 0.0) for r in log.records.values()), 1),
                   "this_run_seconds": round(time.time() - t0, 1), "new_records": new}
    tmp = out / (AGGREGATE + ".tmp")
    agg = _finite(agg)
    tmp.write_text(json.dumps(agg, indent=1, default=_json_default))
    tmp.replace(out / AGGREGATE)
    return agg


class _Planned:
    """A `done` set that holds every key and remembers which were asked: the protocols' loops, run with it,
    list the run's keys without generating anything (the progress bar's total)."""

    def __init__(self):
        self.keys: list[str] = []

    def __contains__(self, key: str) -> bool:
        self.keys.append(key)
        return True


def _finite(o):
    """NaN / inf -> None, so the aggregate is strict JSON."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o):
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)
