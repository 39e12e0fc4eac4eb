"""Synthetic data generation (GPT-FL's server side): prompts -> diffusers generator -> HDF5.

* ``prompts``    -- ``build_plan``: class, prompt, guidance scale and seed of every sample.
* ``embedded``   -- ``train_generator``: tiny class-conditional UNet trained on the public split.
* ``class_cond`` -- sampling loop for class-conditional ``UNet2DModel`` generators.
* ``text2image`` -- Stable-Diffusion-style pipelines (text prompts).
* ``synthesize`` -- ``synthesize``: the batched, multi-process, resumable writer of the set.

Importing this package imports neither torch nor diffusers; the names below load lazily
(``synthesize`` is also a submodule name, so import it as ``gptfl_hpc.gen.synthesize.synthesize``).
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "Plan": "gptfl_hpc.gen.prompts",
    "build_plan": "gptfl_hpc.gen.prompts",
    "train_generator": "gptfl_hpc.gen.embedded",
    "load_sampler": "gptfl_hpc.gen.synthesize",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gptfl_hpc.gen' has no attribute {name!r}")
