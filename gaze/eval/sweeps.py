"""Sweeps beside the head-count sweep: steering strength and question wording (the paper's appendix D.1, D.4).

    gaze eval --protocols vqa,strength --strengths 1,10,100,1000,10000 ...   # accuracy vs the bias B (delta)
    gaze eval --protocols paraphrase [--paraphrases FILE] ...                 # accuracy per wording; top-set overlap

- **strength**: the vqa protocol at each bias B in `--strengths` (the paper:
  delta in {1, 10, 100, 1,000, 10,000} at K=100; 33% at 1, ~80% from 10 on),
  for the gaze and random heads at K. The vqa question; records keyed
  `PANEL@d=B`. At B = `--strength` the vqa answers are reused.
- **paraphrase**: the vqa protocol asked in other words, for gaze, random and
  no steering: the model's own vqa question first, then `PAPER_VQA_PARAPHRASES`
  (the paper's Table 7 wordings) or the questions of `--paraphrases FILE`. And
  discovery under other wordings of the panel question (`{ordinal}` or `{k}` in
  it): each is a full `discover` on the discovery strips (resumable, in
  OUT/paraphrase-discovery/qJ), and `paraphrase_discovery.json` holds each
  wording's top-K heads and their pairwise overlap and Jaccard index
  (`top_set_overlap`). Records are keyed `PANEL@q<hash of the question>`, so
  editing the list only adds the new wordings.

`--paraphrases FILE`: one question a line (blank lines and lines starting with #
skipped); a line with `{ordinal}` or `{k}` is a discovery wording, any other a
vqa wording. Each sweep writes a figure (`report_sections`, called by the report).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Container, Iterator, Sequence

from gaze.eval.config import EvalError
from gaze.prompts import PANEL_QUESTION, SHORT_PANEL_QUESTION

PAPER_STRENGTHS = (1.0, 10.0, 100.0, 1000.0, 10000.0)  # appendix D.1, Table 4
PAPER_VQA_PARAPHRASES = (  # appendix D.4, Table 7 (the first, the default vqa question, is asked anyway)
    "Describe this comic briefly.",
    "Look at this comic strip carefully.",
    "What is the main action or event happening across the panels? Answer in one short sentence.",
    "What story does this comic strip tell? Answer briefly.",
    "Summarize the main event of this comic in a few words.",
)
LETTER_PARAPHRASES = ("Which letter do you see in this comic strip? Reply with one letter.",
                      "Name the letter shown in this comic strip.")  # for --judge letter (ours; the paper has none)
DISCOVERY_PARAPHRASES = (  # the paper's two panel questions, then rewordings of ours
    PANEL_QUESTION,
    SHORT_PANEL_QUESTION,
    "Describe the {ordinal} panel from the left of this comic strip in a few words.",
    "In this six-panel comic strip, what does panel {k} show? Answer briefly.",
)
PARAPHRASE_DISCOVERY = "paraphrase_discovery.json"
SWEEP_CONDITIONS = {"strength": ("gaze", "random"), "paraphrase": ("gaze", "random", "none")}


def question_id(question: str) -> str:
    return hashlib.sha1(question.encode()).hexdigest()[:8]


def is_template(question: str) -> bool:
    """A discovery wording: it names the panel through `{ordinal}` or `{k}`."""
    return "{ordinal}" in question or "{k}" in question


def read_paraphrases(path: str | Path) -> tuple[list[str], list[str]]:
    """(vqa wordings, discovery wordings) of a `--paraphrases` file."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"--paraphrases {path} not found: give a text file with one question a line")
    lines = [l.strip() for l in p.read_text(encoding="utf-8").splitlines()]
    lines = [l for l in lines if l and not l.startswith("#")]
    if not lines:
        raise EvalError(f"--paraphrases {path} holds no question: write one a line")
    for l in lines:
        if is_template(l):
            try:
                l.format(ordinal="1st", k=1)
            except (KeyError, IndexError, ValueError):
                raise EvalError(f"--paraphrases {path}: {l!r} uses placeholders other than {{ordinal}} and {{k}}; "
                                "escape other braces as {{ }}") from None
    return [l for l in lines if not is_template(l)], [l for l in lines if is_template(l)]


def vqa_paraphrases(cfg) -> list[str]:
    """The wordings the paraphrase sweep asks: the vqa question first, then the file's or the built-in ones."""
    if cfg.paraphrases:
        extra = read_paraphrases(cfg.paraphrases)[0]
    else:
        extra = list(LETTER_PARAPHRASES if cfg.judge == "letter" else PAPER_VQA_PARAPHRASES)
    return list(dict.fromkeys([cfg.question("vqa"), *extra]))


def discovery_paraphrases(cfg, own: str) -> list[str]:
    """The discovery wordings: the model's own discovery question first, then the file's or the built-in ones."""
    extra = read_paraphrases(cfg.paraphrases)[1] if cfg.paraphrases else list(DISCOVERY_PARAPHRASES)
    return list(dict.fromkeys([own, *extra]))


# ---------------------------------------------------------------- the protocols

def _vqa_at(ctx, protocol: str, strips, condition: str, heads, k: int, question: str, tag: str, extra: dict,
            done: Container[str]) -> Iterator[dict]:
    """The vqa protocol with `question`, each record keyed `PANEL@tag` and carrying `extra`; an answer identical
    to the unsteered one to the same question is a miss, as in the vqa protocol."""
    from gaze.eval.protocols import _against_baseline, _base, _judged
    from gaze.eval.records import record_key
    from gaze.steering import Panel

    for strip in strips:
        for panel in ctx.cfg.targets or range(1, strip.n_panels + 1):
            if panel > strip.n_panels:
                continue
            target = f"{panel}@{tag}"
            if record_key(protocol, condition, strip.strip_id, target, k) in done:
                continue
            g, seconds = ctx.ask(strip, question, heads, Panel(panel), max_new_tokens=ctx.cfg.max_new_tokens)
            rec = _base(protocol, condition, strip, target, k, question, g, seconds)
            rec.update(panel=panel, **extra)
            rec = _judged(rec, ctx.judge.judge(g.text, strip, panel), ctx.judge.name, g.degenerate)
            yield _against_baseline(ctx, rec, strip, question, heads, panel, ctx.cfg.max_new_tokens, g.text)


def strength_sweep(ctx, strips, condition, heads, k, strength: float, *, done=()) -> Iterator[dict]:
    """The vqa protocol at one bias B; call it for every B (records are keyed by B)."""
    if strength != ctx.cfg.strength:  # a context of its own: its cache must not serve another strength
        ctx = replace(ctx, cfg=replace(ctx.cfg, strength=strength), cache={})
    return _vqa_at(ctx, "strength", strips, condition, heads, k, ctx.cfg.question("vqa"), f"d={strength:g}",
                   {"strength": strength}, done)


def paraphrase_sweep(ctx, strips, condition, heads, k, question: str, index: int = 0, *, done=()) -> Iterator[dict]:
    """The vqa protocol asked with `question` (the `index`-th wording); call it for every wording (records are
    keyed by the question's hash)."""
    return _vqa_at(ctx, "paraphrase", strips, condition, heads, k, question, f"q{question_id(question)}",
                   {"paraphrase": question, "paraphrase_index": index}, done)


def sweep_jobs(protocol: str, ctx, strips, sets: dict, ranking, k: int, done) -> Iterator[Iterator[dict]]:
    """The generators of one sweep protocol (for `run_eval`): each condition at each value."""
    from gaze.eval.controls import base_condition
    from gaze.eval.heads import head_sets

    cfg = ctx.cfg  # the control's draws (random:0, random:1, ...) each sweep as their own condition
    conditions = [c for c in sets if base_condition(c) in SWEEP_CONDITIONS[protocol]] or ["gaze"]
    missing = [c for c in conditions if c not in sets]
    sets = {**sets, **head_sets(ranking, k, cfg.seed, missing, percentile=cfg.random_percentile)} if missing else sets
    if protocol == "strength":
        for s in cfg.strengths:
            for c in conditions:
                if c != "none":
                    yield strength_sweep(ctx, strips, c, sets[c], len(sets[c]), float(s), done=done)
    else:
        for j, q in enumerate(vqa_paraphrases(cfg)):
            for c in conditions:
                yield paraphrase_sweep(ctx, strips, c, sets[c], len(sets[c]), q, j, done=done)


def summarise(protocol: str, records: list[dict], n_boot: int, seed: int) -> dict:
    """One condition's records of a sweep -> {value: {n, accuracy, ci, degenerate}} (value: B, or the wording)."""
    from gaze.eval.protocols import _rate

    field = "strength" if protocol == "strength" else "paraphrase"
    groups: dict = {}
    for r in records:
        groups.setdefault(r[field], []).append(r)
    out = {}
    def order(item):  # by B, or in the order the wordings were asked
        return item[0] if protocol == "strength" else min(r["paraphrase_index"] for r in item[1])

    for value, rs in sorted(groups.items(), key=order):
        e = _rate(rs, "correct", n_boot, seed)
        e["degenerate"] = sum(r["degenerate"] for r in rs) / len(rs)
        out[f"{value:g}" if protocol == "strength" else value] = e
    return out


# ---------------------------------------------------------------- discovery under other wordings

def top_set_overlap(tops: Sequence[Sequence[tuple[int, int]]]) -> dict:
    """Pairwise overlap |A & B| and Jaccard |A & B| / |A | B| of head sets (lists of (layer, head))."""
    sets = [set(map(tuple, t)) for t in tops]
    overlap = [[len(a & b) for b in sets] for a in sets]
    jaccard = [[len(a & b) / len(a | b) if a | b else math.nan for b in sets] for a in sets]
    common = set.intersection(*sets) if sets else set()
    return {"overlap": overlap, "jaccard": jaccard, "common": sorted(common)}


def paraphrase_discovery(loaded, cfg, out: str | Path, k: int, *, progress: bool = False) -> dict:
    """Discover the heads under each discovery wording (on `cfg.discovery_strips`) and compare the top-K sets;
    written to OUT/paraphrase_discovery.json. Resumable: each wording's discovery folder is reused."""
    from gaze.discovery import discover
    from gaze.eval.protocols import eval_strips

    out = Path(out)
    templates = discovery_paraphrases(cfg, loaded.prompts.discovery)
    align = loaded.family.merged_patch(loaded.processor)
    strips = eval_strips(cfg.discovery_strips, cfg.n_discovery, align=align, panel_size=cfg.panel_size,
                         assembly=cfg.assembly)
    rankings = []
    for j, template in enumerate(templates):
        folder = out / "paraphrase-discovery" / f"q{question_id(template)}"
        rankings.append(discover(loaded, strips, folder, template=template, source=cfg.discovery_strips,
                                 n_strips=len(strips), progress=progress))
    tops = [r.top(k) for r in rankings]
    result = {"k": k, "strips": cfg.discovery_strips, "n_strips": len(strips), "templates": templates,
              "top": [[list(h) for h in t] for t in tops],
              "best_score": [float(r.scores.max()) for r in rankings], **top_set_overlap(tops)}
    result["common"] = [list(h) for h in result["common"]]
    (out / PARAPHRASE_DISCOVERY).write_text(json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------- figures and the report's sections

def plot_strength(strength: dict, chance: float, path: Path) -> str | None:
    """Accuracy vs the bias B (log scale, 95% CI band) per condition."""
    from gaze.eval.report import plot_rate_curves

    return plot_rate_curves(strength, chance, path, "steering bias B (delta)")


def _short(text: str, n: int = 38) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def plot_paraphrase(paraphrase: dict, chance: float, path: Path) -> str | None:
    """Accuracy per wording (bars with 95% CI) per condition."""
    from gaze.eval.report import COLOURS, _plt, _save

    if not paraphrase:
        return None
    plt = _plt()
    conds = list(paraphrase)
    questions = list(dict.fromkeys(q for c in conds for q in paraphrase[c]))
    fig, ax = plt.subplots(figsize=(5.2, 0.45 * len(questions) + 1.0))
    h = 0.8 / len(conds)
    for i, c in enumerate(conds):
        ys = [j + i * h for j in range(len(questions))]
        acc = [(paraphrase[c].get(q) or {}).get("accuracy") or 0.0 for q in questions]
        err = [[a - ((paraphrase[c].get(q) or {}).get("ci") or [a, a])[0] for a, q in zip(acc, questions)],
               [((paraphrase[c].get(q) or {}).get("ci") or [a, a])[1] - a for a, q in zip(acc, questions)]]
        ax.barh(ys, acc, height=h, xerr=err, color=COLOURS.get(c), label=c, error_kw={"lw": 0.6})
    ax.axvline(chance, color="k", ls=":", lw=1)
    ax.set_yticks([j + 0.4 - h / 2 for j in range(len(questions))],
                  [f"q{j + 1}: {_short(q)}" for j, q in enumerate(questions)], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("vqa redirected", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)
    return _save(fig, path)


def plot_overlap(result: dict, path: Path) -> str | None:
    """Jaccard index of the top-K heads found under each pair of discovery wordings."""
    from gaze.eval.report import _plt, _save

    if not result or len(result.get("templates", [])) < 2:
        return None
    plt = _plt()
    n = len(result["templates"])
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.9 + 0.6 * n))
    im = ax.imshow(result["jaccard"], vmin=0, vmax=1, cmap="viridis")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(result["overlap"][i][j]), ha="center", va="center", fontsize=6,
                    color="white" if result["jaccard"][i][j] < 0.6 else "black")
    labels = [f"d{j + 1}" for j in range(n)]
    ax.set_xticks(range(n), labels, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_title(f"top-{result['k']} heads: Jaccard (numbers: shared heads)", fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def report_sections(out: Path, protocols: dict, figures: Path, chance: float) -> list[str]:
    """The report's markdown for the strength and paraphrase sweeps (figures written into `figures`)."""
    from gaze.eval.report import ci, pct

    lines: list[str] = []
    made = plot_strength(protocols.get("strength", {}), chance, figures / "strength.png")
    if made:
        lines += ["## Accuracy vs steering strength", "",
                  "The vqa protocol at each bias B (the paper, Qwen3-VL-8B at K=100: 33.2% at B=1, 79.8% at 10, "
                  "83.1% at 10,000; non-gaze 4-15% throughout).", "", f"![strength](figures/{made})", "",
                  "| condition | B | accuracy (95% CI) | n | degenerate |", "| --- | --- | --- | --- | --- |"]
        for c, by_b in protocols["strength"].items():
            for b, e in sorted(by_b.items(), key=lambda x: float(x[0])):
                lines.append(f"| {c} | {b} | {pct(e['accuracy'])}{ci(e['ci'])} | {e['n']} | {pct(e['degenerate'])} |")
        lines.append("")
    made = plot_paraphrase(protocols.get("paraphrase", {}), chance, figures / "paraphrase.png")
    if made:
        lines += ["## Accuracy vs question wording", "",
                  "The vqa protocol asked in other words (the paper, Table 7: gaze 64.7-83.1% over five wordings, "
                  "non-gaze 7-16%).", "", f"![paraphrase](figures/{made})", "",
                  "| | question | " + " | ".join(protocols["paraphrase"]) + " |",
                  "| --- | --- |" + " --- |" * len(protocols["paraphrase"])]
        questions = list(dict.fromkeys(q for by_q in protocols["paraphrase"].values() for q in by_q))
        for j, q in enumerate(questions):
            cells = [(protocols["paraphrase"][c].get(q) or {}) for c in protocols["paraphrase"]]
            lines.append(f"| q{j + 1} | {q} | " + " | ".join(f"{pct(e.get('accuracy'))}{ci(e['ci'])}" if e else "-"
                                                  for e in cells) + " |")
        lines.append("")
    path = out / PARAPHRASE_DISCOVERY
    if path.exists():
        result = json.loads(path.read_text())
        made = plot_overlap(result, figures / "paraphrase_discovery.png")
        lines += ["## Discovery under other wordings", "",
                  f"Heads ranked with each wording of the panel question on {result['n_strips']} strips "
                  f"(`{result['strips']}`); {len(result['common'])} of the top {result['k']} are shared by all.", ""]
        lines += [f"- d{j + 1}: {t} (best score {s:.3f})" for j, (t, s) in
                  enumerate(zip(result["templates"], result["best_score"]))] + [""]
        if made:
            lines += [f"![top-set overlap](figures/{made})", ""]
    return lines
