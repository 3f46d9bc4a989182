"""Soak the Space in-process: N requests from many visitors, resident memory (RSS) at start and end.

    python -m benchmarks.bench_space_soak                         # 1000 requests, the organism, 300 visitors
    python -m benchmarks.bench_space_soak --requests 200 --tokens 8

Each request is what a visitor's click runs: the page's handler functions
(`space.handlers`, `space.scene`) with the visitor's state read from and
written to Gradio's own `StateHolder`, set up as `app.py` launches it
(`launch_options`: at most `GAZE_MAX_SESSIONS` visitors, states dropped after
`GAZE_SESSION_TTL` s). The mix, in turn: an upload (a fresh image, 300 px to
1800 px wide), a panel answer, a click on a word of the last answer, a
schedule or box answer, and a refused input (a header bomb, a box with `inf`).
No network: nothing leaves the process.

It is a measurement, not a test: RSS after the warm-up (model loaded, one
request of each kind) and after the last request, their ratio, the same from
the moment the session cap filled (memory held by sessions grows until then,
by design), and what the kept sessions hold (`space.limits.session_nbytes`).
"Trimmed" figures are taken after `gc.collect()` and glibc's `malloc_trim(0)`,
which hands freed heap back to the system: growth that survives the trim is
live memory, growth that does not was the allocator's. (A trim at each
checkpoint also lowers the untrimmed figures after it: compare untrimmed runs
only with untrimmed runs of an older version of this script.)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import random
import tempfile
import time
from pathlib import Path

from PIL import Image


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def trimmed_rss_mb() -> float:
    """RSS after a garbage collection and glibc's `malloc_trim(0)`: freed heap handed back, so what is left is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: plain RSS
        pass
    return rss_mb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests in all (default 1000)")
    parser.add_argument("--visitors", type=int, default=300, help="distinct visitors, in turn (default 300)")
    parser.add_argument("--model", default="organism", help="model id or folder (default organism)")
    parser.add_argument("--tokens", type=int, default=6, help="new tokens per answer (default 6)")
    parser.add_argument("--max-sessions", type=int, default=None, help="default: GAZE_MAX_SESSIONS or 100")
    parser.add_argument("--session-ttl", type=float, default=None, help="default: GAZE_SESSION_TTL or 3600")
    args = parser.parse_args()
    if args.requests < 1 or args.visitors < 1 or args.tokens < 1:
        parser.error("--requests, --visitors and --tokens must be at least 1")

    import torch
    from gradio.state_holder import StateHolder

    from gaze.steering import Panel
    from space import handlers as h
    from space.limits import session_nbytes
    from space.scene import (InputError, example_names, live_scene, load_example, parse_box, point_target,
                             scene_from_upload)
    from space.state import ModelHolder, Settings, launch_options
    from space.ui import build_demo

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    settings = Settings.from_env(model=args.model, device="cpu", max_sessions=args.max_sessions,
                                 session_ttl=args.session_ttl)
    ready = ModelHolder(settings).get()
    demo = build_demo(settings)
    demo.state_session_capacity = launch_options(settings)["state_session_capacity"]  # as launch() sets it
    states = StateHolder()
    states.set_blocks(demo)
    scene_id, record_id = (b._id for b in demo.blocks.values() if type(b).__name__ == "State")
    strips = [load_example(n) for n in example_names() if n.startswith("strip")]
    tmp = Path(tempfile.mkdtemp(prefix="space-soak-"))
    bomb = tmp / "bomb.png"
    Image.new("1", (12_000, 12_000)).save(bomb, optimize=True)
    rng = random.Random(0)
    controls = h.Controls(k=3, max_new_tokens=args.tokens)
    counts = {"upload": 0, "answer": 0, "word": 0, "refused": 0}

    def request(i: int) -> None:
        visitor = f"visitor-{i % args.visitors}"
        session = states[visitor]
        scene = session[scene_id]
        if scene is None:  # a new visitor, or one whose state expired: the page load sets the example
            scene = strips[i % len(strips)]
            session[scene_id] = scene
        kind = i % 5
        try:
            if kind == 0:  # upload
                w = rng.randrange(300, 1800)
                path = tmp / f"up-{i % 7}.png"
                Image.effect_noise((w, max(32, w // rng.choice((1, 3, 6)))), 64).convert("RGB").save(path)
                session[scene_id] = scene_from_upload(str(path), as_strip=rng.random() < 0.5, n_panels=6)
                session[record_id] = None
                counts["upload"] += 1
            elif kind in (1, 3):  # an answer: a panel, or a point (a box on a picture)
                scene = live_scene(scene)
                if kind == 1 and scene.is_strip:
                    target = Panel(1 + i % scene.n_panels)
                else:
                    scene, target = point_target(scene, scene.image.width / 2, scene.image.height / 2, 96)
                frames = list(h.answer(ready, scene, "What is happening in this panel?", target, controls, refresh=0))
                session[scene_id] = scene
                session[record_id] = frames[-1].record
                counts["answer"] += 1
            elif kind == 2:  # a click on a word of the last answer
                record = session[record_id]
                if record is not None and record.pieces:
                    h.word_view(record, i % len(record.pieces))
                counts["word"] += 1
            else:  # refused inputs
                for bad in (lambda: scene_from_upload(str(bomb), False, 6), lambda: parse_box("0 0 inf 5", (64, 64))):
                    try:
                        bad()
                    except (InputError, ValueError):
                        counts["refused"] += 1
        except InputError:
            counts["refused"] += 1
        states.delete_all_expired_state()  # what Gradio's server does every second

    warm = 5
    for i in range(warm):
        request(i)
    gc.collect()
    start, t0 = rss_mb(), time.monotonic()
    start_trim = trimmed_rss_mb()
    print(f"start: RSS {start:.1f} MB ({start_trim:.1f} MB trimmed) after {warm} warm-up requests "
          f"(model {args.model} loaded)", flush=True)
    full = None  # (request, RSS) when the session cap first filled: from there on, memory should stay flat
    for i in range(warm, warm + args.requests):
        request(i)
        if full is None and len(states.session_data) >= settings.max_sessions:
            full = (i - warm + 1, rss_mb(), trimmed_rss_mb())
        if (i - warm + 1) % max(1, args.requests // 10) == 0:
            print(f"  {i - warm + 1:5d} requests  RSS {rss_mb():7.1f} MB  trimmed {trimmed_rss_mb():7.1f} MB  "
                  f"sessions kept {len(states.session_data)}", flush=True)
    gc.collect()
    end = rss_mb()
    end_trim = trimmed_rss_mb()
    kept = sum(session_nbytes(s.state_data.get(scene_id), s.state_data.get(record_id))
               for s in states.session_data.values())
    print(f"end:   RSS {end:.1f} MB after {args.requests} requests in {time.monotonic() - t0:.0f} s "
          f"({', '.join(f'{k} {v}' for k, v in counts.items())}; {args.visitors} visitors)")
    print(f"ratio end/start: {end / start:.3f}  ({(end - start) / args.requests * 1024:+.1f} KB per request)")
    print(f"trimmed (after gc and malloc_trim): {start_trim:.1f} -> {end_trim:.1f} MB, ratio {end_trim / start_trim:.3f}")
    if full is not None:
        n, at, at_trim = full
        print(f"once the session cap filled (request {n}): RSS {at:.1f} -> {end:.1f} MB over the last "
              f"{args.requests - n} requests, ratio {end / at:.3f}; trimmed {at_trim:.1f} -> {end_trim:.1f} MB, "
              f"ratio {end_trim / at_trim:.3f}")
    print(f"sessions kept: {len(states.session_data)} (cap {settings.max_sessions}, ttl {settings.session_ttl:g} s), "
          f"holding {kept / 2**20:.1f} MB of images and attention")
    for p in tmp.iterdir():
        p.unlink()
    os.rmdir(tmp)


if __name__ == "__main__":
    main()
