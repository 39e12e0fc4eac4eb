"""A tiny, randomly initialised Stable Diffusion pipeline, built fully offline (style item 10).

Nothing is downloaded: the CLIP tokenizer is built from a byte-level vocabulary with no merges
(every word tokenises to its characters; 514 tokens), and UNet / VAE / text encoder are random.
The pipeline is saved with ``save_pretrained`` so tests exercise the real loading path
(``AutoPipelineForText2Image.from_pretrained(dir, local_files_only=True)``).

Also used to build a local text-generation model for prompt expansion (``build_tiny_gpt2``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def byte_level_vocab(special: tuple[str, ...] = ("<|startoftext|>", "<|endoftext|>"),
                     end_of_word: bool = True) -> dict[str, int]:
    """Special tokens, then the 256 byte-level characters (and their ``</w>`` variants)."""
    from tokenizers import pre_tokenizers

    vocab = {s: i for i, s in enumerate(special)}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    if end_of_word:
        for ch in alphabet:
            vocab.setdefault(ch + "</w>", len(vocab))
    return vocab


def build_clip_tokenizer(tmpdir: str | Path, model_max_length: int = 77):
    """A CLIPTokenizer from a byte-level vocab.json and an empty merges.txt written to `tmpdir`."""
    from transformers import CLIPTokenizer

    tmpdir = Path(tmpdir)
    tmpdir.mkdir(parents=True, exist_ok=True)
    (tmpdir / "vocab.json").write_text(json.dumps(byte_level_vocab()))
    (tmpdir / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(tmpdir), model_max_length=model_max_length,
                                         local_files_only=True)


def build_tiny_sd(path: str | Path, size: int = 32, seed: int = 0,
                  block_out_channels: tuple[int, int] = (32, 64)) -> str:
    """Save a tiny random StableDiffusionPipeline to `path`; native resolution `size` (mult. of 4).

    UNet `block_out_channels` (multiples of 8; (32, 64) ~1M parameters, (16, 32) ~0.25M), 3-level
    VAE (downsamples by 4), 2-layer CLIP text encoder. Returns `path` as a string.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    if size % 4:
        raise ValueError(f"size {size}: must be a multiple of 4 (the tiny VAE downsamples by 4)")
    path = Path(path)
    tokenizer = build_clip_tokenizer(path.parent / f".{path.name}-tokfiles")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=tuple(block_out_channels), layers_per_block=1, sample_size=size // 4,
            in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8)
        vae = AutoencoderKL(
            block_out_channels=(16, 32, 32), in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4, norm_num_groups=8, sample_size=size)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=64,
            num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
            max_position_embeddings=77))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    return str(path)


def build_tiny_gpt2(path: str | Path, seed: int = 0) -> str:
    """Save a tiny random GPT-2 (1 layer, 32 wide) and a byte-level tokenizer to `path`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    path = Path(path)
    vocab = byte_level_vocab(special=("<|endoftext|>",), end_of_word=False)  # 257 tokens
    # transformers 5: vocab=/merges= build the tokenizer in memory (vocab_file= is ignored there)
    tok = GPT2TokenizerFast(vocab=vocab, merges=[], unk_token="<|endoftext|>",
                            bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=128,
                                           vocab_size=len(tok), bos_token_id=0, eos_token_id=0))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)
