"""Stage 2, diffusers renderer: panels from any text-to-image checkpoint.

The caller owns the pipeline (device, dtype, offloading, schedulers...):
build it with `load_pipeline(id_or_folder, device=..., dtype=...)`, a thin
wrapper of `AutoPipelineForText2Image.from_pretrained`, or any other way, and
wrap it in `DiffusionRenderer`. SDXL-Turbo or FLUX.1-schnell class models give
good panels in 1-4 steps with guidance 0 on a GPU; SD 1.x/2.x want ~25 steps
and guidance ~7.

Character consistency comes from two shared things: every panel prompt of a
strip starts with the same style and character description (`Story`), and
every panel of a strip starts from the same initial noise (one generator per
panel, all seeded with the strip's seed). Panels are rendered in batches of
`batch_size` prompts per pipeline call. The renderer knows no object boxes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from datagen.renderers import MIN_PANEL_SIZE, RenderedPanel
from datagen.story import DatagenError, Story

DTYPES = ("float32", "float16", "bfloat16")


def load_pipeline(model_id: str, *, device: str = "cpu", dtype: str = "float32") -> Any:
    """`AutoPipelineForText2Image.from_pretrained(model_id)` on `device`, with errors that say what to do."""
    import torch
    from diffusers import AutoPipelineForText2Image

    if dtype not in DTYPES:
        raise DatagenError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    try:
        # `dtype=` is the current spelling; diffusers 0.42 deprecates `torch_dtype=` with a warning.
        pipeline = AutoPipelineForText2Image.from_pretrained(model_id, dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError) as e:
        raise DatagenError(
            f"cannot load a text-to-image pipeline from {model_id!r}: {e}\n"
            "Give a diffusers checkpoint id (e.g. stabilityai/sdxl-turbo) or a folder written by "
            "pipeline.save_pretrained; offline (HF_HUB_OFFLINE=1), the checkpoint must already be in the HF cache."
        ) from None
    try:
        pipeline = pipeline.to(device)
    except (RuntimeError, AssertionError) as e:  # e.g. "cuda" on a machine without CUDA
        raise DatagenError(f"cannot move the pipeline to device {device!r}: {e}; use --device cpu") from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@dataclass
class DiffusionRenderer:
    """Renders a story's six prompts with a caller-built diffusers text-to-image pipeline."""

    pipeline: Any  # a diffusers text-to-image pipeline, already on its device and dtype
    model_id: str  # the id or folder it was loaded from (recorded in every row)
    steps: int = 4  # denoising steps per panel
    guidance: float = 0.0  # classifier-free guidance scale (0 for turbo/schnell models)
    batch_size: int = 6  # prompts per pipeline call
    name: ClassVar[str] = "diffusers"

    def check_size(self, size: int) -> None:
        # Latents are the image divided by the VAE's scale, and the denoiser halves them again
        # (UNet downsampling, Flux 2x2 packing): sizes must divide by twice the scale factor.
        multiple = 2 * getattr(self.pipeline, "vae_scale_factor", 8)
        if not isinstance(size, int) or size < MIN_PANEL_SIZE or size % multiple:
            raise DatagenError(f"panel size {size!r} is impossible for {self.model_id!r}: "
                               f"use a multiple of {multiple}, at least {max(MIN_PANEL_SIZE, multiple)} px")

    def render(self, story: Story, size: int, seed: int) -> list[RenderedPanel]:
        import torch

        prompts = list(story.prompts)
        images = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start:start + self.batch_size]
            # The same seed for every panel: shared initial noise keeps palette and layout alike.
            generators = [torch.Generator(device=self.pipeline.device).manual_seed(seed) for _ in batch]
            out = self.pipeline(prompt=batch, num_inference_steps=self.steps, guidance_scale=self.guidance,
                                height=size, width=size, generator=generators, output_type="pil")
            images += out.images
        return [RenderedPanel(im.convert("RGB"), None) for im in images]
