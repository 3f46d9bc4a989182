"""Tiny VLMs of every supported family, built offline, that load through the real transformers path.

For the tests, the benchmarks and the organism builder only: production code
(`gaze` core, `gaze.eval`, the Space) never imports this module.

Tests, demos and trained "model organisms" need a vision-language model whose
classes, configs, processor and checkpoint layout are exactly those of a real
checkpoint, yet nothing can be downloaded here. This module builds one from
scratch in well under a second: Qwen-VL (below), and LLaVA-1.5, LLaVA-NeXT,
LLaVA-OneVision, InternVL, Gemma 3, Idefics3 and SmolVLM (`OTHER_FAMILIES`:
the stock model classes with tiny configs, the family's PIL image processor
scaled down with its geometry kept (centre crop, anyres tiles, thumbnails,
pooling), the family's image tokens added to the same locally trained BPE by
`family_tokenizer`, and a chat template shaped like the family's).

For Qwen-VL:

- `build_tokenizer`: a byte-level BPE (the Qwen2 pre-tokenizer, trained locally
  with `tokenizers` on a small English corpus) with the Qwen special tokens and
  a Qwen-style chat template, wrapped as the stock `Qwen2Tokenizer`.
- Image-only processors (`gaze.families`, where real-checkpoint loading needs
  them too): the stock Qwen-VL processors also want a video processor, whose
  classes need torchvision. The tiny models are saved with them, using the PIL
  image processor, sized so that small strips are not upscaled.
  `register_processors()` (run at import of this module; `gaze.models.load`
  does it too) maps their config classes to them in `AutoProcessor`; without
  that, `AutoProcessor.from_pretrained` on a saved folder silently falls back
  to a bare tokenizer.
- `build_tiny_vlm`: a randomly initialised `Qwen3VLForConditionalGeneration`
  (or Qwen3-VL-MoE, Qwen2-VL, Qwen2.5-VL) with a consistent tiny config, saved
  with its processor so that `AutoModelForImageTextToText.from_pretrained(dir)`
  and `AutoProcessor.from_pretrained(dir)` load it with `HF_HUB_OFFLINE=1`.

Config traps this module handles (each silently breaks a tiny model otherwise):
`text_config.head_dim` defaults to 128 in Qwen3-VL, and Qwen2-VL / Qwen2.5-VL
have no `head_dim` at all (it is `hidden_size // num_attention_heads`); the
mRoPE `mrope_section` must sum to `head_dim // 2` (its default assumes 128);
the vision tower's output width must equal the text hidden size; default
`deepstack_visual_indexes` beyond a tiny vision depth disable deepstack; the
top-level config needs the image/video/vision start/end token ids; and the
image processor's `shortest_edge` is a minimum pixel count, so the stock
values upscale small images.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    GenerationConfig,
    GotOcr2ImageProcessorPil,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaProcessor,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
    SmolVLMVisionConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2Config,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from gaze.families import (
    InternVLImageOnlyProcessor,
    LlavaOnevisionImageOnlyProcessor,
    Qwen2_5_VLImageOnlyProcessor,
    Qwen2VLImageOnlyProcessor,
    Qwen3VLImageOnlyProcessor,
    SmolVLMImageOnlyProcessor,
    register_image_only_processors,
)

__all__ = [
    "FAMILIES",
    "OTHER_FAMILIES",
    "QWEN_FAMILIES",
    "CHAT_TEMPLATE",
    "QWEN_SPECIAL_TOKENS",
    "Qwen2VLImageOnlyProcessor",
    "Qwen2_5_VLImageOnlyProcessor",
    "Qwen3VLImageOnlyProcessor",
    "InternVLImageOnlyProcessor",
    "LlavaOnevisionImageOnlyProcessor",
    "SmolVLMImageOnlyProcessor",
    "TinyFamily",
    "TinyVLM",
    "build_tiny_vlm",
    "build_tokenizer",
    "default_corpus",
    "family_patch_size",
    "family_tokenizer",
    "image_processor_for",
    "register_processors",
]

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

# The special tokens of the Qwen2-VL / Qwen3-VL tokenizers (chat turns, vision
# placeholders, grounding markers). They get the first ids of the vocabulary.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    VISION_START,
    VISION_END,
    "<|vision_pad|>",
    IMAGE_PAD,
    VIDEO_PAD,
)

# Qwen3-VL's chat format without its tool-calling branches and without a
# default system prompt (short prompts keep tiny models cheap). Content is a
# string or a list of items; an image item ({"type": "image"}, or any item with
# an "image"/"image_url" key) becomes one vision span, which the processor
# expands to the image's number of merged patches.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# RoPE base of the tiny text models. Real Qwen-VL checkpoints use 1e6 to 5e6
# for 128-dim heads and long contexts; with 16-dim heads and prompts of about
# a hundred tokens that leaves most rotary pairs nearly frozen, so tiny models
# use the classic 10000.
ROPE_THETA = 10_000.0

# Learned position table of the Qwen3-VL vision tower: a 24x24 grid (the real
# one is 48x48), bilinearly resampled to every image's patch grid.
QWEN3_VISION_POSITIONS = 24 * 24

# Merged tokens an image may have at most (the stock Qwen2-VL budget).
MAX_IMAGE_TOKENS = 1280

# Every family merges 2x2 patches into one text token and pairs video frames.
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2

# Head size of the tiny vision towers: vision_hidden must be a multiple of it.
VISION_HEAD_DIM = 16

_ORDINALS = ("1st", "2nd", "3rd", "4th", "5th", "6th", "7th", "8th", "9th", "10th", "11th", "12th")
_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "grey", "cyan")
_SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "ring", "moon", "arrow")
_ACTIONS = (
    "A cat is sleeping on a chair.",
    "A dog runs after a ball.",
    "Two friends talk at a table.",
    "A man opens the door and walks in.",
    "The girl waves goodbye to her mother.",
    "A bird flies over the house.",
    "The boy falls down and starts to cry.",
    "They eat dinner together and laugh.",
)


def default_corpus() -> list[str]:
    """The built-in English training text of `build_tokenizer`.

    Covers the project's prompts ("What is happening in the 3rd panel from the
    left?", "Which letter is on the 2nd panel?", "Describe this comic strip
    panel by panel.", ...) for ordinals 1st-12th, short captions (colours,
    shapes, simple actions), digits, letters A-Z / a-z and ASCII punctuation.
    """
    texts: list[str] = []
    for o in _ORDINALS:
        texts += [
            f"What is happening in the {o} panel from the left?",
            f"Which letter is on the {o} panel?",
            f"What is in the {o} panel?",
            f"Panel {o[:-2]}: ",
        ]
    texts += [
        "Describe this comic strip panel by panel.",
        "What is the main action happening in this comic strip? Answer briefly.",
        "What is happening in this panel?",
        "What is in the marked panel?",
        "You are a helpful assistant.",
    ]
    texts += [f"a {c} {s}" for c in _COLOURS for s in _SHAPES]
    texts += [f"The {c} {s} is in the {o} panel." for c, s, o in zip(_COLOURS, _SHAPES, _ORDINALS)]
    texts += list(_ACTIONS)
    texts += [
        " ".join("0123456789"),
        "0123456789",
        " ".join(chr(c) for c in range(ord("A"), ord("Z") + 1)),
        " ".join(chr(c) for c in range(ord("a"), ord("z") + 1)),
        "The letter is A. The letter is B. The answer is 7.",
        "! \" # $ % & ' ( ) * + , - . / : ; < = > ? @ [ \\ ] ^ _ ` { | } ~",
        "Yes. No. Left, right, first, last, next, then, and, or.",
    ]
    return texts


def build_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A small Qwen-style tokenizer trained locally: a `Qwen2Tokenizer` with `vocab_size` entries at most.

    Byte-level BPE with Qwen2's pre-tokenizer and normaliser, trained on `texts`
    (default: `default_corpus()`), so any string can be encoded; the Qwen
    special tokens (`QWEN_SPECIAL_TOKENS`) are single tokens with ids 0..13.
    As in the Qwen-VL instruct tokenizers, `<|im_end|>` (the end of a chat
    turn) is the eos token and `<|endoftext|>` the pad (and unknown) token.
    The chat template (`CHAT_TEMPLATE`) expands an image item to
    `<|vision_start|><|image_pad|><|vision_end|>`; `add_generation_prompt`
    appends `<|im_start|>assistant\\n`. A small corpus may yield fewer merges
    than `vocab_size` allows: size models by `len(tokenizer)`.
    """
    backend = Tokenizer(
        BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(default_corpus() if texts is None else texts), trainer)
    bpe = json.loads(backend.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(m) for m in bpe["merges"]],  # Qwen2Tokenizer wants pairs, not "a b" strings
        unk_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in QWEN_SPECIAL_TOKENS if t != IM_END]})
    return tokenizer


@dataclass(frozen=True)
class TinyFamily:
    """What `build_tiny_vlm` needs to know about one Qwen-VL family."""

    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    processor_class: type[ProcessorMixin]
    patch_size: int  # vision patch side in pixels
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    vision_config: Callable[[int, int, int, int], dict]  # (depth, width, text hidden, text layers) -> entries
    text_extra: Callable[[int], dict]  # (text hidden) -> family-specific text config entries
    interleaved_mrope: bool  # Qwen3-VL interleaves T/H/W rotary pairs; Qwen2-VL splits them in blocks
    has_head_dim: bool  # whether the text config takes head_dim (Qwen2-VL derives it from hidden size)


def _qwen3_vision(depth: int, width: int, out_hidden: int, text_layers: int) -> dict:
    # Deepstack feeds the outputs of these vision blocks into the first text layers;
    # indexes past the tower's depth would silently disable it.
    return dict(
        depth=depth,
        hidden_size=width,
        intermediate_size=4 * width,
        num_heads=width // VISION_HEAD_DIM,
        out_hidden_size=out_hidden,
        num_position_embeddings=QWEN3_VISION_POSITIONS,
        deepstack_visual_indexes=list(range(min(3, depth, text_layers))),
    )


def _qwen2_vision(depth: int, width: int, out_hidden: int, text_layers: int) -> dict:
    # Qwen2-VL calls the tower width embed_dim and its output width hidden_size.
    return dict(
        depth=depth,
        embed_dim=width,
        hidden_size=out_hidden,
        mlp_ratio=4,
        num_heads=width // VISION_HEAD_DIM,
    )


def _qwen2_5_vision(depth: int, width: int, out_hidden: int, text_layers: int) -> dict:
    # Window attention everywhere but every 8th block and the last (the real 32-block tower: 7, 15, 23, 31).
    return dict(
        depth=depth,
        hidden_size=width,
        intermediate_size=4 * width,
        num_heads=width // VISION_HEAD_DIM,
        window_size=112,
        out_hidden_size=out_hidden,
        fullatt_block_indexes=sorted({*range(7, depth, 8), depth - 1}),
    )


def _no_text_extra(hidden_size: int) -> dict:
    return {}


def _moe_text_extra(hidden_size: int) -> dict:
    return dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=2 * hidden_size,
        decoder_sparse_step=1,
        tie_word_embeddings=False,
    )


_HALF = (0.5, 0.5, 0.5)  # Qwen3-VL's image mean and std (Qwen2-VL uses CLIP's)

QWEN_FAMILIES: dict[str, TinyFamily] = {
    "qwen3_vl": TinyFamily(
        config_class=Qwen3VLConfig,
        model_class=Qwen3VLForConditionalGeneration,
        processor_class=Qwen3VLImageOnlyProcessor,
        patch_size=16,
        image_mean=_HALF,
        image_std=_HALF,
        vision_config=_qwen3_vision,
        text_extra=_no_text_extra,
        interleaved_mrope=True,
        has_head_dim=True,
    ),
    "qwen3_vl_moe": TinyFamily(
        config_class=Qwen3VLMoeConfig,
        model_class=Qwen3VLMoeForConditionalGeneration,
        processor_class=Qwen3VLImageOnlyProcessor,
        patch_size=16,
        image_mean=_HALF,
        image_std=_HALF,
        vision_config=_qwen3_vision,
        text_extra=_moe_text_extra,
        interleaved_mrope=True,
        has_head_dim=True,
    ),
    "qwen2_vl": TinyFamily(
        config_class=Qwen2VLConfig,
        model_class=Qwen2VLForConditionalGeneration,
        processor_class=Qwen2VLImageOnlyProcessor,
        patch_size=14,
        image_mean=tuple(OPENAI_CLIP_MEAN),
        image_std=tuple(OPENAI_CLIP_STD),
        vision_config=_qwen2_vision,
        text_extra=_no_text_extra,
        interleaved_mrope=False,
        has_head_dim=False,
    ),
    "qwen2_5_vl": TinyFamily(
        config_class=Qwen2_5_VLConfig,
        model_class=Qwen2_5_VLForConditionalGeneration,
        processor_class=Qwen2_5_VLImageOnlyProcessor,
        patch_size=14,
        image_mean=tuple(OPENAI_CLIP_MEAN),
        image_std=tuple(OPENAI_CLIP_STD),
        vision_config=_qwen2_5_vision,
        text_extra=_no_text_extra,
        interleaved_mrope=False,
        has_head_dim=False,
    ),
}


# ---------------------------------------------------------------------------
# Other families: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, InternVL, Gemma 3,
# Idefics3 and SmolVLM. Each is the stock transformers model class with a tiny
# config, saved with a processor of the family's real kind (its PIL image
# processor, the family's image tokens and a chat template shaped like the
# real one). Where the stock processor also wants a video processor (whose
# classes need torchvision), an image-only subclass stands in, as for Qwen-VL.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyText:
    """The text-model shape every tiny family shares (see `build_tiny_vlm`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vision_depth: int
    vision_hidden: int
    ids: dict[str, int]  # special token -> id in the family's tokenizer

    def entries(self, eos: str) -> dict:
        """Config entries of a Llama-like text model (Llama, Qwen2)."""
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
            bos_token_id=self.ids[ENDOFTEXT],
            eos_token_id=self.ids[eos],
            pad_token_id=self.ids[ENDOFTEXT],
            tie_word_embeddings=False,
        )

    def vision(self, **kw) -> dict:
        """Entries of a ViT tower (CLIP, SigLIP, Idefics3, InternViT): `vision_depth` blocks of 16-dim heads."""
        return dict(
            hidden_size=self.vision_hidden,
            intermediate_size=4 * self.vision_hidden,
            num_hidden_layers=self.vision_depth,
            num_attention_heads=self.vision_hidden // VISION_HEAD_DIM,
            **kw,
        )


def _chat_template(user: str, user_end: str, assistant: str, assistant_end: str, image: str, system: str = "",
                   system_end: str = "") -> str:
    """A chat template: turns are `prefix + content + end`; an image item becomes `image`.

    `add_generation_prompt` appends the assistant prefix. Content is a string
    or a list of items ({"type": "image"} or any item with an "image" /
    "image_url" key; {"type": "text", "text": ...}).
    """

    def q(text: str) -> str:
        return "'" + text.replace("\\", "\\\\").replace("\n", "\\n").replace("'", "\\'") + "'"

    return (
        "{%- for message in messages -%}"
        f"{{%- if message['role'] == 'user' -%}}{{{{- {q(user)} -}}}}"
        f"{{%- elif message['role'] == 'system' -%}}{{{{- {q(system)} -}}}}"
        f"{{%- else -%}}{{{{- {q(assistant)} -}}}}{{%- endif -%}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
        f"{{{{- {q(image)} -}}}}"
        "{%- elif 'text' in item -%}{{- item['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        f"{{%- if message['role'] == 'user' -%}}{{{{- {q(user_end)} -}}}}"
        f"{{%- elif message['role'] == 'system' -%}}{{{{- {q(system_end)} -}}}}"
        f"{{%- else -%}}{{{{- {q(assistant_end)} -}}}}{{%- endif -%}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- {q(assistant)} -}}}}{{%- endif -%}}"
    )


_QWEN_CHAT = dict(user="<|im_start|>user\n", user_end="<|im_end|>\n", assistant="<|im_start|>assistant\n",
                  assistant_end="<|im_end|>\n", system="<|im_start|>system\n", system_end="<|im_end|>\n")


@dataclass(frozen=True)
class TinyVLM:
    """What `build_tiny_vlm` needs to know about one family outside Qwen-VL."""

    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    processor_class: type[ProcessorMixin]
    token_px: int  # pixels per image-token side of the processed image (one tile)
    specials: tuple[str, ...]  # the family's special tokens (image placeholders, turn markers)
    named: dict[str, str]  # tokenizer attributes the processor reads, e.g. {"boi_token": "<start_of_image>"}
    chat: dict[str, str]  # `_chat_template` arguments
    end_of_turn: str  # what ends an assistant turn (generation stops there)
    make: Callable[[TinyText, PreTrainedTokenizerFast], tuple[PretrainedConfig, ProcessorMixin]]
    init: Callable[[PreTrainedModel], None] | None = None  # fixes weights a fresh model starts with (under the seed)


def _gemma3_init(model: PreTrainedModel) -> None:
    # Gemma 3 initialises its image projection to zeros: every image token of a
    # fresh model would carry the same (zero) embedding, blind to the picture.
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.02)


# LLaVA-1.5: CLIP (CLS + 6x6 patches of 8 px at 48 px), centre-cropped like the real 336 px processor.
LLAVA_IMAGE = 48
# LLaVA-NeXT / OneVision tiles: 32 px, 4x4 patches of 8 px; the grid pinpoints scaled from 336 / 384 to 32.
ANYRES_TILE = 32
LLAVA_NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
ONEVISION_PINPOINTS = [[32 * i, 32 * j] for i in range(1, 7) for j in range(1, 7)]
# OneVision's patches do not tile its tiles: 384 px with 14 px patches is 27 patches and 6 px unseen; here
# 32 px with 7 px patches is 4 patches and 4 px unseen, at LLaVA-NeXT's 16 tokens per tile.
ONEVISION_PATCH = 7
# InternVL tiles: 64 px, 8x8 patches pixel-shuffled to 4x4 = 16 tokens (real: 448 px, 256 tokens), at most 12 tiles.
INTERNVL_TILE = 64
# Gemma 3: a 96 px square, 12x12 patches average-pooled to 6x6 = 36 tokens (real: 896 px, 64x64 -> 16x16 = 256).
GEMMA3_IMAGE = 96
GEMMA3_TOKENS = 36
# Idefics3 / SmolVLM tiles: 64 px, 8x8 patches pixel-shuffled (scale 2) to 16 tokens; the long side resized
# to 4 tiles (real: 364 px tiles, 1456 px long side).
IDEFICS3_TILE = 64
VIT_PATCH = 8


def _llava(text: TinyText, tok) -> tuple[PretrainedConfig, ProcessorMixin]:
    vision = CLIPVisionConfig(**text.vision(image_size=LLAVA_IMAGE, patch_size=VIT_PATCH, projection_dim=text.vision_hidden))
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text.entries(IM_END)),
        image_token_index=text.ids["<image>"],
        image_seq_length=(LLAVA_IMAGE // VIT_PATCH) ** 2,
        vision_feature_layer=-2 if text.vision_depth > 1 else -1,
        vision_feature_select_strategy="default",
    )
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": LLAVA_IMAGE}, crop_size={"height": LLAVA_IMAGE, "width": LLAVA_IMAGE}
    )
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=VIT_PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=tok.chat_template)
    return config, processor


def _llava_next(text: TinyText, tok) -> tuple[PretrainedConfig, ProcessorMixin]:
    vision = CLIPVisionConfig(**text.vision(image_size=ANYRES_TILE, patch_size=VIT_PATCH, projection_dim=text.vision_hidden))
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text.entries(IM_END)),
        image_token_index=text.ids["<image>"],
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        vision_feature_layer=-2 if text.vision_depth > 1 else -1,
        vision_feature_select_strategy="default",
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": ANYRES_TILE}, crop_size={"height": ANYRES_TILE, "width": ANYRES_TILE},
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
    )
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=VIT_PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=tok.chat_template)
    return config, processor


def _llava_onevision(text: TinyText, tok) -> tuple[PretrainedConfig, ProcessorMixin]:
    vision = SiglipVisionConfig(**text.vision(image_size=ANYRES_TILE, patch_size=ONEVISION_PATCH))
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=Qwen2Config(**text.entries(IM_END)),
        image_token_index=text.ids["<image>"],
        video_token_index=text.ids["<video>"],
        image_grid_pinpoints=ONEVISION_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": ANYRES_TILE, "width": ANYRES_TILE}, image_grid_pinpoints=ONEVISION_PINPOINTS,
        image_mean=list(_HALF), image_std=list(_HALF),
    )
    processor = LlavaOnevisionImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tok, num_image_tokens=(ANYRES_TILE // ONEVISION_PATCH) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", chat_template=tok.chat_template,
    )
    return config, processor


def _internvl(text: TinyText, tok) -> tuple[PretrainedConfig, ProcessorMixin]:
    vision = InternVLVisionConfig(**text.vision(image_size=[INTERNVL_TILE] * 2, patch_size=[VIT_PATCH] * 2))
    seq = (INTERNVL_TILE // VIT_PATCH // 2) ** 2
    config = InternVLConfig(
        vision_config=vision,
        text_config=Qwen2Config(**text.entries(IM_END)),
        image_token_id=text.ids["<IMG_CONTEXT>"],
        image_seq_length=seq,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": INTERNVL_TILE, "width": INTERNVL_TILE}, crop_to_patches=True, min_patches=1, max_patches=12,
    )
    processor = InternVLImageOnlyProcessor(image_processor=image_processor, tokenizer=tok, image_seq_length=seq,
                                           chat_template=tok.chat_template)
    return config, processor


def _gemma3(text: TinyText, tok) -> tuple[PretrainedConfig, ProcessorMixin]:
    entries = text.entries(IM_END)
    entries.pop("rope_parameters")
    text_config = Gemma3TextConfig(
        **entries,
        query_pre_attn_scalar=text.head_dim,
        # the real pattern is five sliding-window layers per global one; the window
        # (real: 1024) stays longer than any prompt here, as with real prompts
        layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(text.num_layers - 1)]
        + ["full_attention"],
        sliding_window=512,
    )
    vision = SiglipVisionConfig(**text.vision(image_size=GEMMA3_IMAGE, patch_size=VIT_PATCH))
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision,
        mm_tokens_per_image=GEMMA3_TOKENS,
        boi_token_index=text.ids["<start_of_image>"],
        eoi_token_index=text.ids["<end_of_image>"],
        image_token_index=text.ids["<image_soft_token>"],
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": GEMMA3_IMAGE, "width": GEMMA3_IMAGE})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=GEMMA3_TOKENS,
                                chat_template=tok.chat_template)
    return config, processor


def _idefics3_like(config_class, vision_class, image_processor_class, processor_class):
    def make(text: TinyText, tok) -> tuple[PretrainedConfig, ProcessorMixin]:
        vision = vision_class(**text.vision(image_size=IDEFICS3_TILE, patch_size=VIT_PATCH))
        config = config_class(
            vision_config=vision,
            text_config=LlamaConfig(**text.entries(IM_END)),
            image_token_id=text.ids["<image>"],
            scale_factor=2,
        )
        image_processor = image_processor_class(
            size={"longest_edge": 4 * IDEFICS3_TILE}, max_image_size={"longest_edge": IDEFICS3_TILE},
        )
        processor = processor_class(image_processor=image_processor, tokenizer=tok,
                                    image_seq_len=(IDEFICS3_TILE // VIT_PATCH // 2) ** 2,
                                    chat_template=tok.chat_template)
        return config, processor

    return make


_IDEFICS3_SPECIALS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>") + tuple(
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
)
_IDEFICS3_CHAT = dict(user="<|im_start|>User:", user_end="<end_of_utterance>\n", assistant="Assistant:",
                      assistant_end="<end_of_utterance>\n", system="<|im_start|>System:",
                      system_end="<end_of_utterance>\n")

OTHER_FAMILIES: dict[str, TinyVLM] = {
    "llava": TinyVLM(
        LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, token_px=VIT_PATCH,
        specials=("<image>", "</s>"), named={"image_token": "<image>"},
        chat=dict(user="USER: ", user_end=" ", assistant="ASSISTANT:", assistant_end="</s>", image="<image>\n"),
        end_of_turn="</s>", make=_llava,
    ),
    "llava_next": TinyVLM(
        LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor, token_px=VIT_PATCH,
        specials=("<image>", "[INST]", "[/INST]", "</s>"), named={"image_token": "<image>"},
        chat=dict(user="[INST] ", user_end=" [/INST]", assistant="", assistant_end="</s>", image="<image>\n"),
        end_of_turn="</s>", make=_llava_next,
    ),
    "llava_onevision": TinyVLM(
        LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageOnlyProcessor,
        token_px=VIT_PATCH, specials=("<image>", "<video>"), named={"image_token": "<image>", "video_token": "<video>"},
        chat=dict(_QWEN_CHAT, image="<image>\n"), end_of_turn=IM_END, make=_llava_onevision,
    ),
    "internvl": TinyVLM(
        InternVLConfig, InternVLForConditionalGeneration, InternVLImageOnlyProcessor, token_px=2 * VIT_PATCH,
        specials=("<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
        named={"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
               "video_token": "<video>"},
        chat=dict(_QWEN_CHAT, image="<IMG_CONTEXT>\n"), end_of_turn=IM_END, make=_internvl,
    ),
    "gemma3": TinyVLM(
        Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, token_px=GEMMA3_IMAGE // 6,
        specials=("<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>", "<end_of_turn>"),
        named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
        chat=dict(user="<start_of_turn>user\n", user_end="<end_of_turn>\n", assistant="<start_of_turn>model\n",
                  assistant_end="<end_of_turn>\n", system="<start_of_turn>user\n", system_end="\n\n",
                  image="<start_of_image>"),
        end_of_turn="<end_of_turn>", make=_gemma3, init=_gemma3_init,
    ),
    "idefics3": TinyVLM(
        Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, token_px=2 * VIT_PATCH,
        specials=_IDEFICS3_SPECIALS, named={},
        chat=dict(_IDEFICS3_CHAT, image="<image>"), end_of_turn="<end_of_utterance>",
        make=_idefics3_like(Idefics3Config, Idefics3VisionConfig, Idefics3ImageProcessorPil, Idefics3Processor),
    ),
    "smolvlm": TinyVLM(
        SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageOnlyProcessor, token_px=2 * VIT_PATCH,
        specials=_IDEFICS3_SPECIALS + ("<video>",), named={},
        chat=dict(_IDEFICS3_CHAT, image="<image>"), end_of_turn="<end_of_utterance>",
        make=_idefics3_like(SmolVLMConfig, SmolVLMVisionConfig, SmolVLMImageProcessorPil, SmolVLMImageOnlyProcessor),
    ),
}


def family_tokenizer(family: str, base: PreTrainedTokenizerFast | None = None) -> PreTrainedTokenizerFast:
    """`base` (default: `build_tokenizer()`) with `family`'s special tokens, named token attributes and chat template.

    A new tokenizer: `base` is left as it is. The family's tokens get ids after
    the base vocabulary; the named ones (e.g. Gemma 3's `boi_token`) are
    attributes, as in the real tokenizers, and survive save/load.
    """
    spec = _family(family)
    if not isinstance(spec, TinyVLM):
        raise ValueError(f"{family} uses the Qwen tokenizer of `build_tokenizer` as it is")
    base = build_tokenizer() if base is None else base
    bpe = json.loads(base.backend_tokenizer.to_str())["model"]
    tok = Qwen2Tokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(m) for m in bpe["merges"]],
        unk_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=_chat_template(**spec.chat),
        extra_special_tokens=dict(spec.named) or None,
    )
    extra = [t for t in QWEN_SPECIAL_TOKENS if t != IM_END] + [t for t in spec.specials if t not in QWEN_SPECIAL_TOKENS]
    tok.add_special_tokens({"additional_special_tokens": extra})
    return tok


# Every family `build_tiny_vlm` builds, by `config.model_type`.
FAMILIES: dict[str, TinyFamily | TinyVLM] = {**QWEN_FAMILIES, **OTHER_FAMILIES}


def _family(family: str) -> TinyFamily | TinyVLM:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    return FAMILIES[family]


def family_patch_size(family: str) -> int:
    """Pixels per side of one image token in the processed image (one tile) of a tiny model of `family`.

    Qwen-VL: one merged token, 32 for Qwen3-VL, 28 for Qwen2-VL / Qwen2.5-VL.
    Other families resize (and tile) the image first, so in the ORIGINAL image
    a token covers what the family's layout says (`gaze.families`).
    """
    spec = _family(family)
    if isinstance(spec, TinyVLM):
        return spec.token_px
    return spec.patch_size * MERGE_SIZE


def register_processors() -> None:
    """Register the image-only processors with `AutoProcessor` (see `gaze.families.register_image_only_processors`)."""
    register_image_only_processors()


def image_processor_for(family: str, merge_size: int = MERGE_SIZE,
                        patch_size: int | None = None) -> Qwen2VLImageProcessorPil:
    """The PIL image processor of `family`, sized so that small images are not upscaled.

    `size.shortest_edge` is the minimum pixel count (one merged token) and
    `size.longest_edge` the maximum (`MAX_IMAGE_TOKENS` merged tokens). Images
    whose sides are multiples of `family_patch_size(family)` keep their size
    exactly, so panel borders fall on token boundaries: a 384x64 strip gives
    image_grid_thw [[1, 4, 24]] with Qwen3-VL, a 336x56 strip the same with Qwen2-VL.
    `merge_size` is the side of the square of patches merged into one token
    (the real models' 2 by default), `patch_size` the patch side in pixels
    (default: the family's, e.g. 16 for Qwen3-VL).
    """
    spec = _family(family)
    if not isinstance(spec, TinyFamily):
        raise ValueError(f"{family} is not a Qwen-VL family: its image processor is made by `build_tiny_vlm`")
    patch_size = patch_size or spec.patch_size
    token_px = patch_size * merge_size
    return Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        size={"shortest_edge": token_px**2, "longest_edge": MAX_IMAGE_TOKENS * token_px**2},
        image_mean=list(spec.image_mean),
        image_std=list(spec.image_std),
    )


def _mrope_section(head_dim: int, interleaved: bool) -> list[int]:
    """Rotary pairs for (time, height, width), summing to head_dim // 2, in the real models' proportions.

    Qwen2-VL splits the pairs in blocks, [16, 24, 24] of 64; Qwen3-VL
    interleaves them, [24, 20, 20] of 64.
    """
    if head_dim < 8 or head_dim % 2:
        raise ValueError(f"head_dim ({head_dim}) must be even and at least 8 for multimodal rotary positions")
    pairs = head_dim // 2
    spatial = (5 * pairs) // 16 if interleaved else (3 * pairs) // 8
    return [pairs - 2 * spatial, spatial, spatial]


def build_tiny_vlm(
    family: str,
    out_dir: str | Path,
    *,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    hidden_size: int = 64,
    head_dim: int = 16,
    vision_depth: int = 1,
    vision_hidden: int = 32,
    intermediate_size: int | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    merge_size: int = MERGE_SIZE,
    patch_size: int | None = None,
    rope_theta: float = ROPE_THETA,
) -> Path:
    """Build a randomly initialised tiny VLM of `family` and save it with its processor into `out_dir`.

    `family` is one of `FAMILIES`: "qwen3_vl", "qwen3_vl_moe" (4 experts, 2
    active), "qwen2_vl", "qwen2_5_vl", or of `OTHER_FAMILIES`: "llava",
    "llava_next", "llava_onevision", "internvl", "gemma3", "idefics3",
    "smolvlm" (their tokenizer is `family_tokenizer(family, tokenizer)`; their
    image geometry is in the constants above, e.g. `LLAVA_IMAGE`). The text model has `num_layers` layers
    of `num_heads` query heads and `num_kv_heads` key/value heads (grouped-query
    attention) of `head_dim` each, width `hidden_size` and MLP width
    `intermediate_size` (default 4 x hidden); Qwen2-VL and Qwen2.5-VL derive
    the head size from the width, so they need `hidden_size == num_heads *
    head_dim`. The vision tower has `vision_depth` blocks of width
    `vision_hidden` (16-dim heads) and outputs `hidden_size`-wide tokens. The
    vocabulary is `tokenizer` (default: `build_tokenizer()`). Weights are
    drawn under `torch.manual_seed(seed)` (the caller's RNG state is left
    untouched), so equal arguments give identical weights. Qwen-VL families
    merge `merge_size` x `merge_size` patches into one text token (the real
    models' 2; the vision config's `spatial_merge_size` and the processor's
    `merge_size` agree) of `patch_size` pixels (default: the family's), and
    their language model's rotary base is `rope_theta`.

    The folder loads with `AutoModelForImageTextToText.from_pretrained(out_dir)`
    and, after `import gaze.testing`, `AutoProcessor.from_pretrained(out_dir)`,
    offline. Greedy generation stops at `<|im_end|>` or `<|endoftext|>` (and
    the family's own end of turn, e.g. Gemma 3's `<end_of_turn>`).
    Returns `out_dir` as a Path.
    """
    spec = _family(family)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if vision_hidden % VISION_HEAD_DIM:
        raise ValueError(
            f"vision_hidden ({vision_hidden}) must be a multiple of the vision head size ({VISION_HEAD_DIM})"
        )
    if merge_size < 1 or (patch_size is not None and patch_size < 1):
        raise ValueError(f"merge_size ({merge_size}) and patch_size ({patch_size}) must be at least 1")
    if isinstance(spec, TinyVLM):
        if merge_size != MERGE_SIZE or patch_size is not None or rope_theta != ROPE_THETA:
            raise ValueError(f"merge_size, patch_size and rope_theta are Qwen-VL options; {family} keeps its own "
                             "image geometry and rotary base")
        return _build_other(family, spec, Path(out_dir), num_layers=num_layers, num_heads=num_heads,
                            num_kv_heads=num_kv_heads, hidden_size=hidden_size, head_dim=head_dim,
                            vision_depth=vision_depth, vision_hidden=vision_hidden,
                            intermediate_size=intermediate_size or 4 * hidden_size, tokenizer=tokenizer, seed=seed,
                            dtype=dtype)
    if not spec.has_head_dim and hidden_size != num_heads * head_dim:
        raise ValueError(
            f"{family} derives head_dim from hidden_size // num_heads: "
            f"hidden_size ({hidden_size}) must equal num_heads * head_dim ({num_heads * head_dim})"
        )
    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    ids = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in (ENDOFTEXT, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
    }

    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": rope_theta,
            "mrope_section": _mrope_section(head_dim, spec.interleaved_mrope),
            **({"mrope_interleaved": True} if spec.interleaved_mrope else {}),
        },
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
        **({"head_dim": head_dim} if spec.has_head_dim else {}),
        **spec.text_extra(hidden_size),
    )
    vision_config = dict(
        spec.vision_config(vision_depth, vision_hidden, hidden_size, num_layers),
        patch_size=patch_size or spec.patch_size,
        spatial_merge_size=merge_size,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
    )
    config = spec.config_class(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.model_class(config)
    model.to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=[ids[IM_END], ids[ENDOFTEXT]],
        pad_token_id=ids[ENDOFTEXT],
    )

    out = Path(out_dir)
    model.save_pretrained(out)
    processor = spec.processor_class(
        image_processor=image_processor_for(family, merge_size, patch_size),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template or CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return out


def _build_other(family: str, spec: TinyVLM, out: Path, *, num_layers: int, num_heads: int, num_kv_heads: int,
                 hidden_size: int, head_dim: int, vision_depth: int, vision_hidden: int, intermediate_size: int,
                 tokenizer: PreTrainedTokenizerFast | None, seed: int, dtype: torch.dtype) -> Path:
    """`build_tiny_vlm` for the families of `OTHER_FAMILIES`."""
    tok = family_tokenizer(family, tokenizer)
    names = {ENDOFTEXT, IM_END, *spec.specials, spec.end_of_turn}
    ids = {t: tok.convert_tokens_to_ids(t) for t in names}
    text = TinyText(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, vision_depth=vision_depth,
        vision_hidden=vision_hidden, ids=ids,
    )
    config, processor = spec.make(text, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.model_class(config)
        if spec.init is not None:
            spec.init(model)
    model.to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=sorted({ids[IM_END], ids[ENDOFTEXT], ids[spec.end_of_turn]}),
        pad_token_id=ids[ENDOFTEXT],
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


register_processors()
