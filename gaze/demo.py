"""A terminal demo: discover a model's gaze heads, then move them, on strips it never saw.

    python -m gaze.demo                     # the bundled model organism, offline, CPU
    python -m gaze.demo --model Qwen/Qwen3-VL-2B-Instruct --device cuda --panel-size 256

Draws a few six-panel strips with datagen's procedural renderer, ranks every
head by gaze score (or uses the organism's shipped ranking), asks the
whole-strip question without steering and steered to each panel (at every
row, the published default, and at the prompt's rows only), then runs
a narration on a schedule and prints which panel the gaze heads looked at,
token by token.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from gaze.discovery import discover, summary
from gaze.generation import generate, regions_for
from gaze.models import ORGANISM_DIR, load
from gaze.ranking import Ranking
from gaze.steering import Panel, Schedule


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="organism")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--panel-size", type=int, default=64, help="panel height in px (default: %(default)s)")
    p.add_argument("--n-discovery", type=int, default=12, help="strips to rank heads on (ignored with a shipped ranking)")
    args = p.parse_args(argv)

    from datagen import make_strip

    loaded = load(args.model, device=args.device, dtype=args.dtype)
    prompts = loaded.prompts  # the organism's own (its prompts.json), else the paper's
    STRIP_QUESTION, NARRATION_PROMPT = prompts.vqa, prompts.narration

    def strip_of(seed):  # assembled as the paper does: one height, widths of their own, 6 px gaps
        return make_strip(seed, panel_size=args.panel_size, gap=6, widths=(args.panel_size, args.panel_size * 7 // 4))

    shipped = ORGANISM_DIR / "ranking.json"
    if args.model == "organism" and shipped.exists():
        ranking = Ranking.load(shipped)
        print(f"using the organism's shipped ranking ({ranking.n_strips} strips)")
    else:
        strips = [strip_of(2_000_000 + i) for i in range(args.n_discovery)]
        ranking = discover(loaded, strips, tempfile.mkdtemp(prefix="gaze-demo-"), template=prompts.discovery,
                           source="datagen procedural")
    print(summary(ranking, args.top_k))
    heads = ranking.top(args.top_k)

    strip = strip_of(1_000_000)
    print("\nheld-out strip, panel captions:")
    for k, c in enumerate(strip.captions, start=1):
        print(f"  panel {k}: {c}")
    base = generate(loaded, strip.image, STRIP_QUESTION, max_new_tokens=24)
    print(f"\nQ: {STRIP_QUESTION}\nunsteered:          {base.text}")
    for phase in ("all", "prefill"):
        print("steered at every row (the published default):" if phase == "all" else
              "steered at the prompt's rows only (the answer then runs unsteered):")
        for k in range(1, strip.n_panels + 1):
            out = generate(loaded, strip.image, STRIP_QUESTION, heads=heads, target=Panel(k), panels=strip.panels,
                           max_new_tokens=24, phase=phase)
            print(f"  to panel {k}: {out.text}" + ("  [degenerate]" if out.degenerate else ""))

    order = (3, 5, 1, 6, 2, 4)
    schedule = Schedule(tuple(Panel(k) for k in order), every=8)
    out = generate(loaded, strip.image, NARRATION_PROMPT, heads=heads, schedule=schedule, panels=strip.panels,
                   max_new_tokens=48, track=True)
    looked = out.trajectory(regions_for(out.layout, strip.panels)).argmax(-1).tolist()
    print(f"\nQ: {NARRATION_PROMPT}  (schedule {','.join(map(str, order))}, every 8 tokens)\n{out.text}")
    print("token -> scheduled panel / panel the gaze heads looked at most:")
    print("  " + " ".join(f"{piece.strip() or '_'}[{order[t] }/{looked[i] + 1}]"
                          for i, (piece, t) in enumerate(zip(out.pieces, out.targets))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
