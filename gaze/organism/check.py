"""Does an organism have the phenomenon? Task accuracy, discovery, and steering, on held-out strips.

    python -m gaze.organism.check --model gaze/organism/weights --n-strips 50 --out runs/organism-check

Prints and writes (JSON) first the mechanism: for the top 3 heads of the
ranking (the paper's score: last prompt row, raw mass), their mean 6x6 matrix
(queried x attended panel), row by row whether the queried panel dominates
(the largest entry and at least 3x the row's mean off-diagonal), and during
free narration the share of tokens at which their summed mass peaks on the
panel being described, against 3 random low-score heads (`--mechanism-only`
stops there). Then per-task accuracy on strips the organism never saw;
the gaze-score distribution (top heads, their layers, the median); and the
whole-strip question's redirection when steering the top-K gaze heads to each
panel, K random heads from the bottom of the score distribution, and all heads,
with bootstrap 95% CIs, each steered at every row (the published default)
and at the prompt's rows only (the prefill: `steer(..., phase="prefill")`,
the answer going on unsteered from the steered cache); and, as a diagnostic, the top K steered at the first
answer token only (the rest of the answer unsteered, from an unsteered prompt). A redirected answer is the TARGET panel's caption,
exactly (the organism's caption: object, then character or scene, see
`gaze.organism.train.organism_caption`); anything else (another caption, a garbled
or empty answer) is a miss.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from gaze.discovery import discover
from gaze.generation import generate
from gaze.models import load
from gaze.prompts import LETTER_QUESTION, NARRATION_PROMPT, PANEL_QUESTION, STRIP_QUESTION, panel_question
from gaze.steering import Panel


def held_out_strips(n: int, panel_size: int = 64, seed0: int | None = None):
    """Strips the organism never trained on: datagen seeds from the evaluation range."""
    from datagen import make_strip
    from gaze.organism.train import EVAL_SEED0

    seed0 = EVAL_SEED0 if seed0 is None else seed0
    return [make_strip(seed0 + i, panel_size=panel_size) for i in range(n)]


def bootstrap(hits) -> tuple[float, float, float]:
    """(mean, low, high): the evaluation's percentile bootstrap 95% CI of a hit rate."""
    from gaze.eval.statistics import bootstrap_ci

    return bootstrap_ci([float(h) for h in hits])


def _norm(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def captioner(loaded):
    """strip -> its captions in the caption style the organism was trained with (read once)."""
    from gaze.models import resolve
    from gaze.organism.train import caption_style, strip_captions

    style = caption_style(resolve(loaded.model_id))
    return lambda strip: strip_captions(strip, style)


def _rates(pairs: list[tuple[int, bool]]) -> dict:
    """(target panel, hit) in evaluation order -> {"all": (mean, low, high), "per_panel": {k: mean}}."""
    per_panel = {k: [h for t, h in pairs if t == k] for k in range(1, 7)}
    return {"all": bootstrap([h for _, h in pairs]), "per_panel": {k: bootstrap(v)[0] for k, v in per_panel.items()}}


def task_accuracy(loaded, strips, max_new_tokens: int = 80) -> dict:
    hits = {"panel": [], "letter": [], "strip_is_panel1": [], "narration": []}
    from gaze.organism.train import narration

    captions_of = captioner(loaded)
    for i, s in enumerate(strips):
        k = i % 6 + 1
        captions = captions_of(s)
        hits["panel"].append(_norm(generate(loaded, s.image, panel_question(k, PANEL_QUESTION), max_new_tokens=16).text) == _norm(captions[k - 1]))
        hits["letter"].append(_norm(generate(loaded, s.image, panel_question(k, LETTER_QUESTION), max_new_tokens=4).text) == _norm(s.letters[k - 1]))
        hits["strip_is_panel1"].append(_norm(generate(loaded, s.image, STRIP_QUESTION, max_new_tokens=16).text) == _norm(captions[0]))
        hits["narration"].append(_norm(generate(loaded, s.image, NARRATION_PROMPT, max_new_tokens=max_new_tokens).text) == _norm(narration(captions)))
    return {k: bootstrap(v) for k, v in hits.items()}


def redirection(loaded, strips, heads, strength: float = 1e4, mode: str = "boost", decode_only: bool = False,
                prefill_only: bool = False) -> dict:
    """Whole-strip question steered to each panel: hit = the target's caption exactly."""
    pairs, captions_of = [], captioner(loaded)
    for s in strips:
        captions = captions_of(s)
        for k in range(1, 7):
            out = generate(loaded, s.image, STRIP_QUESTION, heads=heads, target=Panel(k), panels=s.panels,
                           strength=strength, mode=mode, phase="prefill" if prefill_only else "decode" if decode_only else "all",
                           max_new_tokens=16)
            pairs.append((k, _norm(out.text) == _norm(captions[k - 1])))
    return _rates(pairs)


@torch.no_grad()
def first_token_redirection(loaded, strips, heads, strength: float = 1e4) -> dict:
    """A diagnostic: steer the prompt and the FIRST answer token only, then let the answer go on unsteered.

    Separates the two ways steering can fail here: naming the wrong object at
    the first token, and derailing the answer at the later rows (where the
    steered heads would otherwise be forced onto the image too).
    """
    from gaze.generation import prepare_inputs
    from gaze.steering import steer

    model, tok = loaded.model, loaded.processor.tokenizer
    pairs, captions_of = [], captioner(loaded)
    for s in strips:
        captions = captions_of(s)
        enc, layout = prepare_inputs(loaded, s.image, STRIP_QUESTION)
        p = int(enc["input_ids"].shape[1])
        for k in range(1, 7):
            with steer(model, heads, Panel(k), layout=layout, prompt_len=p, panels=s.panels, strength=strength):
                first = model(**enc).logits[0, -1].argmax().view(1, 1)
            more = dict(enc, input_ids=torch.cat([enc["input_ids"], first], 1))
            more["attention_mask"] = torch.ones_like(more["input_ids"])
            if "mm_token_type_ids" in enc:
                more["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(first)], 1)
            out = model.generate(**more, max_new_tokens=15, do_sample=False, pad_token_id=tok.pad_token_id)
            pairs.append((k, _norm(tok.decode(out[0, p:], skip_special_tokens=True)) == _norm(captions[k - 1])))
    return _rates(pairs)


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


def staircase(loaded, strips, heads, prompt: str, max_new_tokens: int = 80) -> dict:
    """Share of narration tokens at which `heads`' summed mass peaks on the panel being described."""
    from gaze.generation import generate, regions_for

    agree = total = 0
    for s in strips:
        g = generate(loaded, s.image, prompt, track=list(heads), max_new_tokens=max_new_tokens)
        traj = g.trajectory(regions_for(g.layout, s.panels))  # [tokens, 6]
        for i, p in enumerate(described_panels(g.pieces)[: len(traj)]):
            if p:
                total += 1
                agree += int(int(traj[i].argmax()) + 1 == p)
    return {"share": round(agree / max(1, total), 4), "tokens": total}


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
          f"(top heads), {s['random']['share']:.1%} (random low-score heads)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="organism")
    p.add_argument("--n-strips", type=int, default=50, help="held-out strips for steering (x6 targets)")
    p.add_argument("--n-discovery", type=int, default=40, help="strips for discovery (disjoint from steering)")
    p.add_argument("--ks", default="1,2,4,6,8")
    p.add_argument("--k", type=int, default=4, help="K for the random and headline conditions")
    p.add_argument("--out", default="runs/organism-check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phases", default="all,prefill",
                   help="when the bias applies: 'all' (prompt and answer rows, the published default) and/or "
                        "'prefill' (the prompt's rows only); each runs every condition")
    p.add_argument("--strength", type=float, default=1e4, help="steering bias B (default 1e4: saturating, as published)")
    p.add_argument("--mechanism-only", action="store_true",
                   help="only the mechanism: the top 3 heads' 6x6 matrix and the narration staircase")
    args = p.parse_args(argv)
    t0 = time.time()
    loaded = load(args.model, device="cpu")
    out = Path(args.out)
    disc = held_out_strips(args.n_discovery, seed0=2_000_000)
    ranking = discover(loaded, disc, out / "discovery", progress=False, source="datagen procedural seeds 2,000,000+")
    strips = held_out_strips(args.n_strips)
    n_heads = loaded.n_layers * loaded.n_heads
    scores = ranking.scores.flatten()
    order = ranking.order()
    bottom = order[int(len(order) * 0.5):]  # low-score half
    rng = random.Random(args.seed)
    low3 = rng.sample(bottom, 3)
    narrated = strips[:20]
    report = {
        "model": args.model,
        "strength": args.strength,
        "heads": n_heads,
        "k": 3,
        "top_heads": [(l, h, round(float(ranking.scores[l, h]), 4)) for l, h in ranking.top(8)],
        "median_score": float(scores.median()),
        "mechanism": mechanism(ranking, 3),
        "staircase": {"top": staircase(loaded, narrated, order[:3], NARRATION_PROMPT),
                      "random": staircase(loaded, narrated, low3, NARRATION_PROMPT), "random_heads": low3},
    }
    show_mechanism(report)
    if args.mechanism_only:
        out.mkdir(parents=True, exist_ok=True)
        (out / "check.json").write_text(json.dumps(report, indent=1))
        return 0
    report["tasks"] = task_accuracy(loaded, strips)
    print(json.dumps(report["tasks"], indent=1), flush=True)
    conditions = {f"top{k}": order[:k] for k in [int(x) for x in args.ks.split(",")]}
    conditions[f"random{args.k}"] = rng.sample(bottom, args.k)
    conditions["all"] = order
    report["baseline_panel1"] = report["tasks"]["strip_is_panel1"]
    report["steering"] = {}
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    for phase in phases:
        if phase not in ("all", "prefill"):
            raise SystemExit(f"--phases lists 'all' and/or 'prefill', not {phase!r}")
        for name, heads in conditions.items():
            name = name if phase == "all" else f"{name}_prefill_only"
            report["steering"][name] = redirection(loaded, strips, heads, strength=args.strength,
                                                   prefill_only=phase == "prefill")
            report["steering"][name]["heads"] = heads
            print(name, json.dumps(report["steering"][name]["all"]), report["steering"][name]["per_panel"], flush=True)
    name = f"top{args.k}_first_token_only"
    report["steering"][name] = first_token_redirection(loaded, strips, order[: args.k], strength=args.strength)
    report["steering"][name]["heads"] = order[: args.k]
    print(name, json.dumps(report["steering"][name]["all"]), report["steering"][name]["per_panel"], flush=True)
    report["seconds"] = round(time.time() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "check.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
