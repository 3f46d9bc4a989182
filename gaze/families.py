"""Model families: where a family puts its image tokens and how it positions them.

Everything else in `gaze` is family-agnostic. A `Family` answers these
questions for the models it covers (matched by `config.model_type`):

- `layout(model, processor, inputs, row, image_size)`: the image tokens of
  prompt `row` and the pixel cell of the ORIGINAL image each one stands for
  (see `regions`), undoing the processor's resize, padding, centre crop and
  tiling. Tokens that are not image cells (LLaVA-NeXT's row newlines,
  InternVL's <img> markers, Idefics3's tile tags) are not in the layout;
  tokens of several views of the same pixels (a tile and the global
  thumbnail) all are, each with its own cell;
- `position_ids(model, inputs)`: the position ids a full forward would use,
  so a shared image prefix and its question suffixes can be run separately
  and still see the positions of one full prompt (Qwen-VL's multimodal rotary
  positions are not a plain `arange` after the image; every other family here
  uses plain positions: None);
- `merged_patch(processor)`: pixels per image-token side of the processed
  image (one tile), for aligning panels;
- `text_config(model)`: the language backbone's config;
- `check(config)`: refuses a model whose text attention gaze cannot
  reproduce on the SDPA path (e.g. logit soft-capping).

Every layout is built from views: a `View` is the rectangle of the original
image that the current (resized, padded, cropped) picture shows, so each
processor step is one method call and a token grid over the final picture
maps back to original pixels exactly. A model of an unknown family gets an
error naming the supported ones.

| family | image tokens | cell of each token |
| --- | --- | --- |
| Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE) | one row-major grid of merged 2x2 patches | the resized image, uniformly |
| LLaVA-1.5 | one grid of patches (CLS dropped) | the centre crop of the resized (optionally square-padded) image |
| LLaVA-NeXT, LLaVA-OneVision | base image grid, then the tiles' grid row by row, each row + 1 newline | base: whole image (squashed square); tiles: the unpadded canvas (OneVision: bilinearly pooled when large) |
| InternVL | tiles' grids in tile order, then the thumbnail's grid | each tile's part of the resized canvas; thumbnail: whole image |
| Gemma 3 | one pooled square grid (256 tokens) | the whole image, squashed square |
| Idefics3, SmolVLM | each tile's grid after its `<row_i_col_j>` tag, then the global image's | as InternVL (tokens are not contiguous) |
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from transformers import (
    InternVLConfig,
    InternVLProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionProcessor,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLMoeConfig,
    Qwen3VLProcessor,
    SmolVLMConfig,
    SmolVLMProcessor,
)

from gaze.errors import GazeError
from gaze.regions import ImageLayout, find_image_span, grid_cells, grid_layout


class UnsupportedModelError(GazeError):
    """The model is not a supported VLM; the message lists what is supported."""


class LayoutError(GazeError):
    """The prompt's image tokens do not match what the family's processor geometry predicts."""


# --- views: which rectangle of the original image a processed picture shows -------------------------


@dataclass(frozen=True)
class View:
    """A picture of `size` (w, h) pixels showing the rectangle `rect` (x0, y0, x1, y1) of the original image.

    Every processor step maps pixels by a scale and an offset per axis, so a
    view stays a rectangle; `rect` may reach outside the original image where
    the processor padded.
    """

    rect: tuple[float, float, float, float]  # original-image pixels shown, x1/y1 exclusive
    size: tuple[float, float]  # (width, height) of the picture, in its pixels

    @classmethod
    def of(cls, image_size: tuple[int, int]) -> "View":
        w, h = image_size
        return cls((0.0, 0.0, float(w), float(h)), (int(w), int(h)))

    @property
    def scale(self) -> tuple[float, float]:
        """Original pixels per picture pixel, (x, y)."""
        x0, y0, x1, y1 = self.rect
        return (x1 - x0) / self.size[0], (y1 - y0) / self.size[1]

    def resize(self, width: int, height: int) -> "View":
        return View(self.rect, (int(width), int(height)))

    def window(self, left: float, top: float, width: float, height: float) -> "View":
        """The sub-picture (or, beyond the edges, padded picture) of `width` x `height` at (left, top)."""
        sx, sy = self.scale
        x0, y0 = self.rect[0] + left * sx, self.rect[1] + top * sy
        return View((x0, y0, x0 + width * sx, y0 + height * sy), (width, height))

    def cells(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """[rows * cols, 4] row-major cells from picture-pixel edges: xs [cols, 2] and ys [rows, 2] (start, end)."""
        sx, sy = self.scale
        x = self.rect[0] + xs.double() * sx  # [cols, 2]
        y = self.rect[1] + ys.double() * sy  # [rows, 2]
        rows, cols = y.shape[0], x.shape[0]
        return torch.stack([x[:, 0].repeat(rows), y[:, 0].repeat_interleave(cols),
                            x[:, 1].repeat(rows), y[:, 1].repeat_interleave(cols)], dim=-1)  # [T, 4]

    def center_crop(self, width: int, height: int) -> "View":
        # transformers' center_crop: offset (in - out) // 2 per axis, zero padding where the crop is larger
        return self.window((self.size[0] - width) // 2, (self.size[1] - height) // 2, width, height)

    def pad_to_square(self) -> "View":
        w, h = self.size
        m = max(w, h)
        return self.window(-((m - w) // 2), -((m - h) // 2), m, m)

    def grid(self, rows: int, cols: int) -> torch.Tensor:
        """[rows * cols, 4] row-major cells of a uniform token grid over the picture, in original pixels."""
        return grid_cells(self.rect, rows, cols)


def _size_get(size, key: str):
    """A field of an image processor's size (a SizeDict in transformers 5, a dict in saved configs)."""
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def resized_size(width: int, height: int, size) -> tuple[int, int]:
    """(w, h) after a PIL image processor's `resize(image, size)`, as transformers computes it."""
    from transformers.image_transforms import get_size_with_aspect_ratio
    from transformers.image_utils import get_image_size_for_max_height_width

    se, le = _size_get(size, "shortest_edge"), _size_get(size, "longest_edge")
    if se and le:
        h, w = get_size_with_aspect_ratio((height, width), se, le)
    elif se:
        short, long = min(width, height), max(width, height)
        new_short, new_long = se, int(se * long / short)
        w, h = (new_short, new_long) if width <= height else (new_long, new_short)
    elif _size_get(size, "max_height") and _size_get(size, "max_width"):
        h, w = get_image_size_for_max_height_width((height, width), size.max_height, size.max_width)
    elif _size_get(size, "height") and _size_get(size, "width"):
        h, w = _size_get(size, "height"), _size_get(size, "width")
    else:
        raise LayoutError(f"cannot tell the resized size from the image processor's size {size}")
    return int(w), int(h)


def processor_image_kwargs(processor) -> dict:
    """The image kwargs a processor passes by default (its class defaults, e.g. InternVL's crop_to_patches=True)."""
    try:
        return dict(processor._merge_kwargs(tokenizer_init_kwargs=processor.tokenizer.init_kwargs)["images_kwargs"])
    except Exception:  # noqa: BLE001  (older/newer processors: fall back to the image processor's attributes)
        return {}


def _setting(processor, name: str, default=None):
    kwargs = processor_image_kwargs(processor)
    if name in kwargs and kwargs[name] is not None:
        return kwargs[name]
    value = getattr(processor.image_processor, name, None)
    return default if value is None else value


def _layout(positions: torch.Tensor, blocks: list[torch.Tensor], image_size, grid=None) -> ImageLayout:
    cells = torch.cat(blocks).float()  # [T, 4]
    if cells.shape[0] != positions.numel():
        raise LayoutError(f"{positions.numel()} image tokens for {cells.shape[0]} cells")
    return ImageLayout(positions=positions.long(), cells=cells, image_size=tuple(image_size), grid=grid)


def _check_count(family: str, found: int, expected: int, detail: str) -> None:
    if found != expected:
        raise LayoutError(
            f"{family}: the prompt has {found} image tokens, the processor geometry gives {expected} ({detail}): "
            "give one image per prompt, processed with the processor's saved settings"
        )


# --- families ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """How one family of VLMs lays out and positions its image tokens."""

    name: str  # human name, e.g. "Qwen3-VL"
    model_types: tuple[str, ...]  # config.model_type values it covers

    def text_config(self, model) -> object:
        return model.config.get_text_config()

    def image_token_id(self, model) -> int:
        config = model.config
        value = getattr(config, "image_token_id", None)
        if value is None:
            value = getattr(config, "image_token_index")
        return int(value)

    def check(self, config) -> None:
        """Raise `UnsupportedModelError` if gaze cannot reproduce this model's text attention (default: fine)."""

    def merged_patch(self, processor) -> int:
        raise NotImplementedError

    def layout(self, model, processor, inputs: dict, row: int, image_size: tuple[int, int]) -> ImageLayout:
        raise NotImplementedError

    def position_ids(self, model, inputs: dict) -> torch.Tensor | None:
        """Position ids of a full forward over `inputs` (None: the model's default arange is right)."""
        return None

    def _span(self, model, inputs: dict, row: int) -> tuple[int, int]:
        return find_image_span(inputs["input_ids"][row], self.image_token_id(model))


class QwenVL(Family):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense and MoE): one row-major grid of merged patches, mRoPE positions."""

    def merged_patch(self, processor) -> int:
        ip = processor.image_processor
        return int(ip.patch_size * ip.merge_size)

    def layout(self, model, processor, inputs: dict, row: int, image_size: tuple[int, int]) -> ImageLayout:
        ip = processor.image_processor
        start, end = self._span(model, inputs, row)
        t, h, w = (int(v) for v in inputs["image_grid_thw"][row if len(inputs["image_grid_thw"]) > 1 else 0])
        merge = int(ip.merge_size)
        grid = (h // merge, w // merge)
        if end - start != t * grid[0] * grid[1]:
            raise LayoutError(f"{end - start} image tokens for an image grid of {t}x{grid[0]}x{grid[1]}: one image per prompt")
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


class Llava(Family):
    """LLaVA-1.5: one CLIP patch grid (CLS dropped) over the resized, centre-cropped image.

    The stock processor resizes the short side to 336 and centre-crops
    336x336: a wide image loses its sides, whose pixels then have no token
    (a region there raises `RegionError`). `do_pad` (pad to a square first)
    and `do_center_crop=False` with a fixed size (squash) are followed too.
    """

    def merged_patch(self, processor) -> int:
        return int(getattr(processor, "patch_size", None) or 14)

    def view(self, processor, image_size: tuple[int, int]) -> View:
        """What the processed picture shows: pad to square, resize, centre crop, as the image processor does."""
        ip = processor.image_processor
        view = View.of(image_size)
        if _setting(processor, "do_pad", False):
            view = view.pad_to_square()
        if _setting(processor, "do_resize", True):
            view = view.resize(*resized_size(*view.size, _setting(processor, "size")))
        if _setting(processor, "do_center_crop", False):
            crop = _setting(processor, "crop_size")
            view = view.center_crop(_size_get(crop, "width"), _size_get(crop, "height"))
        return view

    def layout(self, model, processor, inputs: dict, row: int, image_size: tuple[int, int]) -> ImageLayout:
        start, end = self._span(model, inputs, row)
        view = self.view(processor, image_size)
        patch = int(model.config.vision_config.patch_size)
        rows, cols = int(view.size[1]) // patch, int(view.size[0]) // patch
        _check_count(self.name, end - start, rows * cols, f"a {rows}x{cols} patch grid")
        cells = view.window(0, 0, cols * patch, rows * patch).grid(rows, cols)  # a remainder < patch is unseen
        return _layout(torch.arange(start, end), [cells], image_size, grid=(rows, cols))


class LlavaNext(Family):
    """LLaVA-NeXT and LLaVA-OneVision ("anyres"): a base view of the whole image, then the tiles as one grid.

    The processor resizes the image to fit the best "grid pinpoint"
    resolution, pastes it centred on that canvas (zero padding) and cuts the
    canvas into vision-sized tiles; the base view is the whole image squashed
    to one tile. The model lays the tiles' features out as one canvas grid,
    drops the rows (or columns) that are all padding ("unpad", in feature
    units), OneVision pools a large grid bilinearly down to about
    `anyres_max_N` tiles, and appends a learned newline token after each row.
    Newlines are not image cells: they are left out of the layout.
    """

    def merged_patch(self, processor) -> int:
        n = getattr(processor, "num_image_tokens", None)  # OneVision: tokens per tile
        size = _setting(processor, "size")
        side = _size_get(size, "height") or _size_get(size, "shortest_edge")
        if n:
            return int(side // math.isqrt(int(n)))
        return int(getattr(processor, "patch_size", None) or 14)

    def layout(self, model, processor, inputs: dict, row: int, image_size: tuple[int, int]) -> ImageLayout:
        from transformers.image_processing_utils import select_best_resolution

        start, end = self._span(model, inputs, row)
        config = model.config
        tile = int(config.vision_config.image_size)
        patch = int(config.vision_config.patch_size)
        f = tile // patch  # features per tile side
        w, h = image_size

        # base view: the whole image resized to the processor's size (a square), then processed like a tile
        size = _setting(processor, "size")
        side_h = _size_get(size, "height") or _size_get(size, "shortest_edge")
        side_w = _size_get(size, "width") or _size_get(size, "shortest_edge")
        base = View.of(image_size).resize(side_w, side_h)
        base = base.resize(*resized_size(*base.size, size))
        if _setting(processor, "do_center_crop", False):
            crop = _setting(processor, "crop_size")
            base = base.center_crop(_size_get(crop, "width"), _size_get(crop, "height"))
        if base.size != (tile, tile):
            raise LayoutError(f"{self.name}: the processor's base view is {base.size}, the vision tower takes {tile}x{tile}")
        # the patch grid covers f * patch pixels of each tile (384 px, patch 14: 27 patches, 6 px unseen)
        blocks = [base.window(0, 0, f * patch, f * patch).grid(f, f)]

        # tiles: the image resized into the best canvas, pasted in its centre
        best_h, best_w = select_best_resolution((h, w), _setting(processor, "image_grid_pinpoints"))
        if select_best_resolution((h, w), config.image_grid_pinpoints) != (best_h, best_w):
            raise LayoutError(f"{self.name}: the processor's and the model's grid pinpoints disagree")
        scale_w, scale_h = best_w / w, best_h / h
        if scale_w < scale_h:
            new_w, new_h = best_w, min(math.ceil(h * scale_w), best_h)
        else:
            new_w, new_h = min(math.ceil(w * scale_h), best_w), best_h
        canvas = View.of(image_size).resize(new_w, new_h).window(
            -((best_w - new_w) // 2), -((best_h - new_h) // 2), best_w, best_h
        )
        fh, fw = best_h // tile * f, best_w // tile * f  # canvas feature grid
        # unpad, in feature units, exactly as the model does (`unpad_image`)
        top, left, rows, cols = 0, 0, fh, fw
        if w / h > fw / fh:
            pad = (fh - int(round(h * (fw / w), 7))) // 2
            top, rows = pad, fh - 2 * pad
        else:
            pad = (fw - int(round(w * (fh / h), 7))) // 2
            left, cols = pad, fw - 2 * pad
        out_rows, out_cols = rows, cols
        aspect = getattr(config, "vision_aspect_ratio", None)  # OneVision: pool big grids to about N tiles
        if aspect:
            ratio = math.sqrt(rows * cols / (int(aspect.strip("anyres_max_")) * f * f))
            if ratio > 1.1:  # bilinear (align_corners=False): output cell k spans input features [k, k+1) * in/out
                out_rows, out_cols = int(rows // ratio), int(cols // ratio)
        ys = _feature_edges(top, rows, out_rows, f, tile, patch)
        xs = _feature_edges(left, cols, out_cols, f, tile, patch)
        blocks.append(canvas.cells(xs, ys))
        rows, cols = out_rows, out_cols

        _check_count(self.name, end - start, f * f + rows * (cols + 1),
                     f"{f}x{f} base + {rows}x{cols} tile grid + {rows} newlines")
        tile_pos = start + f * f + torch.arange(rows)[:, None] * (cols + 1) + torch.arange(cols)[None, :]  # [rows, cols]
        positions = torch.cat([torch.arange(start, start + f * f), tile_pos.flatten()])
        return _layout(positions, blocks, image_size)


def _feature_edges(first: int, n: int, out: int, f: int, tile: int, patch: int) -> torch.Tensor:
    """[out, 2] canvas pixels (start, end) of `out` equal bins over features [first, first + n) of a tiled axis.

    Feature u of the axis is patch u % f of tile u // f: it covers pixels
    [t * tile + (u - t * f) * patch, ... + patch) with t = u // f.
    """
    u = first + torch.arange(out + 1, dtype=torch.float64) * n / out  # bin edges, in features
    t0 = torch.floor(u[:-1] / f)
    t1 = (torch.ceil(u[1:] / f) - 1).clamp_min(0)  # an end on a tile border belongs to the tile before
    start = t0 * tile + (u[:-1] - t0 * f) * patch
    end = t1 * tile + (u[1:] - t1 * f) * patch
    return torch.stack([start, end], dim=-1)  # [out, 2]


def _tiles(canvas: View, rows: int, cols: int, tile_w: int, tile_h: int, g: int) -> list[torch.Tensor]:
    """Cells of a g x g token grid in each tile of a rows x cols tiling of `canvas`, tiles row-major."""
    return [canvas.window(c * tile_w, r * tile_h, tile_w, tile_h).grid(g, g) for r in range(rows) for c in range(cols)]


class InternVL(Family):
    """InternVL (transformers-native "-hf" checkpoints): tiles of the resized image, then a thumbnail.

    With `crop_to_patches` (the processor's default) the image is resized to
    the tile arrangement whose aspect ratio is closest to its own (at most
    `max_patches` tiles) and cut into tiles; a thumbnail (the whole image
    squashed to one tile) follows when there are several. Each tile gives
    `image_seq_length` tokens (pixel-shuffled patches, row-major) between
    `<img>` and `</img>`.
    """

    def merged_patch(self, processor) -> int:
        size = _setting(processor, "size")
        return int(_size_get(size, "height") // math.isqrt(int(processor.image_seq_length)))

    def layout(self, model, processor, inputs: dict, row: int, image_size: tuple[int, int]) -> ImageLayout:
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        start, end = self._span(model, inputs, row)
        seq = int(model.config.image_seq_length)
        g = math.isqrt(seq)
        if (end - start) % seq:
            raise LayoutError(f"{self.name}: {end - start} image tokens are not whole tiles of {seq}")
        n = (end - start) // seq
        size = _setting(processor, "size")
        tw, th = int(_size_get(size, "width")), int(_size_get(size, "height"))
        view = View.of(image_size)
        if n == 1:  # no tiling: the whole image squashed to one tile
            return _layout(torch.arange(start, end), [view.grid(g, g)], image_size, grid=(g, g))
        w, h = image_size
        cols, rows = get_optimal_tiled_canvas(
            (h, w), (th, tw), int(_setting(processor, "min_patches", 1)), int(_setting(processor, "max_patches", 12))
        )
        _check_count(self.name, n, rows * cols + 1, f"{rows}x{cols} tiles + thumbnail, in tiles")
        blocks = _tiles(view.resize(tw * cols, th * rows), rows, cols, tw, th, g) + [view.grid(g, g)]
        return _layout(torch.arange(start, end), blocks, image_size)


class Gemma3(Family):
    """Gemma 3: the image squashed to a square, SigLIP patches average-pooled to a 16x16 grid (256 tokens).

    Quirks: the text model attends bidirectionally among one image's tokens
    (built from `token_type_ids` into a boolean mask, which "gaze_sdpa"
    receives and applies like SDPA does); five of six layers use a sliding
    window (1024 in the released checkpoints, longer than a strip prompt).
    Pan-and-scan (off by default) adds crops as separate image blocks: not
    supported. Logit soft-capping cannot ride on SDPA: refused.
    """

    def merged_patch(self, processor) -> int:
        size = _setting(processor, "size")
        return int(_size_get(size, "height") // math.isqrt(int(processor.image_seq_length)))

    def check(self, config) -> None:
        text = config.get_text_config()
        if getattr(text, "attn_logit_softcapping", None) is not None:
            raise UnsupportedModelError(
                f"{self.name}: attention logit soft-capping ({text.attn_logit_softcapping}) cannot run on the SDPA "
                "path gaze steers; use a checkpoint without it"
            )

    def layout(self, model, processor, inputs: dict, row: int, image_size: tuple[int, int]) -> ImageLayout:
        ids = inputs["input_ids"][row]
        n = int((ids == self.image_token_id(model)).sum())
        per_image = int(model.config.mm_tokens_per_image)
        if n > per_image:
            raise LayoutError(
                f"{self.name}: {n} image tokens for one image of {per_image}: pan-and-scan crops are not supported; "
                "call the processor with do_pan_and_scan=False (its default)"
            )
        start, end = self._span(model, inputs, row)
        g = math.isqrt(per_image)
        _check_count(self.name, end - start, g * g, f"a {g}x{g} pooled grid")
        return _layout(torch.arange(start, end), [View.of(image_size).grid(g, g)], image_size, grid=(g, g))


class Idefics3(Family):
    """Idefics3 and SmolVLM: tiles of the resized image, each after a `<row_i_col_j>` tag, then the global image.

    The processor resizes the long side to `size.longest_edge`, rounds both
    sides up to whole tiles (`max_image_size`), cuts the tiles and appends the
    whole image squashed to one tile. Each tile gives `image_seq_len`
    pixel-shuffled tokens, row-major. The image tokens are not contiguous
    (tags and newlines between tiles), so the layout lists their positions.
    """

    def merged_patch(self, processor) -> int:
        tile = _size_get(_setting(processor, "max_image_size"), "longest_edge")
        return int(tile // math.isqrt(int(processor.image_seq_len)))

    def layout(self, model, processor, inputs: dict, row: int, image_size: tuple[int, int]) -> ImageLayout:
        from transformers.models.idefics3.image_processing_pil_idefics3 import get_resize_output_image_size

        ids = torch.as_tensor(inputs["input_ids"][row]).reshape(-1)
        positions = (ids == self.image_token_id(model)).nonzero().flatten()
        if positions.numel() == 0:
            find_image_span(ids, self.image_token_id(model))  # raises the usual "no image tokens" error
        config = model.config
        g = int(config.vision_config.image_size) // int(config.vision_config.patch_size) // int(config.scale_factor)
        seq = g * g
        if positions.numel() % seq:
            raise LayoutError(f"{self.name}: {positions.numel()} image tokens are not whole tiles of {seq}")
        n = positions.numel() // seq
        tile = int(_size_get(_setting(processor, "max_image_size"), "longest_edge"))
        view = View.of(image_size)
        if n == 1:  # not split: the whole image squashed to one tile
            return _layout(positions, [view.grid(g, g)], image_size, grid=(g, g))
        w, h = image_size
        if _setting(processor, "do_resize", True):
            longest = _size_get(_setting(processor, "size"), "longest_edge")
            h, w = get_resize_output_image_size(SimpleNamespace(shape=(3, h, w)), resolution_max_side=longest)
        # resize_for_vision_encoder: both sides rounded up to whole tiles
        if w >= h:
            cw = math.ceil(w / tile) * tile
            ch = math.ceil(int(cw / (w / h)) / tile) * tile
        else:
            ch = math.ceil(h / tile) * tile
            cw = math.ceil(int(ch * (w / h)) / tile) * tile
        rows, cols = ch // tile, cw // tile
        _check_count(self.name, n, rows * cols + 1, f"{rows}x{cols} tiles + global image, in tiles")
        blocks = _tiles(view.resize(cw, ch), rows, cols, tile, tile, g) + [view.grid(g, g)]
        return _layout(positions, blocks, image_size)


FAMILIES: tuple[Family, ...] = (
    QwenVL("Qwen2-VL", ("qwen2_vl",)),
    QwenVL("Qwen2.5-VL", ("qwen2_5_vl",)),
    QwenVL("Qwen3-VL", ("qwen3_vl", "qwen3_vl_moe")),
    Llava("LLaVA-1.5", ("llava",)),
    LlavaNext("LLaVA-NeXT", ("llava_next",)),
    LlavaNext("LLaVA-OneVision", ("llava_onevision",)),
    InternVL("InternVL", ("internvl",)),
    Gemma3("Gemma 3", ("gemma3",)),
    Idefics3("Idefics3", ("idefics3",)),
    Idefics3("SmolVLM", ("smolvlm",)),
)

# model types that look supported but are not, and what to use instead
_HINTS = {
    "internvl_chat": "InternVL's remote-code checkpoints are not supported: use the transformers-native "
                     "'-hf' checkpoints (model_type 'internvl', e.g. OpenGVLab/InternVL3-1B-hf)",
    "gemma3_text": "a text-only Gemma 3: gaze needs the multimodal checkpoint (model_type 'gemma3')",
}


def supported() -> str:
    """'Qwen2-VL (qwen2_vl), ...': every supported family with its model types."""
    return ", ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)


def family_of(model_or_config) -> Family:
    """The family of a model (or its config), or a clear error listing the supported families."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            family.check(config)
            return family
    hint = f" ({_HINTS[model_type]})" if model_type in _HINTS else ""
    if getattr(config, "vision_config", None) is None:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not a vision-language model (no vision tower){hint}: "
            f"gaze needs a VLM; supported families: {supported()}"
        )
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported yet{hint}; supported families: {supported()}. "
        "To add one, see docs/families.md"
    )


# --- image-only processors -----------------------------------------------------------------------------
# The stock processors of these families also build a video processor, whose classes need torchvision
# (not installable beside the CPU torch used here). Each subclass below drops the video processor and
# keeps everything else; checkpoints saved with them (the organism, the tests' tiny models) name them in
# `processor_config.json`, and a real checkpoint falls back to them when its stock processor cannot load.


class Qwen3VLImageOnlyProcessor(Qwen3VLProcessor):
    """`Qwen3VLProcessor` without the video processor (whose classes need torchvision).

    Images and text behave exactly as in the stock processor: each
    `<|image_pad|>` is expanded to `prod(image_grid_thw) / merge_size**2`
    tokens and `mm_token_type_ids` marks them. Also used for Qwen3-VL-MoE.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without the video processor (whose classes need torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without the video processor (whose classes need torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class LlavaOnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor` without the video processor (whose classes need torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                 video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
        super().__init__(image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
                         image_token=image_token, video_token=video_token, vision_aspect_ratio=vision_aspect_ratio,
                         **kwargs)


class InternVLImageOnlyProcessor(InternVLProcessor):
    """`InternVLProcessor` without the video processor (whose classes need torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kwargs)


class SmolVLMImageOnlyProcessor(SmolVLMProcessor):
    """`SmolVLMProcessor` without the video processor (torchvision) and without `num2words` (video prompts only).

    Images are expanded exactly as in the stock processor (the same
    `get_image_prompt_string`); only video input is unavailable.
    """

    def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169, chat_template=None, **kwargs):
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        # the stock method reads the video processor's frame settings first
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


# config class and image-only processor, by `config.model_type`
IMAGE_ONLY_PROCESSORS: dict[str, tuple[type, type]] = {
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLImageOnlyProcessor),
    "qwen3_vl_moe": (Qwen3VLMoeConfig, Qwen3VLImageOnlyProcessor),
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLImageOnlyProcessor),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLImageOnlyProcessor),
    "llava_onevision": (LlavaOnevisionConfig, LlavaOnevisionImageOnlyProcessor),
    "internvl": (InternVLConfig, InternVLImageOnlyProcessor),
    "smolvlm": (SmolVLMConfig, SmolVLMImageOnlyProcessor),
}


def register_image_only_processors() -> None:
    """Let `AutoProcessor` find the image-only processors by name and by config type (idempotent).

    Called when a model is loaded (`gaze.models.load`), not at `import gaze`.
    """
    from transformers import AutoProcessor

    for config_class, processor_class in IMAGE_ONLY_PROCESSORS.values():
        AutoProcessor.register(config_class, processor_class, exist_ok=True)
