"""Draw the Space's bundled examples with datagen's procedural renderer (offline, seconds).

    python -m space.make_examples              # rewrites space/examples/ (committed, about 100 KB)

Strips: `datagen.make_strip(seed)` assembled as the paper does and as the
organism was trained (its `training.json`: panels 64 px high, two rows of 32
px tokens, widths drawn from its narrowest to its widest panel, 6 px white
gaps); letters on, seeds from 3,000,000: a range
that neither the organism's training pool, its held-out evaluation
(1,000,000+) nor the demo's discovery strips (2,000,000+) use. Pictures:
`datagen.make_scene`, several labelled objects for region (box) steering.
`examples.json` holds every example's file, panel boxes, captions, letters
or object boxes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from space.scene import EXAMPLES_DIR

STRIP_SEED0 = 3_000_000


def make_examples(out: Path, n_strips: int = 8, n_pictures: int = 2, panel_size: int | None = None) -> list[dict]:
    from datagen import make_scene, make_strip
    from gaze.models import ORGANISM_DIR
    from gaze.organism.check import geometry

    geo = geometry(ORGANISM_DIR)  # the shipped organism's strips
    panel_size = panel_size or geo["panel_height"]
    scale = panel_size / geo["panel_height"]
    widths = (round(geo["min_width"] * scale), round(geo["max_width"] * scale))
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n_strips):
        seed = STRIP_SEED0 + i
        strip = make_strip(seed, panel_size=panel_size, letters=True, gap=geo["gap"], widths=widths)
        file = f"strip_{i + 1}.png"
        strip.image.save(out / file, optimize=True)
        entries.append({"name": f"strip {i + 1}", "kind": "strip", "file": file, "seed": seed,
                        "panels": [list(p) for p in strip.panels], "captions": list(strip.captions),
                        "letters": list(strip.letters) if strip.letters else None})
    for i in range(n_pictures):
        seed = STRIP_SEED0 + 500 + i
        image, objects = make_scene(seed, (256, 256), n_objects=4)
        file = f"picture_{i + 1}.png"
        image.save(out / file, optimize=True)
        entries.append({"name": f"picture {i + 1}", "kind": "picture", "file": file, "seed": seed,
                        "objects": [{"label": o["label"], "box": list(o["box"])} for o in objects]})
    (out / "examples.json").write_text(json.dumps({
        "made_by": "python -m space.make_examples (datagen procedural renderer)",
        "examples": entries,
    }, indent=1))
    return entries


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=EXAMPLES_DIR)
    p.add_argument("--n-strips", type=int, default=8)
    p.add_argument("--n-pictures", type=int, default=2)
    p.add_argument("--panel-size", type=int, default=None,
                   help="panel height in px (default: the organism's; widths scale with it)")
    args = p.parse_args(argv)
    entries = make_examples(args.out, args.n_strips, args.n_pictures, args.panel_size)
    print(f"wrote {len(entries)} examples to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
