"""The checks of the paper-geometry recipe (`train.py`): the mechanism first, then tasks and steering.

    python -m gaze.organism.check --model runs/paper-organism --out runs/paper-check

Every figure is measured on strips the organism never saw (datagen seeds from
`EVAL_SEED0`), in three layouts: "1x6" (the paper's assembly: panels at one
height, widths drawn from the organism's training range, 6 px gaps), "2x3"
(the same, two rows, panels counted in reading order) and "1x6@2x" (the 1x6
strips uploaded at twice their size, through the processor's own resizing).
Per layout, the image tokens each panel owns through the model's processor
(the fewest, the mean, the share with at least 4).

1. Mechanism. Discovery with the organism's discovery question (the paper's
   definition: last prompt row, raw mass, mean diagonal) ranks the heads; for
   the top 3, their mean 6x6 matrix (queried x attended panel): for every
   queried panel k, is entry (k, k) the largest of row k and at least 3x the
   row's mean off-diagonal entry? During free narration (the paper's prompt),
   does the top heads' per-token argmax panel equal the panel being described
   (the "Panel k:" the token belongs to)? The same for 3 random low-score heads.
   Asked the letter of panel k (and the same read in reverse), where do the
   top heads look: on panel k (7 - k), and on the letter's ink within it?
2. Tasks: every trained question, exact answers (one panel a strip; the letter
   question of every panel, 6 letters a strip, and the same read in reverse).
   "letter_mirrored": the share of letter answers naming panel 7 - k's letter,
   as if read in reverse ("reverse_letter_mirrored": the reverse question
   answered as if forward): an organism that confuses the two reading orders
   shows it here, not only as a lower letter rate.
3. Steering (bias at every row, the published default), hit = the target's
   caption exactly: the VQA question and the static narration question steered
   to each panel by the top K, K random low-score heads, all heads; the panel's
   pixel box as a target; a dynamic schedule over the narration (Spearman of
   the described order against the schedule). Bootstrap 95% CIs.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from gaze.organism.train import EVAL_SEED0, PROMPTS, ask, narration, strip_captions

LAYOUTS = ("1x6", "2x3", "1x6@2x")


def geometry(model_dir=None) -> dict:
    """The strip geometry an organism was trained on (its training.json; this recipe's defaults if absent)."""
    from dataclasses import asdict

    from gaze.organism.train import OrganismConfig

    cfg = asdict(OrganismConfig())
    record = Path(model_dir) / "training.json" if model_dir else None
    if record is not None and record.exists():
        cfg.update(json.loads(record.read_text())["config"])
    return {k: cfg[k] for k in ("panel_height", "min_width", "max_width", "gap")}


def held_out(layout: str, n: int, seed0: int = EVAL_SEED0, geo: dict | None = None):
    """`n` strips the organism never trained on, in `layout`, of the geometry `geo` (`geometry()`)."""
    from dataclasses import replace

    from datagen import make_strip

    geo = geo or geometry()
    grid = "2x3" if layout == "2x3" else "1x6"
    strips = [make_strip(seed0 + i, panel_size=geo["panel_height"], gap=geo["gap"], layout=grid,
                         widths=(geo["min_width"], geo["max_width"])) for i in range(n)]
    if layout.endswith("@2x"):
        strips = [replace(s, image=s.image.resize((s.image.width * 2, s.image.height * 2), Image.BICUBIC),
                          panels=tuple(tuple(2 * v for v in b) for b in s.panels)) for s in strips]
    return strips


def bootstrap(hits) -> list[float]:
    from gaze.eval.statistics import bootstrap_ci

    return [round(v, 4) for v in bootstrap_ci([float(h) for h in hits])]


def _norm(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def mechanism(ranking, k: int = 3) -> dict:
    """The top-k heads' mean 6x6 matrix and, row by row, whether the queried panel dominates."""
    top = ranking.top(k)
    m = torch.stack([ranking.matrices[l, h] for l, h in top]).mean(0)  # [6 queried, 6 attended]
    rows = []
    for q in range(m.shape[0]):
        off = torch.cat([m[q, :q], m[q, q + 1:]])
        rows.append({"panel": q + 1, "diagonal": round(float(m[q, q]), 4), "max_off": round(float(off.max()), 4),
                     "mean_off": round(float(off.mean()), 4),
                     "ratio": round(float(m[q, q] / off.mean().clamp_min(1e-9)), 2),
                     "largest": bool(m[q, q] >= off.max())})
    return {"heads": top, "matrix": [[round(float(v), 4) for v in r] for r in m],
            "rows": rows, "diagonal_everywhere": all(r["largest"] and r["ratio"] >= 3 for r in rows),
            "top_score": round(float(ranking.scores[top[0]]), 4)}


def letter_attention(loaded, strips, heads) -> dict:
    """Where `heads` look when asked a panel's letter: the letter question of every panel, and the same read in
    reverse, eager attention at the last prompt row (as discovery reads it). Per head ("L2H7"), over the
    questions: the mean mass on the asked panel (k, or 7 - k read in reverse), the share of questions whose
    argmax panel it is, and the mean mass on that panel's letter ink (the tokens whose cell overlaps the ink box,
    `strip.meta["letter_boxes"]`)."""
    from gaze.regions import overlap_regions, panel_regions, region_mass
    from gaze.scoring import query_rows

    out, q = {}, torch.arange(6)  # the six questions of a strip, one per panel
    for task in ("letter", "reverse_letter"):
        sums, n = torch.zeros(len(heads), 3), 0
        asked = torch.arange(6) if task == "letter" else torch.arange(5, -1, -1)  # panel index per question
        for s in strips:
            rows, layout = query_rows(loaded.model, loaded.processor, s.image, [ask(task, k) for k in range(1, 7)])
            per = torch.stack([rows[l, :, h] for l, h in heads]).float()  # [K, 6 questions, kv]
            on_panels = region_mass(per, panel_regions(layout, s.panels), layout)  # [K, 6, 6 panels]
            ink = region_mass(per, overlap_regions(layout, s.meta["letter_boxes"]), layout)  # [K, 6, 6 letters]
            sums[:, 0] += on_panels[:, q, asked].sum(-1)
            sums[:, 1] += (on_panels.argmax(-1) == asked).float().sum(-1)
            sums[:, 2] += ink[:, q, asked].sum(-1)
            n += 6
        out[task] = {f"L{l}H{h}": dict(zip(("panel", "argmax", "ink"), (round(float(v) / n, 4) for v in row)))
                     for (l, h), row in zip(heads, sums)}
        out[task]["questions"] = n
    return out


def described_panels(pieces: list[str]) -> list[int]:
    """The panel each generated token describes: that of the last "k:" or "Panel k:" marker written up to and
    including it (0 before the first)."""
    import re

    out, text = [], ""
    for p in pieces:
        text += p
        found = re.findall(r"(?:^|\s)([1-6])(?=:|$)", text)
        out.append(int(found[-1]) if found and 1 <= int(found[-1]) <= 6 else 0)
    return out


def staircase(loaded, strips, heads, prompt: str, max_new_tokens: int = 80, looking: float = 0.1) -> dict:
    """Share of narration tokens at which `heads`' summed mass peaks on the panel being described; the mean
    share of a head's attention that lies on the image (`image_mass`: where it is near 0 the argmax is noise);
    and the agreement among the tokens at which those heads put at least `looking` of their summed attention
    on the image (where they look at all). The misses by the token written ("after" the one before it) and
    how many of them peak on the next panel (a head that moves on before the check's label does)."""
    from collections import Counter

    from gaze.generation import generate, regions_for

    agree = total = agree_looking = n_looking = on_next = 0
    mass, missed = 0.0, Counter()
    for s in strips:
        g = generate(loaded, s.image, prompt, track=list(heads), max_new_tokens=max_new_tokens)
        traj = g.trajectory(regions_for(g.layout, s.panels))  # [tokens, 6]
        for i, p in enumerate(described_panels(g.pieces)[: len(traj)]):
            if p:
                peak = int(traj[i].argmax()) + 1
                hit = int(peak == p)
                total += 1
                agree += hit
                mass += float(traj[i].sum()) / len(heads)
                if float(traj[i].sum()) >= looking * len(heads):
                    n_looking += 1
                    agree_looking += hit
                if not hit:
                    missed[f"{g.pieces[i - 1] if i else ''!r} -> {g.pieces[i]!r}"] += 1
                    on_next += peak == p + 1
    return {"share": round(agree / max(1, total), 4), "tokens": total, "image_mass": round(mass / max(1, total), 4),
            "share_looking": round(agree_looking / max(1, n_looking), 4), "tokens_looking": n_looking,
            "misses": {"count": sum(missed.values()), "on_next_panel": on_next, "by_token": dict(missed.most_common(8))}}


def show_mechanism(report: dict) -> None:
    """The mechanism as a labelled table."""
    m = report["mechanism"]
    print(f"top heads (layer, head, gaze score): {report['top_heads']}   median score {report['median_score']}")
    print(f"top-{report['k']} heads {m['heads']}: mean mass by queried panel (rows) x attended panel (columns)")
    print("        " + "".join(f"  att {j}" for j in range(1, 7)) + "   ratio  largest")
    for r, row in zip(m["rows"], m["matrix"]):
        print(f"  ask {r['panel']}" + "".join(f"{v:7.3f}" for v in row) + f"  {r['ratio']:6.1f}  {r['largest']}")
    print(f"diagonal dominant (largest, >= 3x mean off-diagonal) on every row: {m['diagonal_everywhere']}; "
          f"top score {m['top_score']}")
    s = report["staircase"]
    print(f"narration: argmax panel = described panel on {s['top']['share']:.1%} of {s['top']['tokens']} tokens "
          f"(top heads, {s['top'].get('image_mass', float('nan')):.3f} of a head's attention on the image), "
          f"{s['random']['share']:.1%} (random low-score heads, {s['random'].get('image_mass', float('nan')):.4f} "
          f"on the image); at the {s['top']['tokens_looking']} "
          f"tokens where the top heads look at the image (>= 0.1 of their attention each): "
          f"{s['top']['share_looking']:.1%}", flush=True)
    if miss := s["top"].get("misses"):
        print(f"  its {miss['count']} misses, {miss['on_next_panel']} on the next panel, by token written: "
              + "; ".join(f"{k} {v}" for k, v in miss["by_token"].items()), flush=True)
    for task, per in report.get("letter_attention", {}).items():
        asked = "panel k" if task == "letter" else "panel 7 - k"
        print(f"asked {task.replace('_', ' ')} k ({per['questions']} questions), mass on {asked} / argmax there / "
              f"mass on its letter's ink: " + "; ".join(f"{h} {v['panel']:.3f} / {v['argmax']:.0%} / {v['ink']:.3f}"
                                                     for h, v in per.items() if h != "questions"), flush=True)


def tasks(loaded, strips) -> dict:
    from gaze.generation import generate

    hits = {t: [] for t in ("discovery", "panel", "vqa_panel1", "static_panel1", "narration", "reverse", "letter",
                            "reverse_letter", "letter_mirrored", "reverse_letter_mirrored")}
    for i, s in enumerate(strips):
        k, caps = i % 6 + 1, strip_captions(s)

        def said(question, n=16):
            return _norm(generate(loaded, s.image, question, max_new_tokens=n).text)

        hits["discovery"].append(said(ask("discovery", k)) == _norm(caps[k - 1]))
        hits["panel"].append(said(ask("panel", k)) == _norm(caps[k - 1]))
        hits["vqa_panel1"].append(said(ask("vqa")) == _norm(caps[0]))
        hits["static_panel1"].append(said(ask("static_narration")) == _norm(caps[0]))
        hits["narration"].append(said(ask("narration"), 80) == _norm(narration(caps)))
        hits["reverse"].append(said(ask("reverse", k)) == _norm(caps[6 - k]))
        # every panel's letter (a one-token answer is cheap): 6 letters a strip, asked both ways
        for task in ("letter", "reverse_letter"):
            outcomes = [letter_outcome(said(ask(task, j), 4), s.letters, j, task == "reverse_letter")
                        for j in range(1, 7)]
            hits[task] += [o == "right" for o in outcomes]
            hits[f"{task}_mirrored"] += [o == "mirrored" for o in outcomes]
    return {t: bootstrap(v) for t, v in hits.items()}


def letter_outcome(said: str, letters, k: int, reverse: bool) -> str:
    """What a letter answer for panel `k` names: "right" (the asked panel's letter: panel k, or 7 - k when asked in
    reverse), "mirrored" (the other reading order's panel: the forward question answered as if in reverse, or the
    reverse one as if forward), "other_panel" (some other panel's letter on the strip) or "unknown"."""
    letters = [_norm(x) for x in letters]
    asked, mirror = (7 - k, k) if reverse else (k, 7 - k)
    said = _norm(said)
    if said == letters[asked - 1]:
        return "right"
    if said == letters[mirror - 1]:
        return "mirrored"
    return "other_panel" if said in letters else "unknown"


def tokens_per_panel(loaded, strips) -> dict:
    """The merged image tokens each panel owns (steering's centre mapping), through the model's own processor:
    the fewest, the mean, and the share of panels with at least 4."""
    from gaze.generation import generate
    from gaze.regions import panel_regions

    counts = []
    for s in strips:
        layout = generate(loaded, s.image, loaded.prompts.vqa, max_new_tokens=1).layout
        regions = panel_regions(layout, s.panels)
        counts += [int(regions.membership[k].sum()) for k in range(regions.n_regions)]
    return {"fewest": min(counts), "mean": round(sum(counts) / len(counts), 2),
            "at_least_4": round(sum(c >= 4 for c in counts) / len(counts), 4), "panels": len(counts)}


def redirection(loaded, strips, heads, question: str, box: bool = False, strength: float = 1e4) -> dict:
    """The question steered to each panel (or its pixel box): hit = the target's caption exactly; an
    answer identical to the unsteered one is also counted (`moved`: hit and different from unsteered)."""
    from gaze.generation import generate
    from gaze.steering import Box, Panel

    pairs = []
    for s in strips:
        caps = strip_captions(s)
        base = _norm(generate(loaded, s.image, question, max_new_tokens=16).text)
        for k in range(1, 7):
            target = Box(tuple(float(v) for v in s.panels[k - 1])) if box else Panel(k)
            out = _norm(generate(loaded, s.image, question, heads=heads, target=target, panels=s.panels,
                                 strength=strength, max_new_tokens=16).text)
            pairs.append((k, out == _norm(caps[k - 1]), out != base))
    return {"hit": bootstrap([h for _, h, _ in pairs]),
            "hit_and_moved": bootstrap([h and m for _, h, m in pairs]),
            "per_panel": {k: round(sum(h for t, h, _ in pairs if t == k) / max(1, sum(t == k for t, _, _ in pairs)), 3)
                          for k in range(1, 7)}}


def schedule_following(loaded, strips, heads, seed: int = 0) -> dict:
    """Narration steered along a random order of the six panels, switching at each sentence end: Spearman
    of the order described (each "Panel k: <caption>." matched to the strip's captions) with the schedule."""
    from gaze.eval.statistics import spearman
    from gaze.generation import generate
    from gaze.steering import Panel, Schedule

    rng, rhos, exact = random.Random(seed), [], 0
    for s in strips:
        caps = [_norm(c) for c in strip_captions(s)]
        order = rng.sample(range(1, 7), 6)
        sched = Schedule(tuple(Panel(k) for k in order), every=4, at_sentence=True)
        g = generate(loaded, s.image, loaded.prompts.narration, heads=heads, schedule=sched, panels=s.panels,
                     max_new_tokens=80)
        said = [_norm(part.split(":", 1)[1]) for part in g.text.split("Panel ")[1:] if ":" in part]
        got = [caps.index(x) + 1 if x in caps else 0 for x in said[:6]]
        exact += got == order
        rho = spearman(order[: len(got)], got) if len(got) >= 2 else None
        rhos.append(rho if rho is not None else 0.0)
    return {"spearman": bootstrap(rhos), "exact_order": round(exact / max(1, len(strips)), 3)}


def show_layout(layout: str, section: dict) -> None:
    """One layout's figures as a labelled table: mean [95% CI]."""
    def fmt(v):
        return f"{v[0]:6.1%} [{v[1]:.1%}, {v[2]:.1%}]"

    print(f"\n{layout}: held-out strips")
    if t := section.get("tokens_per_panel"):
        print(f"  image tokens a panel: fewest {t['fewest']}, mean {t['mean']}, at least 4 on {t['at_least_4']:.1%} "
              f"of {t['panels']} panels")
    for name, v in section.get("tasks", {}).items():
        print(f"  task {name:<40} {fmt(v)}")
    for name, v in section.get("steering", {}).items():
        print(f"  steered {name:<37} hit {fmt(v['hit'])}   hit and moved from the unsteered answer "
              f"{fmt(v['hit_and_moved'])}")
    for name, v in section.get("schedule", {}).items():
        sp = v["spearman"]
        print(f"  schedule {name:<36} Spearman {sp[0]:.2f} [{sp[1]:.2f}, {sp[2]:.2f}]   exact order {v['exact_order']:.1%}")
    print(flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="organism", help="organism folder or 'organism' (default: %(default)s)")
    p.add_argument("--n-strips", type=int, default=50, help="held-out strips per layout (x6 targets; default: %(default)s)")
    p.add_argument("--n-discovery", type=int, default=40, help="strips for discovery (default: %(default)s)")
    p.add_argument("--n-narration", type=int, default=20, help="strips for the staircase and schedules (default: %(default)s)")
    p.add_argument("--k", type=int, default=3, help="K, the top heads steered and tracked (default: %(default)s)")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="held-out layouts (default: %(default)s)")
    p.add_argument("--skip", default="", help="sections to skip: tasks,steering,schedule (default: none)")
    p.add_argument("--out", default="runs/organism-check", help="folder for check.json (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random heads' draw (default: %(default)s)")
    p.add_argument("--mechanism-only", action="store_true", help="stop after the mechanism (matrix and staircase)")
    args = p.parse_args(argv)
    layouts = [x for x in args.layouts.split(",") if x]
    if unknown := set(layouts) - set(LAYOUTS):
        p.error(f"unknown layouts {sorted(unknown)}; use {', '.join(LAYOUTS)}")
    skip = set(x for x in args.skip.split(",") if x)
    from gaze.discovery import discover
    from gaze.models import load

    t0 = time.time()
    loaded = load(args.model, device="cpu")
    from gaze.models import resolve

    geo = geometry(resolve(args.model))
    out = Path(args.out)
    prompts = loaded.prompts  # the model's own (its prompts.json), else the paper's
    ranking = discover(loaded, held_out("1x6", args.n_discovery, seed0=2_000_000, geo=geo), out / "discovery",
                       template=prompts.discovery, progress=False,
                       source=f"datagen procedural 1x6, panels {geo['panel_height']} px high, widths "
                              f"{geo['min_width']}-{geo['max_width']}, {geo['gap']} px gaps, seeds 2,000,000+")
    order = ranking.order()
    rng = random.Random(args.seed)
    low = rng.sample(order[len(order) // 2:], args.k)  # random heads from the low-score half
    report: dict = {"model": args.model, "heads": len(order), "k": args.k,
                    "top_heads": [(l, h, round(float(ranking.scores[l, h]), 4)) for l, h in order[:8]],
                    "median_score": round(float(ranking.scores.flatten().median()), 5), "random_heads": low}
    report["mechanism"] = mechanism(ranking, args.k)
    nar = held_out("1x6", args.n_narration, geo=geo)
    report["staircase"] = {"top": staircase(loaded, nar, order[: args.k], prompts.narration),
                           "random": staircase(loaded, nar, low, prompts.narration)}
    report["letter_attention"] = letter_attention(loaded, nar, order[: args.k])
    show_mechanism(report)
    if args.mechanism_only:
        layouts = []
    for layout in layouts:
        strips = held_out(layout, args.n_strips, geo=geo)
        section = report.setdefault("layouts", {}).setdefault(layout, {})
        section["tokens_per_panel"] = tokens_per_panel(loaded, strips)
        if "tasks" not in skip:
            section["tasks"] = tasks(loaded, strips)
        if "steering" not in skip:
            st = section.setdefault("steering", {})
            for name, heads in ((f"top{args.k}", order[: args.k]), (f"random{args.k}", low), ("all", order)):
                st[f"vqa/{name}"] = redirection(loaded, strips, heads, prompts.vqa)
                print(layout, f"vqa/{name}", st[f"vqa/{name}"], flush=True)
            st[f"static/top{args.k}"] = redirection(loaded, strips, order[: args.k], prompts.static_narration)
            st[f"vqa-box/top{args.k}"] = redirection(loaded, strips, order[: args.k], prompts.vqa, box=True)
        if "schedule" not in skip and layout == "1x6":
            section["schedule"] = {f"top{args.k}": schedule_following(loaded, nar, order[: args.k]),
                                   f"random{args.k}": schedule_following(loaded, nar, low)}
        show_layout(layout, section)
    report["seconds"] = round(time.time() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "check.json").write_text(json.dumps(report, indent=1))
    print(f"written {out / 'check.json'} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
