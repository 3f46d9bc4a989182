"""`gaze eval`: run the paper's evaluation protocols and write the report.

    gaze eval --model organism --ranking gaze/organism/weights --strips procedural:eval --n-strips 50 --out reports/organism
    gaze eval ... --protocols vqa,sweep --conditions gaze,random,none --ks 1,2,4,8
    gaze eval --out reports/organism --report-only      # redraw README.md and figures from aggregate.json

Resumable: rerun the same command after an interruption and it continues.
Offline by default (`--judge caption`); `--judge llm --judge-endpoint URL`
reads its key from $OPENAI_API_KEY. Judges that see the strip, as the paper's:

    gaze eval ... --judge vlm --judge-model Qwen/Qwen3-VL-8B-Instruct      # local, scored by likelihood
    gaze eval ... --judge hosted --judge-api anthropic --judge-model claude-sonnet-4-6
    gaze eval --out OUT --rejudge --judge hosted ...      # re-judge a finished run, no model run
 Wired into `gaze` by `register(subparsers)`;
`python -m gaze.eval.cli ...` runs it on its own.
"""

from __future__ import annotations

import argparse
import sys

from gaze.cli import HelpFormatter, _at_least, _number, _writable, device_arg, dtype_arg, strength_arg
from gaze.eval.config import ASSEMBLIES, CONDITIONS, IDENTICAL_UNITS, MAPPINGS, PRESETS, PROTOCOLS, EvalConfig


def _ints(text: str) -> tuple[int, ...]:
    """An argparse type: positive integers separated by commas (head counts, panels)."""
    parts = text.replace(" ", "").split(",")
    if any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty entry: give integers separated by single commas, "
                                         "e.g. 1,2,4,8")
    try:
        values = tuple(int(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers separated by commas, e.g. 1,2,4,8") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every entry must be at least 1")
    return values


def _strengths(text: str) -> tuple[float, ...]:
    """An argparse type: positive steering biases separated by commas."""
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers separated by commas, e.g. 1,10,100,1000,10000") from None
    if any(not 0 < v <= 1e9 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every bias must be above 0 (and at most 1e9)")
    return values


_fraction_pct = _number(lambda v: 0 < v <= 100, "{text}: give a percentage above 0 and at most 100")  # in (0, 100]


def _names(allowed: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(v for v in text.replace(" ", "").split(",") if v)
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(allowed)}")
        return names

    return parse


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give WIDTHxHEIGHT in pixels, e.g. 384x192") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be at least 1 pixel")
    return (w, h)


def _band(text: str) -> tuple[float, float]:
    """An argparse type: LOW-HIGH (or LOW,HIGH) fractions of depth with 0 <= LOW < HIGH <= 1."""
    try:
        lo, hi = (float(v) for v in text.replace(",", "-").split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give LOW-HIGH fractions of depth, e.g. 0.55-1.0") from None
    if not 0 <= lo < hi <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= LOW < HIGH <= 1")
    return (lo, hi)


def _question(text: str) -> tuple[str, str]:
    protocol, sep, question = text.partition("=")
    if not sep or protocol not in PROTOCOLS or not question.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: write PROTOCOL=QUESTION with PROTOCOL one of {','.join(PROTOCOLS)}")
    return (protocol, question)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = EvalConfig()
    p.add_argument("--model", default=d.model, help="hub id OWNER/NAME, local folder, or 'organism', the bundled "
                   "model organism")
    p.add_argument("--preset", default=d.preset, choices=("auto", *PRESETS),
                   help="the protocol's lengths, phases, strips, mapping and rules: 'paper' (the paper's, as its "
                        "official code runs them; docs/paper-protocol.md), 'organism' (the shipped tiny model's "
                        "short ones), or auto: organism for 'organism' or a folder with prompts.json, else paper. "
                        "Flags given explicitly win")
    p.add_argument("--ranking", default=None,
                   help="ranking folder or ranking.json from `gaze discover` (default: discover into OUT/discovery)")
    p.add_argument("--strips", default=d.strips,
                   help="procedural:eval (datagen, held-out seeds), procedural:SEED0, comic folders, a dataset, an "
                        "image, or comics:PATH[@SEED] (the COMICS corpus)")
    p.add_argument("--n-strips", type=_at_least(1), default=d.n_strips, help="evaluation strips")
    p.add_argument("--out", default=d.out, type=_writable("--out"),
                   help="output folder (resumable): records, aggregate, figures, README.md")
    p.add_argument("--protocols", type=_names(PROTOCOLS), default=d.protocols, help=f"some of {','.join(PROTOCOLS)}")
    p.add_argument("--conditions", type=_names(CONDITIONS), default=d.conditions,
                   help=f"head sets to steer, some of {','.join(CONDITIONS)}")
    p.add_argument("--top-k", type=_at_least(1), default=None,
                   help="K heads per condition (default: the paper's share, 100 of 1,152 heads)")
    p.add_argument("--ks", type=_ints, default=d.ks, help="K values of the head-count sweep")
    p.add_argument("--strengths", type=_strengths, default=d.strengths,
                   help="biases B of the strength sweep (--protocols strength; default: the paper's 1,10,...,10000)")
    p.add_argument("--paraphrases", default=None, metavar="FILE",
                   help="the paraphrase sweep's wordings, one a line ({ordinal}/{k}: discovery); default: the paper's")
    p.add_argument("--targets", type=_ints, default=None,
                   help="panels to steer to, 1..the strips' panel count (default: all)")
    p.add_argument("--every", type=_at_least(1), default=None,
                   help="dynamic narration: tokens per schedule entry (default: the preset's; paper 50, organism 10)")
    p.add_argument("--at-sentence", action="store_true",
                   help="dynamic narration: switch at the first sentence end after --every tokens")
    p.add_argument("--seed", type=int, default=d.seed, help="random heads, derangements, bootstrap")
    p.add_argument("--judge", default=d.judge, choices=["caption", "letter", "embedding", "llm", "vlm", "hosted"],
                   help="caption (offline, default) | letter (exact; asks for the overlaid letter) | embedding | llm | "
                        "vlm (a local VLM sees the strip: --judge-model) | hosted (a hosted VLM sees it: --judge-api)")
    p.add_argument("--judge-model", default=None,
                   help="embedding model, or LLM (endpoint model name or local folder) (default: the judge's own)")
    p.add_argument("--judge-endpoint", default=None,
                   help="OpenAI-compatible base URL for --judge llm; the key comes from $OPENAI_API_KEY and is sent "
                        "only over https or to a loopback server (default: none)")
    p.add_argument("--judge-allow-http", action="store_true",
                   help="send the judge's API key over plain http to a non-loopback --judge-endpoint")
    # judges that see the image
    p.add_argument("--judge-api", default=d.judge_api, choices=["openai", "anthropic"],
                   help="--judge hosted: OpenAI chat completions (also vLLM and compatible servers) or Anthropic messages")
    p.add_argument("--judge-key-env", default=None, metavar="VAR",
                   help="environment variable holding the hosted judge's key (default: OPENAI_API_KEY or "
                        "ANTHROPIC_API_KEY); the key itself is never a flag or written to disk")
    p.add_argument("--judge-retries", type=_at_least(0), default=d.judge_retries,
                   help="retries of a hosted judge call on HTTP 429, 5xx or a timeout, with exponential backoff")
    p.add_argument("--judge-calibration", default=d.judge_calibration, choices=["captions", "answers", "none"],
                   help="calibrate an image judge first on the strips' captions or the model's own panel answers")
    p.add_argument("--judge-calibration-strips", type=_at_least(1), default=d.judge_calibration_strips,
                   help="strips (each with all its panels) for that calibration")
    p.add_argument("--judge-min-accuracy", type=float, default=d.judge_min_accuracy,
                   help="refuse an image judge whose calibration accuracy is below this (0 accepts any)")
    p.add_argument("--rejudge", action="store_true",
                   help="re-judge the answers already in --out with --judge (no model is run) and re-aggregate into "
                        "OUT/judges/NAME/aggregate.json")
    p.add_argument("--max-new-tokens", type=_at_least(1), default=None,
                   help="short answers (vqa, sweep, region) (default: the preset's; paper 15, organism 24)")
    p.add_argument("--narration-tokens", type=_at_least(1), default=None,
                   help="static narration answers (default: the preset's; paper 100, organism 64)")
    p.add_argument("--strength", type=strength_arg, default=d.strength, help="steering bias B")
    p.add_argument("--mode", default=d.mode, choices=["boost", "suppress", "suppress_text"],
                   help="boost the target's image tokens, suppress them, or suppress the text tokens")
    p.add_argument("--phase", default=None, choices=["all", "prefill", "decode"],
                   help="when to bias static targets: all rows (both presets), the prompt's rows only, or decode "
                        "steps only")
    p.add_argument("--dynamic-phase", default=None, choices=["all", "decode"],
                   help="when to bias dynamic schedules (default: the preset's; paper decode, organism as --phase)")
    p.add_argument("--mapping", default=None, choices=MAPPINGS,
                   help="which image tokens a panel owns: centre (its box holds the cell centre; organism) or "
                        "proportional (grid columns split in proportion to panel widths, one row of panels; paper)")
    p.add_argument("--identical-threshold", type=float, default=None,
                   help="a steered answer at least this Jaccard-similar to the unsteered one is a miss (default: "
                        "0.85, the official code's; above 1, e.g. 1.01, turns the rule off)")
    p.add_argument("--identical-tokens", default=None, choices=IDENTICAL_UNITS,
                   help="what that Jaccard counts: word (normalised words, default) or token (the model's tokenizer)")
    p.add_argument("--random-percentile", type=_fraction_pct, default=d.random_percentile,
                   help="random heads come from this bottom share of gaze scores, in percent")
    # the random condition's control heads (gaze.eval.controls)
    p.add_argument("--control", default=d.control, choices=("bottom-p", "layer-band", "layer-matched"),
                   help="random heads: bottom-p (bottom --random-percentile of scores), layer-band (uniform over "
                        "--control-band's layers) or layer-matched (the gaze heads' layer histogram); never the top K")
    p.add_argument("--control-draws", type=_at_least(1), default=d.control_draws,
                   help="seeded draws of the random heads, each its own condition run (mean, spread, p-value)")
    p.add_argument("--control-band", type=_band, default=d.control_band, metavar="LOW-HIGH",
                   help="layer-band: fractions of depth, e.g. 0.55-1.0 (the paper's layers 20-35 of 36)")
    p.add_argument("--control-widen", action="store_true",
                   help="bottom-p: widen a pool under 2K heads to 2K heads (default: keep it and warn)")
    p.add_argument("--prior-strips", type=_at_least(1), default=d.prior_strips,
                   help="strips for the image/localization heads")
    p.add_argument("--scenes", default=d.scenes, help="region protocol: procedural[:SEED0], strip-objects, a folder, "
                   "or coco:PATH (a COCO folder with annotations/instances_*.json: the paper's protocol)")
    p.add_argument("--n-scenes", type=_at_least(1), default=None,
                   help="scenes for the region protocol (default: --n-strips)")
    p.add_argument("--n-objects", type=_at_least(1), default=d.n_objects, help="objects per procedural scene")
    p.add_argument("--scene-size", type=_size, default=d.scene_size, help="procedural scene size WxH")
    p.add_argument("--panel-size", type=_at_least(1), default=None,
                   help="procedural strips: panel height in pixels (default: the preset's; paper 256, organism 64)")
    p.add_argument("--assembly", default=None, choices=ASSEMBLIES,
                   help="procedural strips: 'paper' (common height, widths of their own, 6 px gaps inserted; "
                        "organism), 'official' (height and widths rounded to 32 px, 6 px white painted over each "
                        "seam; paper preset) or 'aligned' (square panels on the token grid)")
    p.add_argument("--question", type=_question, action="append", default=[], metavar="PROTOCOL=TEXT",
                   help="replace a protocol's question (repeatable; default: the paper's questions)")
    p.add_argument("--discovery-strips", default=d.discovery_strips, help="strips for discovery when --ranking is not given")
    p.add_argument("--n-discovery", type=_at_least(1), default=d.n_discovery, help="how many")
    p.add_argument("--n-boot", type=_at_least(1), default=d.n_boot, help="bootstrap resamples")
    p.add_argument("--device", default=None, type=device_arg,
                   help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=d.dtype, type=dtype_arg, help="float32 | bfloat16 | float16")
    p.add_argument("--device-map", default=None,
                   help="'auto' to spread a large model over all GPUs (default: none, the whole model on --device)")
    p.add_argument("--limit", type=_at_least(1), default=None,
                   help="stop after this many new generations, rerun to continue (default: no limit)")
    p.add_argument("--report-only", action="store_true", help="only redraw README.md and figures from OUT")
    p.add_argument("--no-report", action="store_true", help="skip README.md and figures")
    p.add_argument("--title", default=None, help="report title (default: from the model and the run)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(
        model=args.model, preset=args.preset, ranking=args.ranking, strips=args.strips, n_strips=args.n_strips,
        out=args.out,
        protocols=tuple(args.protocols), conditions=tuple(args.conditions), top_k=args.top_k, ks=tuple(args.ks),
        strengths=tuple(args.strengths), paraphrases=args.paraphrases,
        targets=tuple(args.targets) if args.targets else None, every=args.every, at_sentence=args.at_sentence,
        seed=args.seed, judge=args.judge,
        judge_model=args.judge_model, judge_endpoint=args.judge_endpoint, judge_allow_http=args.judge_allow_http,
        judge_api=args.judge_api, judge_key_env=args.judge_key_env, judge_retries=args.judge_retries,
        judge_calibration=args.judge_calibration, judge_calibration_strips=args.judge_calibration_strips,
        judge_min_accuracy=args.judge_min_accuracy,
        max_new_tokens=args.max_new_tokens,
        narration_tokens=args.narration_tokens, strength=args.strength, mode=args.mode,
        phase=args.phase, dynamic_phase=args.dynamic_phase, mapping=args.mapping,
        identical_threshold=args.identical_threshold, identical_tokens=args.identical_tokens,
        random_percentile=args.random_percentile, prior_strips=args.prior_strips, scenes=args.scenes,
        n_scenes=args.n_scenes, n_objects=args.n_objects, scene_size=tuple(args.scene_size),
        panel_size=args.panel_size, assembly=args.assembly, questions=tuple(args.question), discovery_strips=args.discovery_strips,
        n_discovery=args.n_discovery, n_boot=args.n_boot, device=args.device, dtype=args.dtype,
        device_map=args.device_map,
        control=args.control, control_draws=args.control_draws, control_band=tuple(args.control_band),
        control_widen=args.control_widen,
    ).check()


def summary(agg: dict) -> str:
    """A few lines for the terminal: the headline accuracy of each protocol per condition."""
    from gaze.eval.report import pct

    lines = []
    for protocol, by_cond in agg.get("protocols", {}).items():
        parts = []
        for c, e in by_cond.items():
            if protocol == "sweep":
                curve = sorted(e.items(), key=lambda x: int(x[0]))
                parts.append(f"{c} " + " ".join(f"K{k}={pct(v['accuracy'])}" for k, v in curve))
            elif protocol in ("strength", "paraphrase"):
                values = [pct(v["accuracy"]) for v in e.values()]
                parts.append(f"{c} " + (" ".join(f"B{b}={a}" for b, a in zip(e, values)) if protocol == "strength"
                                        else "/".join(values)))
            elif protocol == "dynamic":
                rho = e["spearman"]["mean"]
                parts.append(f"{c} {pct(e['segment_accuracy'])} rho={'n/a' if rho is None else f'{rho:.2f}'}")
            else:
                parts.append(f"{c} {pct(e['accuracy'])}")
        lines.append(f"{protocol:>9}: " + ", ".join(parts))
    if not agg.get("meta", {}).get("complete", True):
        lines.append("incomplete: rerun the same command to continue")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from gaze.eval.report import write_report

    if args.report_only:
        print(f"report written to {write_report(args.out, title=args.title)}")
        return 0
    from gaze.eval.protocols import check_targets, run_eval

    cfg = config_from_args(args)
    if args.rejudge:
        from gaze.eval.image_judges import rejudge

        agg = rejudge(cfg, progress=not args.quiet)
        print(summary(agg))
        print(f"judged by {agg['meta']['judge']}: {cfg.out}/judges/ holds its aggregate and calibration")
        return 0
    if cfg.strips.startswith("procedural:"):  # their panel count is known before the model loads
        from datagen.story import N_PANELS

        check_targets(cfg.targets, N_PANELS)
    if "region" in cfg.protocols and cfg.scenes.startswith("coco:"):  # a malformed folder fails before the model loads
        from gaze.eval.coco import check_coco_source

        check_coco_source(cfg.scenes)
    agg = run_eval(cfg, limit=args.limit, progress=not args.quiet)
    print(summary(agg))
    if not args.no_report:
        print(f"report written to {write_report(args.out, title=args.title)}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `eval` subcommand to a `gaze` argparse subparsers object."""
    p = subparsers.add_parser("eval", help="evaluate steering: the paper's protocols, judged offline, with a report",
                              description=__doc__, formatter_class=HelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    from gaze.errors import GazeError

    parser = argparse.ArgumentParser(prog="gaze")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except GazeError as e:
        print(f"gaze eval: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
