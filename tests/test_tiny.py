"""Tiny VLMs of every family, built offline, load and run through the real transformers path."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, Qwen2Tokenizer

from gaze.testing import (
    FAMILIES,
    OTHER_FAMILIES,
    QWEN_FAMILIES,
    QWEN_SPECIAL_TOKENS,
    Qwen2_5_VLImageOnlyProcessor,
    Qwen2VLImageOnlyProcessor,
    Qwen3VLImageOnlyProcessor,
    build_tiny_vlm,
    build_tokenizer,
    family_patch_size,
    family_tokenizer,
    register_processors,
)

PROCESSOR_CLASSES = {
    "qwen3_vl": Qwen3VLImageOnlyProcessor,
    "qwen3_vl_moe": Qwen3VLImageOnlyProcessor,
    "qwen2_vl": Qwen2VLImageOnlyProcessor,
    "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor,
}
COLOURS = [(230, 30, 30), (30, 200, 30), (30, 30, 230), (230, 230, 30), (200, 30, 200), (30, 200, 200)]
QUESTION = "What is happening in the 3rd panel from the left?"


def strip(family: str) -> Image.Image:
    """Six square panels side by side, each 2x2 merged tokens (384x64 for Qwen3-VL, 336x56 for Qwen2-VL)."""
    side = 2 * family_patch_size(family)
    image = Image.new("RGB", (6 * side, side))
    for i, colour in enumerate(COLOURS):
        image.paste(Image.new("RGB", (side - 8, side - 8), colour), (i * side + 4, 4))
    return image


def chat(processor) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_family_patch_size():
    assert family_patch_size("qwen3_vl") == 32
    assert family_patch_size("qwen3_vl_moe") == 32
    assert family_patch_size("qwen2_vl") == 28
    assert family_patch_size("qwen2_5_vl") == 28
    assert family_patch_size("llava") == 8 and family_patch_size("gemma3") == 16
    with pytest.raises(ValueError, match="unknown family"):
        family_patch_size("paligemma")


def test_tokenizer(tokenizer):
    assert isinstance(tokenizer, Qwen2Tokenizer)
    assert len(tokenizer) <= 512
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    ids = [tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS]
    assert len(set(ids)) == len(QWEN_SPECIAL_TOKENS) and max(ids) < len(tokenizer)
    for token, token_id in zip(QWEN_SPECIAL_TOKENS, ids):  # specials are never split, even inside text
        assert tokenizer(f"a{token}b", add_special_tokens=False)["input_ids"][1:-1] == [token_id]
    text = "Which letter is on the 2nd panel? Q! é 42"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert build_tokenizer().get_vocab() == tokenizer.get_vocab()  # training is deterministic
    assert len(build_tokenizer(["red circle"] * 3, vocab_size=300)) <= 300


def test_chat_template(tokenizer):
    image_turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    assert tokenizer.apply_chat_template(image_turn, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi?<|im_end|>\n<|im_start|>assistant\n"
    )
    plain = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "A red circle."},
    ]
    assert tokenizer.apply_chat_template(plain, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
        "<|im_start|>assistant\nA red circle.<|im_end|>\n"
    )


@pytest.mark.parametrize("family", sorted(QWEN_FAMILIES))
def test_build_load_run(family, tmp_path, tokenizer):
    folder = build_tiny_vlm(family, tmp_path / family, tokenizer=tokenizer)
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="sdpa").eval()
    eager = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert type(model) is FAMILIES[family].model_class
    assert type(processor) is PROCESSOR_CLASSES[family]

    inputs = processor(text=[chat(processor)], images=[strip(family)], return_tensors="pt")
    assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"} <= set(inputs)
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 24]]
    is_image = inputs["input_ids"][0] == model.config.image_token_id
    assert int(is_image.sum()) == 4 * 24 // 2**2
    assert torch.equal(inputs["mm_token_type_ids"][0].bool(), is_image)

    with torch.no_grad():
        logits = model(**inputs).logits
        reference = eager(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    new = generated[0, inputs["input_ids"].shape[1] :]
    assert 1 <= len(new) <= 3 and int(new.max()) < len(tokenizer)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_vl"])
def test_config_is_consistent(family, tmp_path):
    folder = build_tiny_vlm(family, tmp_path, num_layers=3, num_heads=4, num_kv_heads=2, hidden_size=64, head_dim=16)
    config = AutoModelForImageTextToText.from_pretrained(folder).config
    text = config.get_text_config()
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (3, 4, 2)
    assert getattr(text, "head_dim", text.hidden_size // text.num_attention_heads) == 16
    assert sum(text.rope_parameters["mrope_section"]) == 16 // 2
    if family == "qwen3_vl":
        assert config.vision_config.out_hidden_size == text.hidden_size
        assert config.vision_config.deepstack_visual_indexes == [0]
    else:
        assert config.vision_config.hidden_size == text.hidden_size


def test_processor_reloads_with_same_settings(tmp_path):
    folder = build_tiny_vlm("qwen3_vl", tmp_path)
    register_processors()  # idempotent: a second registration changes nothing
    first = AutoProcessor.from_pretrained(folder)
    first.save_pretrained(tmp_path / "again")
    second = AutoProcessor.from_pretrained(tmp_path / "again")
    assert type(second) is Qwen3VLImageOnlyProcessor
    for processor in (first, second):
        ip = processor.image_processor
        assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (16, 2, 2)
        assert ip.size.shortest_edge == 32 * 32
        assert list(ip.image_mean) == [0.5, 0.5, 0.5]
    assert first.chat_template == second.chat_template
    assert first.tokenizer.get_vocab() == second.tokenizer.get_vocab()


def test_merge_size_makes_one_token_per_panel(tmp_path, tokenizer):
    """merge_size 4: a 64 px panel is ONE token, at the same resolution (16 px patches, 4x4 merged)."""
    folder = build_tiny_vlm("qwen3_vl", tmp_path, tokenizer=tokenizer, merge_size=4)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert (processor.image_processor.patch_size, processor.image_processor.merge_size) == (16, 4)
    assert model.config.vision_config.spatial_merge_size == 4
    inputs = processor(text=[chat(processor)], images=[strip("qwen3_vl")], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 24]]  # the same patches as with merge 2
    assert int((inputs["input_ids"][0] == model.config.image_token_id).sum()) == 6
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_patch_size_and_rope_theta(tmp_path, tokenizer):
    """32 px patches, merged 2x2: a 64 px panel is one token; the rotary base is the config's."""
    folder = build_tiny_vlm("qwen3_vl", tmp_path, tokenizer=tokenizer, patch_size=32, rope_theta=100.0)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert (processor.image_processor.patch_size, model.config.vision_config.patch_size) == (32, 32)
    assert processor.image_processor.size.shortest_edge == 64 * 64
    assert model.config.text_config.rope_parameters["rope_theta"] == 100.0
    inputs = processor(text=[chat(processor)], images=[strip("qwen3_vl")], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 2, 12]]
    assert int((inputs["input_ids"][0] == model.config.image_token_id).sum()) == 6
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.parametrize("option", [dict(merge_size=4), dict(patch_size=32), dict(rope_theta=100.0)])
def test_geometry_options_are_qwen_only(option, tmp_path, tokenizer):
    with pytest.raises(ValueError, match="Qwen-VL options"):
        build_tiny_vlm("llava", tmp_path, tokenizer=tokenizer, **option)


def test_same_seed_same_weights(tmp_path, tokenizer):
    a = load_file(build_tiny_vlm("qwen3_vl", tmp_path / "a", tokenizer=tokenizer, seed=3) / "model.safetensors")
    b = load_file(build_tiny_vlm("qwen3_vl", tmp_path / "b", tokenizer=tokenizer, seed=3) / "model.safetensors")
    c = load_file(build_tiny_vlm("qwen3_vl", tmp_path / "c", tokenizer=tokenizer, seed=4) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_caller_rng_untouched(tmp_path, tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_vlm("qwen3_vl", tmp_path, tokenizer=tokenizer)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    ("family", "kwargs", "message"),
    [
        ("qwen2_vl", dict(hidden_size=64, num_heads=4, head_dim=8), "must equal num_heads"),  # no head_dim in Qwen2-VL
        ("qwen3_vl", dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
        ("qwen3_vl", dict(head_dim=6), "at least 8"),
        ("qwen3_vl", dict(vision_hidden=40), "vision head size"),
    ],
)
def test_inconsistent_shapes_are_refused(family, kwargs, message, tmp_path, tokenizer):
    with pytest.raises(ValueError, match=message):
        build_tiny_vlm(family, tmp_path, tokenizer=tokenizer, **kwargs)


# Other families: the processor class AutoProcessor must give back, the image inputs it must produce, and
# the number of image-placeholder ids for a 192x32 strip (LLaVA-NeXT / OneVision include one newline per tile row).
OTHER = {
    "llava": ("LlavaProcessor", {"pixel_values"}, 36),
    "llava_next": ("LlavaNextProcessor", {"pixel_values", "image_sizes"}, 16 + 2 * 13),
    "llava_onevision": ("LlavaOnevisionImageOnlyProcessor", {"pixel_values", "image_sizes"}, 16 + 4 * 25),
    "internvl": ("InternVLImageOnlyProcessor", {"pixel_values"}, 7 * 16),
    "gemma3": ("Gemma3Processor", {"pixel_values", "token_type_ids"}, 36),
    "idefics3": ("Idefics3Processor", {"pixel_values", "pixel_attention_mask"}, 5 * 16),
    "smolvlm": ("SmolVLMImageOnlyProcessor", {"pixel_values", "pixel_attention_mask"}, 5 * 16),
}


def test_every_family_is_listed():
    assert set(FAMILIES) == set(QWEN_FAMILIES) | set(OTHER_FAMILIES) == set(PROCESSOR_CLASSES) | set(OTHER)


@pytest.mark.parametrize("family", sorted(OTHER))
def test_other_family_build_load_run(family, tmp_path, tokenizer):
    folder = build_tiny_vlm(family, tmp_path / family, tokenizer=tokenizer)
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="sdpa").eval()
    eager = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(folder)
    processor_name, keys, n_image = OTHER[family]
    assert type(model) is OTHER_FAMILIES[family].model_class
    assert type(processor).__name__ == processor_name
    text = model.config.get_text_config()
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (2, 4, 2)

    image = Image.new("RGB", (192, 32), (200, 40, 40))
    inputs = processor(text=[chat(processor)], images=[image], return_tensors="pt")
    assert keys <= set(inputs)
    assert int((inputs["input_ids"][0] == model.config.image_token_id).sum()) == n_image
    with torch.no_grad():
        logits = model(**inputs).logits
        reference = eager(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert 1 <= generated.shape[1] - inputs["input_ids"].shape[1] <= 3


def test_family_tokenizer_keeps_the_base_and_adds_named_tokens(tokenizer, tmp_path):
    tok = family_tokenizer("gemma3", tokenizer)
    assert len(tokenizer) < len(tok) and tok.get_vocab().items() >= {
        k: v for k, v in tokenizer.get_vocab().items() if k not in QWEN_SPECIAL_TOKENS}.items()
    assert (tok.boi_token, tok.image_token) == ("<start_of_image>", "<image_soft_token>")
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back.boi_token_id == tok.boi_token_id and back.image_token_id == tok.image_token_id
    assert tok("<start_of_image>x", add_special_tokens=False)["input_ids"][0] == tok.boi_token_id
    with pytest.raises(ValueError, match="Qwen tokenizer"):
        family_tokenizer("qwen3_vl", tokenizer)
