"""Tiny random-weight models, built offline from configs, for tests and benchmarks.

Both are saved with `save_pretrained` and meant to be loaded back through the
real loaders (`load_pipeline`, `LMStoryWriter`), so the code under test is the
code a user runs with a real checkpoint. Their outputs are noise: they test
plumbing (shapes, seeding, batching, saving), never image or text quality.

The tokenizers are byte-level BPE vocabularies written by hand (every byte is
a token, no merges needed), so nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each of the 256 bytes (the alphabet of byte-level BPE)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _write_bpe(folder: Path, vocab: list[str]) -> None:
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def save_tiny_sd_pipeline(folder: str | Path) -> Path:
    """A ~1M-parameter StableDiffusionPipeline with random weights, saved to `folder`.

    UNet with block_out_channels (32, 64), a two-block VAE (scale factor 2), a
    32-wide CLIP text encoder, DDIM scheduler; no safety checker. 64x64 panels
    at 2 steps take a fraction of a second on a CPU.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(0)  # the same random weights every time
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32)
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)

    tok_dir = folder / "_tokenizer_src"
    tok_dir.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    _write_bpe(tok_dir, vocab)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, max_position_embeddings=77))

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return folder


def save_tiny_causal_lm(folder: str | Path) -> Path:
    """A two-layer GPT-2 with random weights and a byte-level tokenizer, saved to `folder`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vocab = _byte_chars() + ["<|endoftext|>"]
    _write_bpe(folder, vocab)
    tokenizer = GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=512,
                                       bos_token_id=len(vocab) - 1, eos_token_id=len(vocab) - 1))
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder
