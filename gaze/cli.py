"""The `gaze` command: discover gaze heads, steer them, watch them.

    gaze discover --model organism --strips STRIPS --n-strips 50 --out runs/organism
    gaze steer --model organism --ranking runs/organism --image strip.png --panels 6 --target 3
    gaze steer ... --schedule 2,4,3,5,1,6 --every 8 --trajectory-out traj.json
    gaze doctor --model organism --image strip.png --panels 6 --out doctor.png

Errors a user can fix (bad input: a `gaze.errors.GazeError`) print one line and
exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gaze.errors import GazeError

if TYPE_CHECKING:
    from gaze.regions import ImageLayout, RegionMap


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (unless the help already says it); descriptions keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text:
            return text
        value = action.default
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            shown = "on" if value else "off"
        elif value is None:
            shown = "none"
        elif isinstance(value, (tuple, list)):
            shown = ",".join(str(v) for v in value) or "none"
        else:
            shown = str(value)
        return f"{text} (default: {shown.replace('%', '%%')})"


def _at_least(low: int):
    """An argparse type: an integer >= `low`, refused at parse time with the fix."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small: give a whole number >= {low}")
        return value
    return parse


def _writable(flag: str, *, file: bool = False):
    """An argparse type: an output path this process can write (a folder, or a file with `file`), checked
    at parse time, before any model is loaded (`gaze.errors.check_writable`)."""
    from gaze.errors import check_writable

    def parse(text: str) -> str:
        try:
            check_writable(Path(text), flag, file=file)
        except GazeError as e:
            raise argparse.ArgumentTypeError(f"output path: {e}") from None
        return text
    return parse


def template_arg(text: str) -> str:
    """An argparse type: a panel question template naming the panel with {ordinal} (or {k}) and nothing else."""
    import string

    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
        text.format(ordinal="1st", k=1)
    except (ValueError, IndexError, KeyError, AttributeError) as e:
        bad = f"unknown field {{{e.args[0]}}}" if isinstance(e, KeyError) else f"not a template ({e})"
        raise argparse.ArgumentTypeError(f"{text!r}: {bad}; name the queried panel with {{ordinal}} (or {{k}}), "
                                         "e.g. 'What is happening in the {ordinal} panel from the left?'") from None
    if not fields & {"ordinal", "k"}:
        raise argparse.ArgumentTypeError(f"{text!r} does not name the queried panel: put {{ordinal}} (or {{k}}) in "
                                         "it, e.g. 'What is happening in the {ordinal} panel from the left?'")
    return text


def variant_arg(text: str) -> str:
    """An argparse type: a score variant of `gaze.scoring.VARIANTS`."""
    from gaze.scoring import VARIANTS

    if text not in VARIANTS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a score variant: use one of {', '.join(VARIANTS)}")
    return text


MAX_STRENGTH = 1e6  # past this the bias only loses float precision (1e4 already saturates the softmax)


def _number(ok, refusal: str):
    """An argparse type: a number for which `ok(value)` holds, else refused at parse time with `refusal`
    (a format string of `text`, which says the fix)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(refusal.format(text=text))
        return value
    return parse


# a finite steering strength |B| <= MAX_STRENGTH
strength_arg = _number(lambda v: math.isfinite(v) and abs(v) <= MAX_STRENGTH,
                       f"{{text}} is not a usable strength: give a finite number within +-{MAX_STRENGTH:g} (1e4, "
                       "the default, saturates the softmax)")


def device_arg(text: str) -> str:
    """An argparse type: a torch device this machine has (checked before any model is loaded)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device; use --device cpu")
        if device.index is not None and device.index >= n:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise argparse.ArgumentTypeError(f"{text}: not a device gaze runs on; use cpu, cuda, cuda:N or mps")
    return text


def dtype_arg(text: str) -> str:
    """An argparse type: a dtype name `gaze.models.load` takes (`gaze.models.DTYPES`)."""
    from gaze.models import DTYPES

    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a dtype: use one of {', '.join(DTYPES)}")
    return text


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="organism", help="hub id OWNER/NAME, local folder, or 'organism', the "
                   "bundled model organism")
    p.add_argument("--device", default=None, type=device_arg,
                   help="cpu, cuda, cuda:1, mps ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", type=dtype_arg, help="float32 | bfloat16 | float16")
    p.add_argument("--device-map", default=None,
                   help="'auto' to spread a large model over all GPUs (default: none, the whole model on --device)")


def _distributed():
    """Accelerate's process state when launched with `accelerate launch` on several processes, else None."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState()


def _load(args, state=None):
    from gaze.models import load

    device = args.device if state is None or args.device_map else str(state.device)
    return load(args.model, device=device, dtype=args.dtype, device_map=args.device_map)


def cmd_discover(args) -> int:
    from gaze.discovery import discover, summary
    from gaze.strips import check_source, load_strips

    check_source(args.strips)  # a missing folder or an unreachable hub id: before the model loads
    boxes = [_parse_box(b) for b in args.panel_box] if args.panel_box else None
    state = _distributed()
    loaded = _load(args, state)
    align = loaded.family.merged_patch(loaded.processor)
    strips = load_strips(args.strips, n_strips=args.n_strips, align=align, gap=args.gap, split=args.split,
                         start=args.start, skip_bad=args.skip_bad, panel_boxes=boxes)
    if args.mapping == "proportional":  # the official code's column split (one row of panels), as boxes
        from dataclasses import replace

        from gaze.generation import proportional_panels

        strips = [replace(s, panels=proportional_panels(loaded, s)) for s in strips]
    shard = (state.process_index, state.num_processes) if state else (0, 1)
    ranking = discover(loaded, strips, args.out, template=args.prompt or loaded.prompts.discovery, source=args.strips,
                       n_strips=args.n_strips,
                       progress=not args.quiet, shard=shard, barrier=state.wait_for_everyone if state else None,
                       variant=args.variant)
    if ranking is None:  # another process merges
        return 0
    print(summary(ranking, args.top))
    ranking.save_pretrained(Path(args.out) / "hub")
    if args.push_to_hub:
        print(f"pushed: {ranking.push_to_hub(args.push_to_hub, private=args.private)}")
    print(f"ranking saved to {Path(args.out) / 'ranking.json'}")
    return 0


def _parse_box(text: str) -> tuple[float, float, float, float]:
    import math

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise GazeError(f"bad box {text!r}: give x0,y0,x1,y1 in pixels (four finite numbers)")
    return values  # type: ignore[return-value]


def _ranking_for(args):
    """The --ranking, read and checked against --model before any model is loaded (shape: after, `check`)."""
    from gaze.ranking import Ranking

    return Ranking.from_pretrained(args.ranking).check(None, args.model)


def _check_panel(flag: str, k: int | None, n_panels: int) -> None:
    if k is not None and k > n_panels:
        raise GazeError(f"{flag} {k} is out of range: the image is split into --panels {n_panels}, so give 1..{n_panels}")


def cmd_steer(args) -> int:
    from gaze.generation import generate, regions_for
    from gaze.steering import Box, Panel, parse_schedule
    from gaze.strips import equal_panels, open_image

    if args.schedule:
        schedule = parse_schedule(args.schedule, every=args.every, at_sentence=args.at_sentence, n_panels=args.panels)
        target = None
    else:
        schedule = None
        if args.box:
            target = Box(_parse_box(args.box))
        elif args.target is not None:
            _check_panel("--target", args.target, args.panels)
            target = Panel(args.target)
        else:
            raise GazeError("give --target K, --box x0,y0,x1,y1 or --schedule 4,2,1,...")
    ranking = _ranking_for(args)
    n_heads = ranking.shape[0] * ranking.shape[1]
    if args.top_k is not None and args.top_k > n_heads:
        raise GazeError(f"--top-k {args.top_k} is more than the model's {n_heads} heads: give 1..{n_heads}")
    image = open_image(args.image)
    panels = equal_panels(image.size, args.panels)
    loaded = _load(args)
    ranking.check(loaded.model)
    k = args.top_k if args.top_k is not None else ranking.default_k
    if args.top_k is None:
        print(f"steering the top {k} gaze heads of {n_heads} (the paper's share, 100 of 1,152; --top-k to choose)")
    heads = ranking.top(k)
    common = dict(max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                  no_repeat_ngram_size=args.no_repeat_ngram_size)
    prompt = args.prompt or loaded.prompts.vqa
    base = generate(loaded, image, prompt, **common)
    steered = generate(loaded, image, prompt, heads=heads, target=target, schedule=schedule, panels=panels,
                       strength=args.strength, mode=args.mode, phase=args.phase, track=True, **common)
    print(f"unsteered: {base.text}")
    print(f"steered:   {steered.text}" + ("   [degenerate]" if steered.degenerate else ""))
    if args.trajectory_out:
        regions = regions_for(steered.layout, panels)
        traj = steered.trajectory(regions)
        out = Path(args.trajectory_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"prompt": prompt, "text": steered.text, "pieces": steered.pieces, "targets": steered.targets,
                   "regions": list(regions.names), "trajectory": traj.tolist(),
                   "trajectory_normalised": steered.trajectory(regions, normalise=True).tolist(),
                   "heads": [list(h) for h in heads]}
        out.write_text(json.dumps(payload, indent=1))
        from gaze.plots import plot_trajectory

        png = plot_trajectory(traj, out.with_suffix(".png"), title=f"top-{k} gaze heads", targets=steered.targets,
                              schedule=schedule)
        print(f"trajectory saved to {out} and {png}")
    return 0


def cmd_inspect(args) -> int:
    from gaze.generation import generate, regions_for
    from gaze.plots import MAX_GRID_WORDS, write_inspection
    from gaze.steering import Panel
    from gaze.strips import equal_panels, open_image
    from gaze.tracking import Inspection, memory_bytes

    _check_panel("--target", args.target, args.panels)
    ranking = _ranking_for(args)
    image = open_image(args.image)
    panels = equal_panels(image.size, args.panels)
    loaded = _load(args)
    ranking.check(loaded.model)
    heads = ranking.top(args.top_k)
    target = Panel(args.target) if args.target else None
    out = generate(loaded, image, args.prompt or loaded.prompts.vqa, heads=heads if target else (), target=target,
                   panels=panels,
                   max_new_tokens=args.max_new_tokens, track=heads)
    inspection = Inspection(out, regions_for(out.layout, panels))
    folder = write_inspection(inspection, image, args.out, words=args.word)
    need = memory_bytes(args.max_new_tokens, len(heads), out.layout.n_tokens)
    print(f"answer: {out.text}")
    words = inspection.words()
    for word in words:
        k, share = inspection.region_of(word.tokens)
        print(f"  {word.text:<16} -> {inspection.regions.names[k]} ({share:.0%} of its image attention)")
    print(f"kept {len(heads)} heads x {out.layout.n_tokens} image tokens at float16: "
          f"{need / 2**20:.2f} MiB for {args.max_new_tokens} tokens")
    if len(words) > MAX_GRID_WORDS:
        print(f"words.png shows the first {MAX_GRID_WORDS} of {len(words)} words; --word WORD writes a heat map "
              "for any word")
    print(f"written to {folder}")
    return 0


def cmd_doctor(args) -> int:
    from gaze.generation import prepare_inputs
    from gaze.plots import draw_layout
    from gaze.regions import box_regions, equal_panel_regions
    from gaze.strips import open_image

    boxes = [_parse_box(b) for b in args.box] if args.box else None
    if boxes is None and args.panels % args.rows:
        raise GazeError(f"--panels {args.panels} do not fill --rows {args.rows} equally: give a panel count "
                        "divisible by the rows")
    image = open_image(args.image)
    loaded = _load(args)
    _, layout = prepare_inputs(loaded, image, "x")
    regions = box_regions(layout, boxes) if boxes else equal_panel_regions(layout, args.panels, args.rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_layout(image, layout, regions).save(out)
    print(_describe(layout, regions))
    print(f"picture saved to {out}")
    return 0


def _describe(layout: ImageLayout, regions: RegionMap | None) -> str:
    """One line per region: how many tokens it owns."""
    lines = [f"{layout.n_tokens} image tokens at positions {int(layout.positions[0])}..{int(layout.positions[-1])}"
             + (f", grid {layout.grid[0]}x{layout.grid[1]}" if layout.grid else "")]
    if regions is not None:
        for k, name in enumerate(regions.names):
            lines.append(f"  {name}: {int(regions.membership[k].sum())} tokens")
        unassigned = int((regions.assignment() == -1).sum())
        if unassigned:
            lines.append(f"  in no region: {unassigned} tokens")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from gaze.prompts import PANEL_QUESTION, STRIP_QUESTION

    parser = argparse.ArgumentParser(prog="gaze", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)

    d = command("discover", "rank every head of the model by gaze score (resumable)")
    _add_model_args(d)
    d.add_argument("--strips", required=True,
                   help="comic folders (comicN/p1.png .. p6.png), a dataset (save_to_disk or Parquet folder, or a hub "
                        "id OWNER/NAME), one image split into panels, or comics:PATH[@SEED] (windows sampled from "
                        "the COMICS corpus, as the paper discovers) (required)")
    d.add_argument("--n-strips", type=_at_least(1), default=None, help="how many strips (default: all)")
    d.add_argument("--start", type=_at_least(0), default=0, help="first strip / row index")
    d.add_argument("--split", default=None,
                   help="dataset split, e.g. train (default: the only split; required when there are several)")
    d.add_argument("--out", required=True, type=_writable("--out"),
                   help="output folder: per-strip files, ranking.json, hub/ (required; rerun to resume)")
    d.add_argument("--prompt", default=None, type=template_arg,
                   help="panel question template; {ordinal} (1st, 2nd, ...) or {k} (1, 2, ...) names the queried panel "
                        f"(default: the model folder's prompts.json, else the paper's: {PANEL_QUESTION!r})")
    d.add_argument("--gap", type=_at_least(0), default=0, help="pixels between stitched panels")
    d.add_argument("--panel-box", action="append", default=None, metavar="x0,y0,x1,y1",
                   help="with a single image: a panel box in reading order, repeat for each panel "
                        "(default: equal panels)")
    d.add_argument("--skip-bad", action="store_true", help="skip (and report) strips with missing or unreadable panels")
    d.add_argument("--mapping", default="centre", choices=["centre", "proportional"],
                   help="which image tokens a panel owns: centre (its box holds the token's cell centre) or "
                        "proportional (the official code's: token columns split in proportion to the panel widths, "
                        "one row of panels)")
    d.add_argument("--top", type=_at_least(0), default=10, help="how many top heads to print")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.add_argument("--variant", default="raw", type=variant_arg,
                   help="score: raw (the paper's), selectivity, value_weighted or sink_excluded")
    d.add_argument("--push-to-hub", default=None, metavar="OWNER/NAME",
                   help="upload the ranking folder to this model repo (token from HF_TOKEN; default: no upload)")
    d.add_argument("--private", action="store_true", help="make the Hub repo private")
    d.set_defaults(func=cmd_discover)

    s = command("steer", "generate with the gaze heads steered to a panel, box or schedule")
    _add_model_args(s)
    s.add_argument("--ranking", required=True,
                   help="ranking folder or ranking.json from `gaze discover`, or a hub id OWNER/NAME (required)")
    s.add_argument("--image", required=True, help="the image to ask about (required)")
    s.add_argument("--panels", type=_at_least(1), default=6, help="split the image into N equal panels, left to right")
    s.add_argument("--target", type=_at_least(1), default=None, help="panel to steer to, 1..--panels (default: none)")
    s.add_argument("--box", default=None, help="pixel box x0,y0,x1,y1 to steer to (default: none)")
    s.add_argument("--schedule", default=None, help="panels in order, e.g. 2,4,3,5,1,6 (default: none)")
    s.add_argument("--every", type=_at_least(1), default=50, help="tokens per schedule entry")
    s.add_argument("--at-sentence", action="store_true", help="switch at the next sentence end after --every tokens")
    s.add_argument("--top-k", type=_at_least(1), default=None,
                   help="number of gaze heads to steer (default: the paper's share of the model's heads, "
                        "ceil(heads x 100 / 1152), at least 1)")
    s.add_argument("--strength", type=strength_arg, default=1e4, help="steering bias B")
    s.add_argument("--mode", default="boost", choices=["boost", "suppress", "suppress_text"],
                   help="boost the target's image tokens, suppress them, or suppress the text tokens")
    s.add_argument("--phase", default="all", choices=["all", "prefill", "decode"],
                   help="when to bias: every row (default), the prompt's rows only (the answer then goes on "
                        "unsteered), or the answer's rows only")
    s.add_argument("--prompt", default=None,
                   help=f"the question (default: the model folder's prompts.json, else the paper's: {STRIP_QUESTION!r})")
    s.add_argument("--max-new-tokens", type=_at_least(1), default=64, help="answer length limit in tokens")
    s.add_argument("--repetition-penalty", type=float, default=None,
                   help="generation's repetition penalty (default: none, the model's own)")
    s.add_argument("--no-repeat-ngram-size", type=_at_least(0), default=None,
                   help="forbid repeating n-grams of this size (default: none)")
    s.add_argument("--trajectory-out", default=None, type=_writable("--trajectory-out", file=True),
                   help="save the trajectory as this JSON file, with a PNG beside it (default: not saved)")
    s.set_defaults(func=cmd_steer)

    i = command("inspect", "per-word heat maps of the gaze heads over the image")
    _add_model_args(i)
    i.add_argument("--ranking", required=True,
                   help="ranking folder or ranking.json from `gaze discover`, or a hub id OWNER/NAME (required)")
    i.add_argument("--image", required=True, help="the image to ask about (required)")
    i.add_argument("--panels", type=_at_least(1), default=6, help="split the image into N equal panels")
    i.add_argument("--prompt", default=None,
                   help=f"the question (default: the model folder's prompts.json, else the paper's: {STRIP_QUESTION!r})")
    i.add_argument("--top-k", type=_at_least(1), default=8, help="gaze heads to inspect")
    i.add_argument("--target", type=_at_least(1), default=None,
                   help="steer to this panel while inspecting (default: none, unsteered)")
    i.add_argument("--word", action="append", default=None,
                   help="also write a heat map PNG for this word of the answer (repeatable; default: none)")
    i.add_argument("--max-new-tokens", type=_at_least(1), default=64, help="answer length limit in tokens")
    i.add_argument("--out", default="inspect", type=_writable("--out"),
                   help="output folder: answer.html, words.png, word_*.png")
    i.set_defaults(func=cmd_inspect)

    from gaze.eval.cli import register as register_eval

    register_eval(sub)

    from gaze.eval.probe import add_parser as add_probe

    add_probe(sub)

    doc = command("doctor", "draw the image-token grid and the panel/box assignment over an image")
    _add_model_args(doc)
    doc.add_argument("--image", required=True, help="the image to draw over (required)")
    doc.add_argument("--panels", type=_at_least(1), default=6, help="split into N equal panels")
    doc.add_argument("--rows", type=_at_least(1), default=1, help="panel rows (e.g. 2 for a 2x3 grid)")
    doc.add_argument("--box", action="append", default=None,
                     help="x0,y0,x1,y1 (repeatable) instead of panels (default: none, equal panels)")
    doc.add_argument("--out", default="doctor.png", type=_writable("--out", file=True), help="the PNG to write")
    doc.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GazeError as e:
        print(f"gaze {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        kept = (f"what was finished is kept in {out}; rerun the same command to resume" if out and args.command in
                ("discover", "eval") else "nothing was written")
        print(f"gaze {args.command}: interrupted: {kept}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
