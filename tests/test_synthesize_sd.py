"""A tiny random Stable-Diffusion pipeline, built offline, saved, and run through the real
`gptfl-hpc synthesize` command (from_pretrained on the local directory), with prompt expansion
by a tiny local GPT-2 and the paper's random-guidance mode."""

import json

import h5py
import numpy as np
from helpers import run_cli
from tiny_sd import build_tiny_gpt2, build_tiny_sd


def test_tiny_sd_through_synthesize_cli(tmp_path):
    sd = build_tiny_sd(tmp_path / "tiny-sd", size=16, block_out_channels=(16, 32))
    gpt2 = build_tiny_gpt2(tmp_path / "tiny-gpt2")
    out = tmp_path / "run"
    over = ["gen.count=12", "gen.steps=2", "gen.scheduler=dpm", "gen.prompt_mode=multi_domain",
            "gen.templates=['a {domain} of a handwritten digit {label}']",
            "gen.domains=[photo, drawing]", "gen.guidance=[1, 5]", "gen.batch_size=6",
            f"gen.expand_prompts={gpt2}"]
    p = run_cli(["synthesize", "configs/tiny.yaml", "--out", out, "--generator", sd, *over],
                timeout=300, extra_env={"HF_HUB_OFFLINE": "1"})
    assert "text2image" in p.stderr
    with h5py.File(out / "synthetic.h5", "r") as f:
        images, labels = f["images"][()], f["labels"][()]
        prompts = [x.decode() if isinstance(x, bytes) else x for x in f["prompts"][()]]
        pidx, guidance, seeds = f["prompt_index"][()], f["guidance"][()], f["seed"][()]
        attrs = dict(f.attrs)
    assert images.shape == (12, 8, 8, 1) and images.dtype == np.uint8  # resized to the task
    assert np.bincount(labels, minlength=10).tolist() == [2, 2] + [1] * 8
    assert attrs["kind"] == "text2image"
    assert json.loads(attrs["label_names"]) == [str(i) for i in range(10)]
    # every sample documents its prompt (expanded from its class template), guidance and seed
    for lab, i in zip(labels, pidx):
        assert f"digit {lab}" in prompts[i], (lab, prompts[i])
    assert all(1.0 <= g <= 5.0 for g in guidance) and len(set(guidance.tolist())) > 1
    assert len(set(seeds.tolist())) == 12
    assert images.std() > 0
    # rerunning the same request is a no-op; the finished set is not rewritten
    mtime = (out / "synthetic.h5").stat().st_mtime_ns
    run_cli(["synthesize", "configs/tiny.yaml", "--out", out, "--generator", sd, *over],
            timeout=300)
    assert (out / "synthetic.h5").stat().st_mtime_ns == mtime
