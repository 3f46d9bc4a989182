"""The Gradio Space: click a panel, watch the model's gaze move.

    scene.py          the image being asked about (strip or picture), bounds, where a click lands (pure)
    render.py         the strip with coloured panels, heat maps, trajectories, tinted answer HTML
    state.py          settings (GAZE_* variables), the lazily loaded model + ranking, stop switches, spaces.GPU
    limits.py         what a visitor may upload (bytes, header-checked pixels) and what a session keeps
    widgets.py        number inputs whose bad values are readable page errors
    handlers.py       what each button does, as plain functions over `gaze` calls
    ui.py             the page: layout and wiring
    make_examples.py  draws the bundled example strips (space/examples/) with datagen

`app.py` at the repository root builds the page and serves it.
"""

from space.state import Settings
from space.ui import CSS, build_demo

__all__ = ["CSS", "Settings", "build_demo"]
