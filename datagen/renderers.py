"""Stage 2's contract: what a panel renderer is, and how one is picked by name.

A renderer turns a `Story` into six panel images of one square size, each
with the labelled boxes of what it drew (panel pixels) when it knows them.
Two exist: `procedural` (PIL drawings, offline, the default) and `diffusers`
(any text-to-image checkpoint; the caller builds the pipeline and wraps it in
`DiffusionRenderer`). Anything with the same three members can be passed
where a renderer is expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from datagen.story import DatagenError, Story

RENDERERS = ("procedural", "diffusers")
MIN_PANEL_SIZE = 16  # below this neither a drawing nor a letter can be read


@dataclass(frozen=True)
class RenderedPanel:
    """One rendered panel and, when the renderer knows them, its labelled boxes."""

    image: Image.Image  # RGB, size x size
    objects: tuple[dict, ...] | None  # ({"label": str, "box": [x0, y0, x1, y1]}, ...) in panel pixels; None if unknown


class Renderer(Protocol):
    name: str  # one of RENDERERS (or a new name for a new kind)
    model_id: str | None  # checkpoint id or folder; None when no model is involved

    def check_size(self, size: int) -> None:
        """Raise DatagenError if panels of `size` px cannot be rendered."""

    def render(self, story: Story, size: int, seed: int) -> list[RenderedPanel]:
        """The story's panels, in order; the same (story, size, seed) gives the same pixels."""


def resolve_renderer(renderer: Renderer | str) -> Renderer:
    """A renderer object from itself or its name (only `procedural` can be built from a name alone)."""
    if not isinstance(renderer, str):
        return renderer
    if renderer == "procedural":
        from datagen.procedural import PROCEDURAL

        return PROCEDURAL
    if renderer == "diffusers":
        raise DatagenError(
            "the diffusers renderer needs a pipeline: build it with "
            "datagen.diffusion.load_pipeline(model_id) and pass DiffusionRenderer(pipeline, model_id=...)"
        )
    raise DatagenError(f"unknown renderer {renderer!r}; choose one of {', '.join(RENDERERS)}")
