"""The evaluation report: aggregate.json -> README.md with small PNG figures, beside the paper's numbers.

    write_report("reports/organism")   # reads aggregate.json, ranking.json, trajectories.json, records.jsonl

Figures (in OUT/figures/): the top heads' R x R matrices, the layer x head
score map, accuracy per condition, accuracy vs K, free-narration trajectory
staircases (gaze heads vs random heads) and a dynamic-schedule plot. The
markdown puts our numbers next to the published ones (the paper's figures
below, as summarised in the project's DESIGN.md section 2) and says how every
answer was judged.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import numpy as np

from gaze.eval.config import AGGREGATE, RECORDS, TRAJECTORIES, EvalError

FIGURES = "figures"
DPI = 80  # small PNGs: the report is committed

# The paper's figures (Qwen3-VL-8B, 36 x 32 = 1,152 heads, hosted LLM judge; DESIGN.md section 2).
PAPER = {
    "vqa": "83.1% (top-100 gaze heads, 3,000 strip-target pairs; chance 16.7%)",
    "narration": "79.4%",
    "random": "about chance (K heads from the bottom 5% of scores)",
    "all": "generation destroyed",
    "sweep": "36% at K=5, peak at K=100, falls after",
    "dynamic": "Spearman 0.87 (random heads slightly negative)",
    "prior": "above chance, below gaze heads",
    "region": "works on object boxes; weak on small boxes (too few tokens)",
    "none": "chance 16.7% (one panel of six)",
}
CONDITION_NAMES = {"gaze": "top-K gaze heads", "random": "K random low-score heads", "all": "all heads",
                   "image": "K image heads (prior work)", "localization": "K localization heads (prior work)",
                   "none": "no steering"}
COLOURS = {"gaze": "#1f77b4", "random": "#7f7f7f", "all": "#d62728", "image": "#2ca02c", "localization": "#9467bd",
           "none": "#bcbd22"}


PHASE_WORDS = {  # how a run's steering phase reads in the report (older runs recorded `prefill_only`)
    "all": " at every row (prompt and answer)",
    "prefill": " at the prompt's rows only (static targets; schedules steer every row)",
    "decode": " at the answer's rows only (the prompt read unsteered)",
}

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return path.name


def pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def ci(c) -> str:
    if not c or c[0] is None:
        return ""
    return f" [{100 * c[0]:.1f}, {100 * c[1]:.1f}]"


def num(x, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _acc(entry: dict | None) -> str:
    if not entry or not entry.get("n"):
        return "not run"
    return f"{pct(entry['accuracy'])}{ci(entry.get('ci'))} (n={entry['n']})"


# ---------------------------------------------------------------- figures

def plot_accuracy(protocols: dict, chance: float, path: Path) -> str | None:
    """Accuracy per condition with 95% CIs, for vqa and narration side by side."""
    names = [p for p in ("vqa", "narration") if p in protocols]
    if not names:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 2.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        conds = [c for c in CONDITION_NAMES if c in protocols[name]]
        acc = [protocols[name][c]["accuracy"] or 0 for c in conds]
        lo = [a - (protocols[name][c]["ci"][0] or 0) for a, c in zip(acc, conds)]
        hi = [(protocols[name][c]["ci"][1] or 0) - a for a, c in zip(acc, conds)]
        ax.bar(range(len(conds)), acc, yerr=[lo, hi], color=[COLOURS[c] for c in conds], capsize=2)
        ax.axhline(chance, color="k", ls=":", lw=1, label="chance")
        ax.set_xticks(range(len(conds)), conds, rotation=40, fontsize=7, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("redirected to target", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def plot_per_panel(protocols: dict, chance: float, path: Path) -> str | None:
    """vqa accuracy per target panel, one line per condition."""
    if "vqa" not in protocols:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.6, 2.6))
    for c, entry in protocols["vqa"].items():
        panels = sorted(entry["per_panel"], key=int)
        ax.plot([int(p) for p in panels], [entry["per_panel"][p]["accuracy"] for p in panels], "o-", ms=3, lw=1,
                color=COLOURS.get(c), label=c)
    ax.axhline(chance, color="k", ls=":", lw=1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("target panel", fontsize=8)
    ax.set_ylabel("vqa redirected", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def plot_rate_curves(curves: dict, chance: float, path: Path, xlabel: str, log_base: float = 10) -> str | None:
    """Redirection rate vs a swept value (log x, 95% CI band), one curve per condition. `curves`:
    {condition: {value (a number or its string): {"accuracy", "ci"}}}; None when there is nothing to draw."""
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.6, 2.6))
    for c, by_x in curves.items():
        keys = sorted(by_x, key=float)
        x = [float(v) for v in keys]
        ax.plot(x, [by_x[v]["accuracy"] for v in keys], "o-", ms=3, lw=1.2, color=COLOURS.get(c), label=c)
        ax.fill_between(x, [by_x[v]["ci"][0] for v in keys], [by_x[v]["ci"][1] for v in keys], color=COLOURS.get(c),
                        alpha=0.2, lw=0)
    ax.axhline(chance, color="k", ls=":", lw=1, label="chance")
    ax.set_xscale("log", base=log_base)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("vqa redirected", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_sweep(sweep: dict, chance: float, path: Path, paper_k: tuple[int, ...] = ()) -> str | None:
    """Accuracy vs K (95% CI band) for gaze and random heads."""
    return plot_rate_curves(sweep, chance, path, "K (heads steered)", log_base=2)


def _heat(ax, traj: np.ndarray, title: str):
    t = traj / np.clip(traj.sum(1, keepdims=True), 1e-12, None)  # [tokens, R] share per panel
    ax.imshow(t.T, aspect="auto", cmap="magma", interpolation="nearest", vmin=0, vmax=1)
    ax.set_yticks(range(t.shape[1]), [f"P{k + 1}" for k in range(t.shape[1])], fontsize=6)
    ax.tick_params(axis="x", labelsize=6)
    ax.set_title(title, fontsize=8)


def plot_staircase(data: dict, path: Path) -> str | None:
    """Free narration: each head set's attention over the panels at every generated token."""
    sets = data.get("sets") or {}
    if not sets:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(sets), 1, figsize=(5.2, 1.25 * len(sets) + 0.5), squeeze=False, sharex=True)
    for ax, (name, entry) in zip(axes[:, 0], sets.items()):
        traj = np.asarray(entry["trajectory"], dtype=float)
        if traj.size:
            _heat(ax, traj, f"{name} heads ({len(entry['heads'])})")
    axes[-1, 0].set_xlabel("generated token (free narration, unsteered)", fontsize=7)
    return _save(fig, path)


def plot_dynamic(records: list[dict], path: Path) -> str | None:
    """One strip's dynamic narration per condition: where the gaze heads look, the schedule (cyan), and
    the panel the judge read in each segment (white dots)."""
    dyn = [{**r, "condition": r["condition"].split(":")[0]} for r in records  # control draw 0 stands for `random`
           if r["protocol"] == "dynamic" and r.get("trajectory") and r["condition"].split(":")[1:] in ([], ["0"])]
    if not dyn:
        return None
    first = sorted({r["strip_id"] for r in dyn})[0]
    rows = sorted((r for r in dyn if r["strip_id"] == first), key=lambda r: list(CONDITION_NAMES).index(r["condition"]))
    rows = [r for r in rows if r["condition"] in ("gaze", "random", "none")] or rows
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 1, figsize=(5.2, 1.3 * len(rows) + 0.5), squeeze=False, sharex=True)
    for ax, r in zip(axes[:, 0], rows):
        traj = np.asarray(r["trajectory"], dtype=float)
        rho = r.get("spearman")
        who = "unsteered" if r["condition"] == "none" else f"steering {r['condition']} heads"
        _heat(ax, traj, f"{who}; schedule {r['target']}; "
                        f"{100 * r['segment_accuracy']:.0f}% segments, rho {num(rho)}")
        every, order = r["every"], r["schedule"]
        steps = np.arange(traj.shape[0])
        ax.step(steps, [order[min(i // every, len(order) - 1)] - 1 for i in steps], where="mid", color="cyan", lw=1)
        for j, m in enumerate(r.get("described") or []):
            if m is not None:
                ax.plot(j * every + every / 2 - 0.5, m - 1, "o", color="white", ms=3, mec="k", mew=0.5)
    axes[-1, 0].set_xlabel("generated token (gaze heads' attention share per panel)", fontsize=7)
    return _save(fig, path)


def plot_region(region: dict, path: Path) -> str | None:
    """Region steering accuracy by object size class, per condition."""
    if not region:
        return None
    plt = _plt()
    sizes = ["small", "medium", "large"]
    conds = [c for c in CONDITION_NAMES if c in region]
    fig, ax = plt.subplots(figsize=(3.8, 2.6))
    width = 0.8 / max(1, len(conds))
    for i, c in enumerate(conds):
        per = region[c].get("per_size", {})
        ax.bar([s + i * width for s in range(len(sizes))], [(per.get(z) or {}).get("accuracy") or 0 for z in sizes],
               width=width, color=COLOURS.get(c), label=c)
    chance = [region[c].get("chance") for c in conds if region[c].get("chance") is not None]
    if chance:
        ax.axhline(float(np.mean(chance)), color="k", ls=":", lw=1)
    ax.set_xticks([s + 0.4 - width / 2 for s in range(len(sizes))], sizes, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("answer names the target object", fontsize=7)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


# ---------------------------------------------------------------- markdown

def reproduce_command(config: dict) -> str:
    """The `gaze eval` command line that reproduces a run (non-default flags only)."""
    from gaze.eval.config import PAPER_QUESTIONS, PRESETS, EvalConfig

    default = EvalConfig()
    preset = PRESETS.get(config.get("preset"), {})  # values the preset gives need no flag
    derived = {**preset, "dynamic_phase": preset.get("dynamic_phase") or (
        "all" if config.get("phase") == "prefill" else config.get("phase"))}
    parts = ["gaze", "eval"]
    for name, value in config.items():
        if name in derived and value == derived[name]:
            continue
        if name == "out" or value == getattr(default, name, object()) or (
                isinstance(value, list) and tuple(value) == getattr(default, name, None)):
            continue
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts += [flag] if value else []
            continue
        if name == "questions":
            for p, q in value:
                if config.get("preset") == "paper" and PAPER_QUESTIONS.get(p) == q:
                    continue
                parts += ["--question", shlex.quote(f"{p}={q}")]
            continue
        if isinstance(value, (list, tuple)):
            value = ("x" if name == "scene_size" else ",").join(map(str, value))
        parts += [flag, shlex.quote(str(value))]
    parts += ["--out", shlex.quote(str(config.get("out", "OUT")))]
    return " ".join(parts)


def _comparison(p: dict, meta: dict) -> list[str]:
    k, chance = meta.get("top_k"), meta.get("chance", 1 / 6)
    vqa, nar = p.get("vqa", {}), p.get("narration", {})
    rows = [("VQA redirection, top-K gaze heads", PAPER["vqa"], f"{_acc(vqa.get('gaze'))}, K={k}"),
            ("static narration redirection (\"this panel\")", PAPER["narration"], _acc(nar.get("gaze"))),
            ("random non-gaze heads (VQA)", PAPER["random"], _acc(vqa.get("random")) + _draws(vqa.get("random"))),
            ("unsteered (VQA answer happens to be the target)", PAPER["none"], _acc(vqa.get("none")))]
    if vqa.get("all"):
        a = vqa["all"]
        rows.append(("all heads (VQA)", PAPER["all"],
                     f"{_acc(a)}; degenerate answers {pct(a.get('degenerate'))}, unmatched {pct(a.get('unmatched'))}"))
    sweep = p.get("sweep", {}).get("gaze")
    if sweep:
        best = max(sweep, key=lambda kk: sweep[kk]["accuracy"] if sweep[kk]["accuracy"] is not None else -1)
        curve = ", ".join(f"K={kk}: {pct(v['accuracy'])}" for kk, v in sorted(sweep.items(), key=lambda x: int(x[0])))
        rows.append(("accuracy vs K (VQA, gaze heads)", PAPER["sweep"], f"peak at K={best}; {curve}"))
    dyn = p.get("dynamic", {})
    if dyn:
        parts = [f"{c}: rho {num(v['spearman']['mean'])}{_rho_ci(v)}, segments {pct(v['segment_accuracy'])}"
                 for c, v in dyn.items() if c in ("gaze", "random", "none")]
        rows.append(("dynamic schedule vs described order", PAPER["dynamic"], "; ".join(parts)))
    prior = [f"{c}: {_acc(vqa.get(c))}" for c in ("image", "localization") if vqa.get(c)]
    if prior:
        rows.append(("prior head sets (VQA)", PAPER["prior"], "; ".join(prior)))
    reg = p.get("region", {}).get("gaze")
    if reg:
        sizes = "; ".join(f"{s} {pct(v['accuracy'])} (n={v['n']})" for s, v in reg.get("per_size", {}).items())
        rows.append(("region steering to object boxes, gaze heads", PAPER["region"],
                     f"{_acc(reg)}, chance {pct(reg.get('chance'))}; by size: {sizes}"))
    lines = ["| result | paper (Qwen3-VL-8B) | ours |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return lines


def _draws(entry: dict | None) -> str:
    d = (entry or {}).get("draws")
    if not d:
        return ""
    return (f"; {d['n_draws']} draws {pct(d['min'])}-{pct(d['max'])}, gaze above them at p = {num(d['p_value'], 3)}, "
            f"gaze - control {pct(d['difference']['mean'])}{ci(d['difference']['ci'])}")


def _rho_ci(v: dict) -> str:
    c = v["spearman"]["ci"]
    return "" if not c or c[0] is None else f" [{c[0]:.2f}, {c[1]:.2f}]"


def _condition_table(p: dict) -> list[str]:
    lines = ["| protocol | condition | K | accuracy [95% CI] | n | degenerate | unmatched | identical to unsteered "
             "| judge alone |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def rule(e: dict) -> str:  # the baseline-identical rule's share, and the accuracy before it
        if "judged_accuracy" not in e:
            return " | |"
        return f" {pct(e.get('identical'))} | {pct(e.get('judged_accuracy'))} |"

    for proto in ("vqa", "narration", "region"):
        for c in CONDITION_NAMES:
            e = p.get(proto, {}).get(c)
            if e:
                lines.append(f"| {proto} | {c} | {e.get('k', '')} | {pct(e['accuracy'])}{ci(e['ci'])} | {e['n']} | "
                             f"{pct(e.get('degenerate'))} | {pct(e.get('unmatched'))} |" + rule(e))
    for c in CONDITION_NAMES:
        e = p.get("dynamic", {}).get(c)
        if e:
            lines.append(f"| dynamic (segments) | {c} | {e['k']} | {pct(e['segment_accuracy'])}{ci(e['ci'])} | "
                         f"{e['n']} strips | {pct(e['degenerate'])} | | | |")
    for c, by_k in p.get("sweep", {}).items():
        for kk, e in sorted(by_k.items(), key=lambda x: int(x[0])):
            lines.append(f"| sweep | {c} | {kk} | {pct(e['accuracy'])}{ci(e['ci'])} | {e['n']} | "
                         f"{pct(e.get('degenerate'))} | {pct(e.get('unmatched'))} |" + rule(e))
    return lines


def _per_panel_table(vqa: dict) -> list[str]:
    panels = sorted({q for e in vqa.values() for q in e["per_panel"]}, key=int)
    lines = ["| condition | " + " | ".join(f"panel {q}" for q in panels) + " |",
             "| --- |" + " --- |" * len(panels)]
    for c in CONDITION_NAMES:
        if c in vqa:
            cells = [pct(vqa[c]["per_panel"].get(q, {}).get("accuracy")) for q in panels]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


def _judging_notes(meta: dict) -> list[str]:
    judge = meta.get("judge", "caption")
    how = {
        "caption": "the deterministic caption judge (`gaze.eval.judges.CaptionJudge`): stemmed content words of the "
                   "answer against each panel caption, weighted by how specific each word is to one caption; the "
                   "best caption must hold at least half of its (weighted) words and lead the runner-up by 0.25",
        "letter": "the exact letter judge: the answer must name exactly one of the letters overlaid on the panels",
        "embedding": "sentence-embedding similarity to the panel captions",
        "llm": "an LLM asked which panel caption the answer describes",
        "vlm": "a local VLM shown the strip image (`gaze.eval.image_judges.VLMJudge`), forced to pick one panel by "
               "its next-token likelihood over the options 1-6 and 0 (junk)",
        "hosted": "a hosted VLM shown the strip image (`gaze.eval.image_judges.HostedJudge`), forced to pick one "
                  "panel or flag the answer as junk",
    }.get(judge, judge)
    cal = meta.get("judge_calibration")
    if cal:
        how += (f" (`{meta.get('judge_name')}`; calibrated first on {cal['n']} answers of known panel "
                f"({cal['source']}): {pct(cal['accuracy'])} right; it picked panels " +
                ", ".join(f"{k} {pct(v)}" for k, v in cal["picked"].items()) + ")")
    sizes = meta.get("size_classes") or {}
    return [
        f"- Answers were judged by {how}. No API key and no network were used unless the judge says so.",
        "- A miss is anything but the target: an empty or looping answer, an answer matching no caption, or one "
        "matching two captions about equally (ambiguous). `unmatched` is the share of answers the judge could not "
        "place on any single panel.",
        f"- Baseline-identical answers: a steered answer whose Jaccard similarity "
        f"({(meta.get('identical') or {}).get('tokens', 'word')}s) to the unsteered answer to the same strip and "
        f"question is at least {(meta.get('identical') or {}).get('threshold', 'n/a')} counts as a miss, whatever "
        "the judge said (steering that changed nothing is no hit; the official code's rule). `identical to "
        "unsteered` is that share of the steered answers, `judge alone` the accuracy without the rule "
        "(docs/paper-protocol.md).",
        "- Dynamic narration: each segment (the tokens produced under one schedule entry) is judged on its own "
        "with the caption judge; Spearman correlates the scheduled panels with the judged ones (segments the judge "
        "cannot place are left out; strips with fewer than two placed segments give no rho).",
        _control_note(meta),
        "- Image heads (MaskCD): per layer, the z-score of each head's attention mass on the image from the last "
        "prompt token; heads above 2.5 are image heads, K heads are taken by z. Localization heads (Kang et al.): "
        "per prompt, heads whose image-attention sum is at or above the elbow of the sorted sums (chord method), "
        "outside layers 0-1 and not covering the whole bottom row, ranked by the spatial entropy of their "
        "mean-thresholded attention map (8-connected components); K heads by how often a prompt ranks them among "
        "its 10 lowest. Both from the six panel-query prompts on the first "
        f"{(meta.get('config') or {}).get('prior_strips', 8)} evaluation strips (no labels are used).",
        ("- Region steering on COCO: the answer must name the target's category (`gaze.eval.coco.LabelJudge`: the "
         "COCO name, a synonym or a form of either); crowd regions and boxes under 750 px^2 left out (the paper's "
         "filter); COCO's size classes by box area (small < 32^2 px, medium < 96^2, large); the chance line is "
         "1 / objects, read the `none` condition as the baseline; boxes that cover no token centre are skipped."
         if str(meta.get("scenes", "")).startswith("coco:") else
         f"- Region steering: object size classes by image tokens the box covers (small <= "
         f"{sizes.get('small', 2)}, medium <= {sizes.get('medium', 8)}, "
         "large above); boxes that cover no token centre are skipped, not counted."),
        "- 95% CIs: seeded percentile bootstrap over (strip, target) pairs (dynamic: over strips).",
    ]


def _control_note(meta: dict) -> str:
    c = meta.get("control")
    if not c:  # runs from before the control draws
        return (f"- Random heads: K heads sampled (seed {meta.get('seed')}) from the bottom "
                f"{meta.get('random_percentile')}% of gaze scores, widened to at least 2K heads and never the top K "
                f"(pool here: {meta.get('random_pool')} heads).")
    how = {"bottom-p": f"from the bottom {c['percentile']:g}% of gaze scores"
                       + (" (widened to at least 2K heads)" if c["widen"] else ""),
           "layer-band": f"uniformly from layers {_layers(c.get('band_layers') or [])} (fractions "
                         f"{c['band'][0]:g}-{c['band'][1]:g} of depth; the paper: layers 20-35 of 36)",
           "layer-matched": "with the top-K gaze heads' histogram over layers"}[c["kind"]]
    note = (f"- Random heads (control `{c['kind']}`): {c['draws']} seeded draws (seed {meta.get('seed')}) of K heads "
            f"{how}, never the top K (pool: {c['pool']} heads). Each draw is its own condition run; the tables pool "
            "them, the controls section gives their spread.")
    return note + (f" **Warning: {c['warning']}.**" if c.get("warning") else "")


def _layers(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers else "?"


def _controls_section(p: dict) -> list[str]:
    """Gaze heads against the control draws: mean, spread, p-value, paired difference."""
    rows = [(proto, p[proto]["random"]["draws"]) for proto in ("vqa", "narration", "dynamic", "region")
            if (p.get(proto, {}).get("random") or {}).get("draws")]
    if not rows:
        return []
    lines = ["## Controls", "",
             "Gaze heads against N seeded draws of control heads. p-value: (1 + draws scoring at least the gaze "
             "rate) / (1 + N). Gaze - control: paired on (strip, target), the draws of a pair averaged, 95% CI "
             "from a bootstrap that resamples strips with their pairs.", "",
             "| protocol | gaze | control mean (sd) | control min-max | draws | p-value | gaze - control [95% CI] |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for proto, d in rows:
        diff = d["difference"]
        lines.append(f"| {proto} | {pct(d['gaze'])} | {pct(d['mean'])} ({pct(d['sd'])}) | {pct(d['min'])}-"
                     f"{pct(d['max'])} | {d['n_draws']} | {num(d['p_value'], 3)} | {pct(diff['mean'])}"
                     f"{ci(diff['ci'])} ({diff['n_pairs']} pairs, {diff['n_strips']} strips) |")
    return lines + [""]


def _overlap_section(meta: dict) -> list[str]:
    o = meta.get("overlap")
    if not o:
        return []
    lines = ["## Head-set overlap", "",
             f"Jaccard overlap of the top-k heads of each criterion (MaskCD's z > 2.5 picks {o['image_set']} "
             f"heads; {o['localization_set']} heads got a localization vote).", "",
             "| k | gaze vs image | gaze vs localization | image vs localization |", "| --- | --- | --- | --- |"]
    for k in o["ks"]:
        j = o["jaccard"][str(k)]
        lines.append(f"| {k} | {num(j['gaze|image'])} | {num(j['gaze|localization'])} | "
                     f"{num(j['image|localization'])} |")
    return lines + [""]


def write_report(out: str | Path, *, title: str | None = None) -> Path:
    """Write OUT/README.md and OUT/figures/*.png from an evaluation folder; return the README path."""
    out = Path(out)
    agg_path = out / AGGREGATE
    if not agg_path.exists():
        raise EvalError(f"no {AGGREGATE} in {out}: run `gaze eval ... --out {out}` first")
    agg = json.loads(agg_path.read_text())
    meta, p = agg.get("meta", {}), agg.get("protocols", {})
    chance = meta.get("chance") or 1 / 6
    figs = out / FIGURES
    figs.mkdir(parents=True, exist_ok=True)
    made: dict[str, str | None] = {}

    ranking_path = out / "ranking.json"
    if ranking_path.exists():
        from gaze.plots import plot_matrices, plot_score_map
        from gaze.ranking import Ranking

        ranking = Ranking.load(ranking_path)
        top = ranking.top(min(6, ranking.scores.numel()))
        made["matrices"] = Path(plot_matrices(ranking.matrices, top, figs / "matrices.png")).name
        made["score_map"] = Path(plot_score_map(ranking.scores, figs / "score_map.png",
                                                title=f"gaze score ({ranking.n_strips} strips)")).name
    made["accuracy"] = plot_accuracy(p, chance, figs / "accuracy.png")
    made["per_panel"] = plot_per_panel(p, chance, figs / "per_panel.png")
    made["sweep"] = plot_sweep(p.get("sweep", {}), chance, figs / "accuracy_vs_k.png")
    if (out / TRAJECTORIES).exists():
        made["staircase"] = plot_staircase(json.loads((out / TRAJECTORIES).read_text()), figs / "staircase.png")
    records = []
    if (out / RECORDS).exists():
        from gaze.eval.records import RecordLog

        records = list(RecordLog(out / RECORDS).records.values())
    made["dynamic"] = plot_dynamic(records, figs / "dynamic.png")
    made["region"] = plot_region(p.get("region", {}), figs / "region.png")

    model = meta.get("model_id", "?")
    lines = [f"# {title or 'Gaze-head evaluation: ' + str(model)}", ""]
    lines += [
        f"Model `{model}` ({meta.get('n_layers')} layers x {meta.get('n_heads')} heads = {meta.get('n_total_heads')} "
        f"heads); ranking from {meta.get('ranking_strips')} strips; {meta.get('n_strips')} evaluation strips "
        f"(`{meta.get('strips')}`), K = {meta.get('top_k')} heads, steering {meta.get('mode')} with B = "
        f"{meta.get('strength'):g}"
        + PHASE_WORDS[meta.get("phase", "prefill" if meta.get("prefill_only") else "all")]
        + f", seed {meta.get('seed')}, judge `{meta.get('judge')}`. "
        f"Chance is {pct(chance)} (one panel of {round(1 / chance)}).",
        "",
    ]
    if not meta.get("complete", True):
        lines += ["**This run is incomplete** (stopped early): rerun the command below to finish it.", ""]
    if "config" in meta:
        lines += ["Reproduce (resumable; the same command continues an interrupted run):", "", "```bash",
                  reproduce_command(meta["config"]), "```", ""]
    lines += ["## Ours vs the paper", "",
              "The paper's numbers are for Qwen3-VL-8B with K = 100 of 1,152 heads and a hosted LLM judge; ours are "
              "for the model above, judged offline. Compare shapes (gaze >> random ~ chance, a peak in K, "
              "schedule following), not absolute values.", ""]
    lines += _comparison(p, meta) + [""]
    if made.get("accuracy") or made.get("per_panel"):
        lines += ["## Redirection by condition", ""]
        lines += [f"![{n}]({FIGURES}/{made[n]})" for n in ("accuracy", "per_panel") if made.get(n)] + [""]
    lines += _condition_table(p) + [""]
    lines += _controls_section(p) + _overlap_section(meta)
    if "vqa" in p:
        lines += ["### VQA accuracy per target panel", ""] + _per_panel_table(p["vqa"]) + [""]
    if made.get("sweep"):
        lines += ["## Accuracy vs K", "", f"![accuracy vs K]({FIGURES}/{made['sweep']})", ""]
    if made.get("staircase") or made.get("dynamic"):
        lines += ["## Where the heads look", ""]
        if made.get("staircase"):
            lines += ["Free narration (no steering): each head set's attention share per panel at every generated "
                      "token. Gaze heads should climb a staircase, panel by panel; random heads should not.", "",
                      f"![staircase]({FIGURES}/{made['staircase']})", ""]
        if made.get("dynamic"):
            lines += ["Dynamic steering on a derangement schedule: the gaze heads' attention share per panel, the "
                      "scheduled panel (cyan) and the panel the judge read in each segment (dots).", "",
                      f"![dynamic schedule]({FIGURES}/{made['dynamic']})", ""]
    if made.get("region"):
        lines += ["## Region steering by object size", "", f"![region]({FIGURES}/{made['region']})", ""]
    from gaze.eval.sweeps import report_sections

    lines += report_sections(out, p, figs, chance)  # strength and paraphrase sweeps, when run
    if made.get("matrices") or made.get("score_map"):
        lines += ["## The heads", "",
                  "Top gaze heads' mean attention mass (rows: queried panel, columns: attended panel) and the gaze "
                  "score of every head.", ""]
        lines += [f"![{n}]({FIGURES}/{made[n]})" for n in ("matrices", "score_map") if made.get(n)] + [""]
        heads = meta.get("heads", {})
        if heads:
            lines += ["Steered head sets (layer, head): " + "; ".join(
                f"{c}: {', '.join(f'L{l}H{h}' for l, h in hs[:12])}{' ...' if len(hs) > 12 else ''}"
                for c, hs in heads.items() if hs and (not c.startswith("random:") or c == "random:0")), ""]
    lines += ["## How answers were judged", ""] + _judging_notes(meta) + [""]
    cost = agg.get("cost", {})
    if cost:
        lines += [f"{agg.get('n_records')} judged generations; {cost.get('generation_seconds')} s of generation in "
                  f"total. Every answer is in `{RECORDS}` (one JSON line each, with the judge's reason).", ""]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path
