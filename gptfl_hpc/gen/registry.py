"""The registry of generator kinds, and opening a generator directory as a spec.

``GENERATORS`` maps a kind's name to its :class:`~gptfl_hpc.gen.base.GeneratorKind`; it is built
from every module of ``gptfl_hpc.gen.kinds`` that defines ``KIND``, so adding a generator is adding
one module there. ``gen.kind`` (auto or a family: class_conditional, text2image) selects the kinds
that may answer; auto-detection tries them in priority order (text2image, dit,
class_conditional) and the first whose ``detect(spec)`` is true wins. A directory no kind
recognises is refused with the list of registered kinds::

    spec = open_generator(path, gen_cfg.kind)        # read once: index, configs, kind
    kind = GENERATORS[spec.kind]
    kind.check(spec, task, gen_cfg)                  # no weights
    sampler = kind.load(spec, gen_cfg, task, device, "fp16")
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

from gptfl_hpc.errors import ConfigError, ModelError
from gptfl_hpc.gen import kinds as _kinds
from gptfl_hpc.gen.base import GeneratorKind, Sampler, Task, resolve_dtype
from gptfl_hpc.gen.spec import GeneratorSpec


def _discover() -> dict[str, GeneratorKind]:
    found: dict[str, GeneratorKind] = {}
    for info in sorted(pkgutil.iter_modules(_kinds.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{_kinds.__name__}.{info.name}")
        kind = getattr(module, "KIND", None)
        if kind is None:
            continue
        if not isinstance(kind, GeneratorKind) or kind.name in found:
            raise TypeError(f"{module.__name__}.KIND: not a GeneratorKind, or the name "
                            f"{getattr(kind, 'name', kind)!r} is taken")
        found[kind.name] = kind
    return dict(sorted(found.items(), key=lambda item: (item[1].priority, item[0])))


GENERATORS: dict[str, GeneratorKind] = _discover()
"""name -> kind, in auto-detection order."""


def families() -> list[str]:
    """The values gen.kind accepts besides 'auto'."""
    return sorted({k.family for k in GENERATORS.values()})


def detect_kind(spec: GeneratorSpec, kind: str = "auto") -> GeneratorKind:
    """The registered kind of `spec` for gen.kind=`kind` (see the module docstring)."""
    valid = families()
    if kind != "auto" and kind not in valid:
        raise ConfigError(f"config key gen.kind: invalid value {kind!r}; valid: auto, "
                          + ", ".join(valid))
    candidates = sorted((k for k in GENERATORS.values() if kind in ("auto", k.family)),
                        key=lambda k: (k.priority, k.name))
    for k in candidates:
        if k.detect(spec):
            return k
    if kind != "auto":  # forced: the family's first kind explains what is missing (its check)
        return candidates[0]
    listed = "; ".join(f"{k.name} ({k.describe})" for k in GENERATORS.values())
    raise ModelError(f"generator directory {spec.path}: not a generator of any registered kind; "
                     f"valid: {listed}")


def open_generator(generator: str | Path | GeneratorSpec, kind: str = "auto") -> GeneratorSpec:
    """Read `generator` once and resolve its kind; a spec passes through (re-resolved only when
    it has no kind yet)."""
    spec = generator if isinstance(generator, GeneratorSpec) else GeneratorSpec.read(generator)
    if spec.kind:
        return spec
    k = detect_kind(spec, kind)
    return spec.with_kind(k.name, k.family)


def kind_of(spec: GeneratorSpec) -> GeneratorKind:
    try:
        return GENERATORS[spec.kind]
    except KeyError:
        raise ModelError(f"generator {spec.path}: kind {spec.kind!r} is not registered; valid: "
                         + ", ".join(GENERATORS)) from None


def load_sampler(generator: str | Path | GeneratorSpec, *, gen_cfg: Any, task: Task,
                 device: Any = "cpu", dtype: str = "auto") -> Sampler:
    """Open, check and load a generator for `task` (offline) -- outside the synthesis engine.

    `dtype`: 'auto' (fp16 on GPU, fp32 on CPU), 'fp32', 'fp16' or 'bf16'.
    """
    task.check()
    spec = open_generator(generator, gen_cfg.kind)
    kind = kind_of(spec)
    kind.check(spec, task, gen_cfg)
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    return kind.load(spec, gen_cfg, task, device, resolve_dtype(dtype, device_type))
