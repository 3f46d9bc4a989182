"""Model families: where a family puts its image tokens and how it positions them.

Everything else in `gaze` is family-agnostic. A `Family` answers four
questions for the models it covers (matched by `config.model_type`):

- `layout(inputs, row, image_size)`: the image tokens of prompt `row` and the
  pixel cell of the ORIGINAL image each one stands for (see `regions`);
- `position_ids(model, inputs)`: the position ids a full forward would use,
  so a shared image prefix and its question suffixes can be run separately
  and still see the positions of one full prompt (Qwen-VL's multimodal rotary
  positions are not a plain `arange` after the image);
- `merged_patch(processor)`: pixels per image token side, for aligning panels;
- `text_config(model)`: the language backbone's config (layers, heads).

A model of an unknown family gets an error naming the supported ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gaze.regions import ImageLayout, find_image_span, grid_layout


class UnsupportedModelError(ValueError):
    """The model is not a supported VLM; the message lists what is supported."""


@dataclass(frozen=True)
class Family:
    """How one family of VLMs lays out and positions its image tokens."""

    name: str  # human name, e.g. "Qwen3-VL"
    model_types: tuple[str, ...]  # config.model_type values it covers

    def text_config(self, model) -> object:
        return model.config.get_text_config()

    def image_token_id(self, model) -> int:
        return int(model.config.image_token_id)

    def merged_patch(self, processor) -> int:
        raise NotImplementedError

    def layout(self, model, processor, inputs: dict, row: int, image_size: tuple[int, int]) -> ImageLayout:
        raise NotImplementedError

    def position_ids(self, model, inputs: dict) -> torch.Tensor | None:
        """Position ids of a full forward over `inputs` (None: the model's default arange is right)."""
        return None


class QwenVL(Family):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense and MoE): one row-major grid of merged patches, mRoPE positions."""

    def merged_patch(self, processor) -> int:
        ip = processor.image_processor
        return int(ip.patch_size * ip.merge_size)

    def layout(self, model, processor, inputs: dict, row: int, image_size: tuple[int, int]) -> ImageLayout:
        ip = processor.image_processor
        start, end = find_image_span(inputs["input_ids"][row], self.image_token_id(model))
        t, h, w = (int(v) for v in inputs["image_grid_thw"][row if len(inputs["image_grid_thw"]) > 1 else 0])
        merge = int(ip.merge_size)
        grid = (h // merge, w // merge)
        if end - start != t * grid[0] * grid[1]:
            raise ValueError(f"{end - start} image tokens for an image grid of {t}x{grid[0]}x{grid[1]}: one image per prompt")
        processed = (w * int(ip.patch_size), h * int(ip.patch_size))
        return grid_layout(start, grid, processed, image_size)

    def position_ids(self, model, inputs: dict) -> torch.Tensor:
        kwargs = {}
        if "mm_token_type_ids" in inputs:
            kwargs["mm_token_type_ids"] = inputs["mm_token_type_ids"]
        positions, _ = model.model.get_rope_index(
            inputs["input_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=inputs.get("attention_mask"),
            **kwargs,
        )
        return positions  # [3, B, S]


FAMILIES: tuple[Family, ...] = (
    QwenVL("Qwen2-VL", ("qwen2_vl",)),
    QwenVL("Qwen2.5-VL", ("qwen2_5_vl",)),
    QwenVL("Qwen3-VL", ("qwen3_vl", "qwen3_vl_moe")),
)


def supported() -> str:
    return ", ".join(f.name for f in FAMILIES)


def family_of(model_or_config) -> Family:
    """The family of a model (or its config), or a clear error listing the supported families."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    if getattr(config, "vision_config", None) is None:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not a vision-language model (no vision tower): "
            f"gaze needs a VLM; supported families: {supported()}"
        )
    raise UnsupportedModelError(f"model type {model_type!r} is not supported yet; supported families: {supported()}")
