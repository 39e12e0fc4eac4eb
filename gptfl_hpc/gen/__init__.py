"""Synthetic data generation (GPT-FL's server side): prompts -> generator -> HDF5.

* ``prompts``    -- ``build_plan``: class, prompt, guidance scale and seed of every sample.
* ``spec``       -- ``GeneratorSpec``: a generator directory, read (and fingerprinted) once.
* ``base``       -- the contracts (``Task``, ``Sampler``, ``GeneratorKind``) and what every kind
  shares: ``to_uint8``, the dtype resolver, ``CallShape`` (out-of-memory fallback).
* ``diffusion``  -- scheduler factory, compile/channels_last, the guided sampling loop.
* ``kinds/``     -- one module per generator kind (class-conditional UNet, DiT, text-to-image).
* ``registry``   -- ``GENERATORS`` (discovered from ``kinds/``), ``open_generator``,
  ``load_sampler``.
* ``embedded``   -- ``train_generator``: tiny class-conditional UNet trained on the public split.
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
    "GeneratorSpec": "gptfl_hpc.gen.spec",
    "Task": "gptfl_hpc.gen.base",
    "GENERATORS": "gptfl_hpc.gen.registry",
    "open_generator": "gptfl_hpc.gen.registry",
    "load_sampler": "gptfl_hpc.gen.registry",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gptfl_hpc.gen' has no attribute {name!r}")
