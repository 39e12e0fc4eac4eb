"""Test helper: a tiny random class-conditional generator, and a synthesis driver script.

    python -m mpi4py tests/synth_driver.py --generator DIR --out FILE --n 50 [--batch 8 ...]

runs ``gptfl_hpc.gen.synthesize.synthesize`` with ``get_comm()`` (so ``mpiexec -n 2`` splits the
work) and exits like the CLI: a GptflError becomes one stderr line and its exit code (124 for
Preempted).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

LABELS = [f"digit_{i}" for i in range(10)]


def make_tiny_generator(path: str | Path, *, num_classes: int = 10, size: int = 8,
                        channels: int = 1, seed: int = 0) -> Path:
    """Random UNet2DModel (block_out_channels (8, 16)) + DDPM schedule via save_pretrained."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels,
                       block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                       norm_num_groups=8, attention_head_dim=8, num_class_embeds=num_classes + 1)
    with torch.no_grad():  # random init predicts ~0 noise; make the output depend on the input
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = Path(path)
    unet.save_pretrained(str(path / "unet"))
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").save_pretrained(
        str(path / "scheduler"))
    return path


def gen_config(batch: int = 8, micro: int | None = 4, steps: int = 4,
               guidance: tuple[float, float] = (1.0, 3.0), scheduler: str = "ddim"):
    from gptfl_hpc.config import GenConfig

    return GenConfig(batch_size=batch, micro_batch=micro, steps=steps, guidance=list(guidance),
                     scheduler=scheduler, channels_last=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--generator", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float, nargs=2, default=(1.0, 3.0))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    from gptfl_hpc.errors import GptflError
    from gptfl_hpc.gen.synthesize import synthesize
    from gptfl_hpc.log import init_logging
    from gptfl_hpc.parallel.comm import get_comm

    comm = get_comm()
    init_logging(comm.rank)
    try:
        synthesize(gen_config(a.batch, a.micro, a.steps, tuple(a.guidance)),
                   generator_dir=a.generator, label_names=LABELS, out_shape=(8, 8, 1),
                   n_total=a.n, out_path=a.out, seed=a.seed, comm=comm, device="cpu")
    except GptflError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
