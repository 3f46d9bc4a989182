"""The Gradio Space: `python app.py [--model organism|Qwen/Qwen3-VL-2B-Instruct|FOLDER]`, then open the printed URL.

The model comes from `--model`, else `GAZE_MODEL`, else the bundled organism (CPU, offline). It loads on
the first request, not here. Other knobs (GAZE_DEVICE, GAZE_DTYPE, GAZE_RANKING, ...): see space/README.md.
"""

import argparse

from space import CSS, Settings, build_demo
from space.state import launch_options

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--model", default=None, help="model id, folder or 'organism' (default: $GAZE_MODEL or organism)")
args, _ = parser.parse_known_args()

settings = Settings.from_env(model=args.model)
demo = build_demo(settings)

if __name__ == "__main__":
    if settings.preload:  # ZeroGPU: place the model at start-up, as it asks
        demo.holder.get()
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=settings.concurrency).launch(
        css=CSS, **launch_options(settings))
