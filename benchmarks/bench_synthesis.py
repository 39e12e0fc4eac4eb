"""Benchmark: text-to-image synthesis throughput, gptfl-hpc's sampler vs GPT-FL's pattern.

    python benchmarks/bench_synthesis.py                      # default sweep, one GPU, ~6-7 min
    python benchmarks/bench_synthesis.py --quick              # ~3 min
    python benchmarks/bench_synthesis.py --dry-run            # plan + FLOP counts, no GPU needed
    python benchmarks/bench_synthesis.py --device cpu --tiny  # CPU smoke run (tiny random model)

The model is the Stable Diffusion 2.1 architecture (UNet 866M, VAE, OpenCLIP-H-sized text
encoder) with RANDOM weights, built from configs copied from the public model's config files (no
download; the CLIP tokenizer is a byte-level vocab built in memory, which tokenises to the same
77-token padded length as the real one). It measures throughput only. fp16, DPM-Solver++,
classifier-free guidance 3 (two UNet rows per image), as in GPT-FL's generation script.

Measured, in one process on the same pipeline object:

- ``reference``: GPT-FL's pattern: one image per pipeline call, 50 steps, 768 px, PIL output;
- ``eager``: gptfl-hpc's sampler (``gptfl_hpc.gen.kinds.text2image.Text2ImageSampler``): a batch per
  call with one torch.Generator per image, antialiased resize to the task's 32x32 on the GPU,
  uint8 back to the host;
- ``compiled``: the same after ``unet.compile(mode="max-autotune-no-cudagraphs", dynamic=False)``
  with the UNet in channels_last (what ``gen.compile=true`` does on a GPU). Each (batch, size)
  shape compiles once, in the untimed warm-up (the compile time is reported).

Each timing is one full sampler call between ``torch.cuda.synchronize()``s, median over
--repeats after a warm-up call at the same shape. Work per image is counted with
``torch.utils.flop_counter.FlopCounterMode`` on the meta device: one UNet step with 2 CFG rows x
steps + one VAE decode (the text encoder, ~0.1 TFLOP, is left out as in the anchors); the share of
the FLOP ceiling is img/s x FLOP/img / --peak-flops (default 989e12: H100 SXM dense fp16/bf16
tensor-core peak; the anchors used 798e12, pass that to compare). Targets: >= 2.5 img/s at
768 px / 50 steps and >= 6.5 img/s at 512 px / 50 steps.

--time-budget (seconds, default 420) stops starting new configurations once spent; skipped ones
are listed. --json PATH writes all results.

**Audio** (``--audio``): text-to-audio with the AudioLDM-S architecture (the paper's
``cvssp/audioldm``: UNet 128-256-384-640 with CLAP-conditioned class embeddings, 8-channel VAE
latents at 1/4 of the 64-bin mel spectrogram, HiFi-GAN at 16 kHz), random weights, 5.0 s clips,
DDIM, guidance 2.5 (two UNet rows per clip), fp16 on GPU. ``reference`` is the reference code's
pattern, one clip per pipeline call; ``batched`` is gptfl-hpc's sampler
(``gptfl_hpc.gen.kinds.audioldm.AudioLDMSampler``: B prompts per call, one torch.Generator per
clip, per-row guidance, int16 out). Reported in clips/s, at 100 steps (the paper) and 25::

    python benchmarks/bench_synthesis.py --audio --json bench_audio.json      # GPU, ~3-5 min
    python benchmarks/bench_synthesis.py --audio --device cpu --tiny          # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = {(768, 50): 2.5, (512, 50): 6.5}
LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]

# ---- Stable Diffusion 2.1 (stabilityai/stable-diffusion-2-1) component configs -------------
SD21_UNET = dict(
    act_fn="silu", attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, cross_attention_dim=1024,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"],
    downsample_padding=1, dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0,
    in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5,
    norm_num_groups=32, num_class_embeds=None, only_cross_attention=False, out_channels=4,
    sample_size=96,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    upcast_attention=True, use_linear_projection=True)
SD21_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    sample_size=768)
SD21_TEXT = dict(  # OpenCLIP ViT-H/14 text tower as shipped in SD 2.1's text_encoder/config.json
    hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
    projection_dim=512, hidden_act="gelu", max_position_embeddings=77, vocab_size=49408,
    layer_norm_eps=1e-5)
SD21_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    num_train_timesteps=1000, prediction_type="v_prediction", set_alpha_to_one=False,
    steps_offset=1)

# ---- tiny architecture for CPU smoke runs ---------------------------------------------------
TINY_UNET = dict(
    block_out_channels=[32, 64], layers_per_block=1, sample_size=16, in_channels=4,
    out_channels=4, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=32,
    norm_num_groups=8, attention_head_dim=8)
TINY_VAE = dict(
    block_out_channels=[16, 32, 32], in_channels=3, out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
    latent_channels=4, norm_num_groups=8, sample_size=64)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                 max_position_embeddings=77, vocab_size=514)


@dataclass
class Case:
    mode: str  # reference | eager | compiled
    px: int
    steps: int
    batch: int
    img_s: float | None = None
    s_per_call: float | None = None
    times: list[float] = field(default_factory=list)
    warmup_s: float | None = None
    tflop_per_img: float | None = None
    share_of_peak: float | None = None
    vs_reference: float | None = None
    peak_mem_gib: float | None = None
    skipped: str | None = None


# --------------------------------------------------------------------------------------------
# model


def byte_level_clip_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    for ch in alphabet:
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def arch(tiny: bool) -> tuple[dict, dict, dict]:
    return (TINY_UNET, TINY_VAE, TINY_TEXT) if tiny else (SD21_UNET, SD21_VAE, SD21_TEXT)


def build_pipeline(tiny: bool, device: str, dtype):
    """A StableDiffusionPipeline with random weights, created directly on `device` in `dtype`."""
    import diffusers.utils.logging as dlog
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    dlog.set_verbosity_error()  # .to(fp16) of random modules: "should be kept in float32: []"
    unet_cfg, vae_cfg, text_cfg = arch(tiny)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of a minute on CPU
        unet = UNet2DConditionModel(**unet_cfg).to(dtype)
        vae = AutoencoderKL(**vae_cfg).to(dtype)
        text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                            **text_cfg)).to(dtype)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text,
                                   tokenizer=byte_level_clip_tokenizer(), unet=unet,
                                   scheduler=DDIMScheduler(**SD21_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return pipe.to(device)


def count_tflop_per_image(tiny: bool, px: int, steps: int, cfg_rows: int = 2) -> float:
    """UNet forward with `cfg_rows` rows x steps + one VAE decode, counted on the meta device."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    unet_cfg, vae_cfg, text_cfg = arch(tiny)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        f = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        lat = torch.empty(cfg_rows, 4, px // f, px // f)
        ctx = torch.empty(cfg_rows, 77, unet_cfg["cross_attention_dim"])
        t = torch.full((cfg_rows,), 500, dtype=torch.long)
        z = torch.empty(1, 4, px // f, px // f)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            unet(lat, t, encoder_hidden_states=ctx)
        unet_flops = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            vae.decode(z)
        vae_flops = fc.get_total_flops()
    return (steps * unet_flops + vae_flops) / 1e12


# --------------------------------------------------------------------------------------------
# plan


def default_plan(args) -> list[Case]:
    if args.sizes or args.steps or args.batches:
        sizes = [int(v) for v in (args.sizes or ("64,32" if args.tiny else "768,512")).split(",")]
        steps = [int(v) for v in (args.steps or ("4,2" if args.tiny else "50,25")).split(",")]
        batches = [int(v) for v in (args.batches or ("2,4" if args.tiny else "8,16")).split(",")]
        grid = [(p, s, b) for p in sizes for s in steps for b in batches]
        eager = compiled = grid
        ref = (max(sizes), max(steps))
    elif args.tiny:
        eager = [(64, 4, 2), (64, 4, 4), (32, 4, 4), (32, 2, 4)]
        compiled = [(64, 4, 4), (32, 4, 4)]
        ref = (64, 4)
    elif args.quick:
        eager = [(768, 50, 8), (512, 50, 16), (512, 25, 16)]
        compiled = [(512, 50, 16), (512, 25, 16)]
        ref = (768, 50)
    else:
        eager = [(768, 50, 8), (768, 50, 16), (768, 25, 16), (512, 50, 16), (512, 50, 32),
                 (512, 25, 32)]
        compiled = [(768, 50, 16), (768, 25, 16), (512, 50, 32), (512, 25, 32)]
        ref = (768, 50)
    plan = [Case("reference", ref[0], ref[1], 1)]
    if args.compile in ("both", "off"):
        plan += [Case("eager", p, s, b) for p, s, b in eager]
    if args.compile in ("both", "on"):
        plan += [Case("compiled", p, s, b) for p, s, b in compiled]
    return plan


# --------------------------------------------------------------------------------------------
# running


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args) -> list[Case]:
    import numpy as np
    import torch

    from gptfl_hpc.gen.diffusion import prepare_pipeline
    from gptfl_hpc.gen.kinds.text2image import Text2ImageSampler

    t_start = time.perf_counter()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    out_shape = tuple(int(v) for v in args.out_shape.split(","))
    plan = default_plan(args)
    tflop = {}
    for c in plan:
        key = (c.px, c.steps)
        if key not in tflop:
            tflop[key] = count_tflop_per_image(args.tiny, c.px, c.steps)
        c.tflop_per_img = tflop[key]

    t = time.perf_counter()
    pipe = build_pipeline(args.tiny, args.device, dtype)
    prepare_pipeline(pipe, device=args.device, scheduler="dpm", channels_last=False, compile=False)
    print(f"# built {'tiny' if args.tiny else 'SD 2.1'} pipeline ({args.dtype}) on {args.device} "
          f"in {time.perf_counter() - t:.1f} s; scheduler {type(pipe.scheduler).__name__}",
          flush=True)

    def batch_inputs(n: int, offset: int = 0):
        labels = (np.arange(n) + offset) % len(LABEL_NAMES)
        prompts = [f"a photo of a {LABEL_NAMES[k]}" for k in labels]
        return labels, prompts, np.full(n, args.guidance, np.float32), np.arange(n) + offset

    def reset_mem():
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

    def peak_mem():
        if args.device.startswith("cuda"):
            return torch.cuda.max_memory_allocated() / 2**30
        return None

    def over_budget(extra: float = 0.0) -> bool:
        return time.perf_counter() - t_start + extra > args.time_budget

    compiled_ready = False
    for c in plan:
        # a first compiled case must leave room for compiling (~1-2 min on an H100)
        first_compile = c.mode == "compiled" and not compiled_ready
        if over_budget(args.compile_reserve if first_compile else 0.0):
            c.skipped = "time budget"
            print(f"# skip {c.mode} {c.px}px {c.steps} steps batch {c.batch}: --time-budget",
                  flush=True)
            continue
        if c.mode == "compiled" and not compiled_ready:
            prepare_pipeline(pipe, device=args.device, scheduler="dpm", channels_last=True,
                             compile=True, compile_mode=args.compile_mode)
            compiled_ready = True
        reset_mem()
        if c.mode == "reference":
            def call(steps, offset=0, c=c):
                g = torch.Generator(device=args.device).manual_seed(offset)
                return pipe(LABEL_NAMES[offset % 10], height=c.px, width=c.px,
                            num_inference_steps=steps, guidance_scale=args.guidance,
                            generator=g).images[0]
        else:
            sampler = Text2ImageSampler(pipe, out_shape=out_shape, steps=c.steps, height=c.px,
                                        width=c.px, max_batch=c.batch, device=args.device,
                                        compiled=c.mode == "compiled")

            def call(steps, offset=0, c=c, sampler=sampler):
                sampler.steps = steps
                return sampler(*batch_inputs(c.batch, offset))
        # warm-up at the same shape (compiles, for mode=compiled); few steps: shapes do not
        # depend on the step count
        sync(args.device)
        t = time.perf_counter()
        call(args.warmup_steps)
        sync(args.device)
        c.warmup_s = time.perf_counter() - t
        for r in range(args.repeats):
            sync(args.device)
            t = time.perf_counter()
            call(c.steps, offset=1000 * (r + 1))
            sync(args.device)
            c.times.append(time.perf_counter() - t)
        c.s_per_call = statistics.median(c.times)
        c.img_s = c.batch / c.s_per_call
        c.share_of_peak = c.img_s * c.tflop_per_img * 1e12 / args.peak_flops
        c.peak_mem_gib = peak_mem()
        print(f"# {c.mode:9s} {c.px}px {c.steps:3d} steps batch {c.batch:3d}: {c.img_s:7.3f} img/s "
              f"(median {c.s_per_call:.2f} s/call of {[round(x, 2) for x in c.times]}; warm-up "
              f"{c.warmup_s:.1f} s)", flush=True)
    ref = plan[0].img_s
    for c in plan:
        if c.img_s and ref:
            c.vs_reference = c.img_s / ref
    print(f"# total {time.perf_counter() - t_start:.0f} s", flush=True)
    return plan


# --------------------------------------------------------------------------------------------
# audio (AudioLDM-S architecture, random weights)

AUDIO_LABELS = ["dog", "rooster", "rain", "sea waves", "crying baby", "clock tick", "sneezing",
                "helicopter", "chainsaw", "siren"]


def build_audioldm(tiny: bool, device: str, dtype):
    """An AudioLDMPipeline with random weights (AudioLDM-S sizes, or tiny ones)."""
    import diffusers.utils.logging as dlog
    import torch
    from diffusers import AudioLDMPipeline, AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import (
        ClapTextConfig,
        ClapTextModelWithProjection,
        RobertaTokenizer,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
    )

    dlog.set_verbosity_error()
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    from tokenizers import pre_tokenizers

    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    vocab["<mask>"] = len(vocab)
    tok = RobertaTokenizer(vocab=vocab, merges=[], model_max_length=77)
    if tiny:
        blocks, heads, latent, vae_blocks, text = (16, 32), 8, 4, [8, 16], dict(
            hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
            projection_dim=16)
        voc = dict(model_in_dim=4, upsample_initial_channel=16, upsample_rates=[2, 2],
                   upsample_kernel_sizes=[4, 4], resblock_kernel_sizes=[3],
                   resblock_dilation_sizes=[[1, 3]])
        down = ("DownBlock2D", "CrossAttnDownBlock2D")
    else:  # audioldm-s-full: model_channels 128, channel_mult 1,2,3,5, head dim 32
        blocks, heads, latent, vae_blocks, text = (128, 256, 384, 640), 32, 8, [128, 256, 512], \
            dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                 num_hidden_layers=12, projection_dim=512)
        voc = dict(model_in_dim=64, upsample_initial_channel=1024,
                   upsample_rates=[5, 4, 2, 2, 2], upsample_kernel_sizes=[16, 16, 8, 4, 4],
                   resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5]] * 3)
        down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3
    up = tuple(reversed([d.replace("Down", "Up") for d in down]))
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            block_out_channels=blocks, layers_per_block=1 if tiny else 2, in_channels=latent,
            out_channels=latent, down_block_types=down, up_block_types=up,
            cross_attention_dim=blocks, attention_head_dim=[c // heads for c in blocks],
            class_embed_type="simple_projection",
            projection_class_embeddings_input_dim=text["projection_dim"],
            class_embeddings_concat=True, norm_num_groups=8 if tiny else 32).to(dtype)
        vae = AutoencoderKL(block_out_channels=vae_blocks, in_channels=1, out_channels=1,
                            down_block_types=["DownEncoderBlock2D"] * len(vae_blocks),
                            up_block_types=["UpDecoderBlock2D"] * len(vae_blocks),
                            latent_channels=latent, norm_num_groups=8 if tiny else 32).to(dtype)
        clap = ClapTextModelWithProjection(ClapTextConfig(
            bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=len(tok),
            max_position_embeddings=80, **text)).to(dtype)
        vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(sampling_rate=16000,
                                                        normalize_before=False, **voc)).to(dtype)
    sched = DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False)
    return AudioLDMPipeline(vae=vae, text_encoder=clap, tokenizer=tok, unet=unet,
                            scheduler=sched, vocoder=vocoder).to(device)


def run_audio(args) -> list[Case]:
    """Clips/s: one clip per call (reference) vs batched calls (gptfl-hpc's sampler)."""
    import numpy as np
    import torch

    from gptfl_hpc.gen.base import Task
    from gptfl_hpc.gen.kinds.audioldm import AudioLDMSampler

    t_start = time.perf_counter()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    seconds = 0.5 if args.tiny else 5.0
    steps = [2] if args.tiny else [100, 25]
    batches = [1, 4] if args.tiny else [8, 16, 32]
    pipe = build_audioldm(args.tiny, args.device, dtype)
    pipe.set_progress_bar_config(disable=True)
    task = Task.audio(AUDIO_LABELS, int(seconds * 16000))
    plan = [Case("reference", 0, s, 1) for s in steps[:1]]
    plan += [Case("batched", 0, s, b) for s in steps for b in batches]
    for c in plan:
        if time.perf_counter() - t_start > args.time_budget:
            c.skipped = "time budget"
            continue
        sampler = AudioLDMSampler(pipe, task=task, steps=c.steps, max_batch=c.batch,
                                  device=args.device, kind="audioldm")

        def call(offset: int, c=c, sampler=sampler) -> None:
            labels = (np.arange(c.batch) + offset) % len(AUDIO_LABELS)
            prompts = [f"a sound of {AUDIO_LABELS[k]}" for k in labels]
            if c.mode == "reference":  # one clip per call, the pipeline's own output
                g = torch.Generator(device=args.device).manual_seed(offset)
                pipe(prompts[0], audio_length_in_s=seconds, num_inference_steps=c.steps,
                     guidance_scale=args.guidance, generator=g)
                return
            sampler(labels, prompts, np.full(c.batch, args.guidance, np.float32),
                    np.arange(c.batch) + offset)

        sync(args.device)
        t = time.perf_counter()
        call(0)
        sync(args.device)
        c.warmup_s = time.perf_counter() - t
        for r in range(args.repeats):
            sync(args.device)
            t = time.perf_counter()
            call(1000 * (r + 1))
            sync(args.device)
            c.times.append(time.perf_counter() - t)
        c.s_per_call = statistics.median(c.times)
        c.img_s = c.batch / c.s_per_call
        print(f"# {c.mode:9s} {seconds:.1f} s clips {c.steps:3d} steps batch {c.batch:3d}: "
              f"{c.img_s:7.3f} clips/s (median {c.s_per_call:.2f} s/call)", flush=True)
    ref = {c.steps: c.img_s for c in plan if c.mode == "reference" and c.img_s}
    for c in plan:
        if c.img_s and c.steps in ref:
            c.vs_reference = c.img_s / ref[c.steps]
    return plan


def audio_table(plan: list[Case]) -> str:
    lines = ["| mode | steps | batch | clips/s | s/call | vs one clip per call |",
             "|---|---|---|---|---|---|"]
    for c in plan:
        if c.skipped:
            lines.append(f"| {c.mode} | {c.steps} | {c.batch} | skipped ({c.skipped}) | | |")
            continue
        vs = f"{c.vs_reference:.2f}x" if c.vs_reference else "-"
        lines.append(f"| {c.mode} | {c.steps} | {c.batch} | {c.img_s:.3f} | "
                     f"{c.s_per_call:.2f} | {vs} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# report


def table(plan: list[Case], args) -> str:
    lines = ["| mode | px | steps | batch | img/s | s/call | TFLOP/img | share of peak | "
             "vs reference | peak GiB | warm-up s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    for c in plan:
        if c.skipped:
            lines.append(f"| {c.mode} | {c.px} | {c.steps} | {c.batch} | skipped ({c.skipped}) "
                         f"| | {f(c.tflop_per_img, '.4g')} | | | | |")
            continue
        lines.append(
            f"| {c.mode} | {c.px} | {c.steps} | {c.batch} | {f(c.img_s, '.3f')} | "
            f"{f(c.s_per_call, '.2f')} | {f(c.tflop_per_img, '.4g')} | "
            f"{pct(c.share_of_peak)} | {f(c.vs_reference, '.2f')}{'x' * bool(c.vs_reference)} | "
            f"{f(c.peak_mem_gib, '.1f')} | {f(c.warmup_s, '.1f')} |")
    out = "\n".join(lines)
    if not args.tiny and not args.dry_run:
        out += "\n\n| target | best measured | configuration | met |\n|---|---|---|---|"
        for (px, steps), goal in TARGETS.items():
            cands = [c for c in plan if c.px == px and c.steps == steps and c.img_s]
            if not cands:
                out += f"\n| >= {goal} img/s at {px} px / {steps} steps | not measured | | |"
                continue
            best = max(cands, key=lambda c: c.img_s)
            out += (f"\n| >= {goal} img/s at {px} px / {steps} steps | {best.img_s:.2f} img/s | "
                    f"{best.mode} batch {best.batch} | {'yes' if best.img_s >= goal else 'NO'} |")
    return out


def header(args) -> str:
    import diffusers
    import torch

    dev = args.device
    name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") and torch.cuda.is_available() \
        else platform.processor() or platform.machine()
    model = "tiny random SD (smoke run)" if args.tiny else "SD 2.1 architecture, random weights"
    lines = [f"device: {name} ({dev}); torch {torch.__version__}, diffusers "
             f"{diffusers.__version__}, python {platform.python_version()}",
             f"model: {model}, "
             f"{args.dtype}, DPM-Solver++, guidance {args.guidance} (CFG: 2 UNet rows/image), "
             f"output {args.out_shape} uint8 (reference: PIL at full size)",
             f"peak for 'share of peak': {args.peak_flops:.4g} FLOP/s ({args.peak_name})"]
    if dev.startswith("cuda") and "H100" not in name and args.peak_name.startswith("H100"):
        lines.append(f"NOTE: device is not an H100; pass --peak-flops/--peak-name for {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --tiny)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny random SD instead of SD 2.1 (CPU smoke run of the whole sweep)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the plan and FLOP counts (meta device) and exit; needs no GPU")
    ap.add_argument("--quick", action="store_true", help="lean sweep (~3 min on an H100)")
    ap.add_argument("--sizes", help="comma list of px; with --steps/--batches: full grid")
    ap.add_argument("--steps", help="comma list of inference steps")
    ap.add_argument("--batches", help="comma list of images per pipeline call")
    ap.add_argument("--compile", choices=("both", "off", "on"), default=None,
                    help="eager and/or compiled runs (default both; off on CPU)")
    ap.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per config (3; 2 quick)")
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                    help="default fp16 on GPU, fp32 on CPU")
    ap.add_argument("--out-shape", default="32,32,3", help="H,W,C the sampler resizes to")
    ap.add_argument("--peak-flops", type=float, default=989e12)
    ap.add_argument("--peak-name", default="H100 SXM dense fp16/bf16 tensor-core peak")
    ap.add_argument("--time-budget", type=float, default=420.0,
                    help="seconds; no new configuration starts after this (default 420)")
    ap.add_argument("--compile-reserve", type=float, default=None,
                    help="seconds the budget must still hold to start compiling (150 on GPU)")
    ap.add_argument("--json", help="write results to this path")
    ap.add_argument("--audio", action="store_true",
                    help="text-to-audio (AudioLDM-S architecture) instead of text-to-image")
    args = ap.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    args.compile = args.compile or ("both" if on_gpu else "off")
    args.repeats = args.repeats or (2 if args.quick else 3)
    if args.compile_reserve is None:
        args.compile_reserve = 150.0 if on_gpu else 0.0
    args.dtype = args.dtype or ("fp16" if on_gpu else "fp32")
    if args.repeats < 1 or args.warmup_steps < 1:
        ap.error("--repeats and --warmup-steps must be >= 1")

    if args.dry_run:
        plan = default_plan(args)
        tflop = {k: count_tflop_per_image(args.tiny, *k) for k in {(c.px, c.steps) for c in plan}}
        for c in plan:
            c.tflop_per_img = tflop[(c.px, c.steps)]
        print("plan (dry run; nothing timed):")
        print(table(plan, args))
        print(f"peak for 'share of peak': {args.peak_flops:.4g} FLOP/s ({args.peak_name}); "
              "FLOP ceiling img/s = peak / (TFLOP/img * 1e12):")
        for px, steps in sorted(tflop, reverse=True):
            tf = tflop[(px, steps)]
            print(f"  {px} px, {steps} steps: {tf:.1f} TFLOP/img -> ceiling "
                  f"{args.peak_flops / (tf * 1e12):.2f} img/s")
        return 0

    import torch

    if on_gpu and not torch.cuda.is_available():
        print("bench_synthesis: no CUDA device; run on a GPU node, or use --dry-run, or "
              "--device cpu --tiny for a smoke run", file=sys.stderr)
        return 2
    if not on_gpu and not args.tiny:
        print("bench_synthesis: SD 2.1 on a CPU would take hours; add --tiny", file=sys.stderr)
        return 2
    if args.audio:
        if args.guidance == 3.0:
            args.guidance = 2.5  # AudioLDM's default
        plan = run_audio(args)
        print()
        print(audio_table(plan))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({
                "args": vars(args), "results": [asdict(c) for c in plan]}, indent=2) + "\n")
        return 0
    print(header(args), flush=True)
    plan = run(args)
    print()
    print(header(args))
    print()
    print(table(plan, args))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "header": header(args), "args": vars(args),
            "results": [asdict(c) for c in plan]}, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
