"""What a generator directory is, read once: :class:`GeneratorSpec`.

``GeneratorSpec.read(path)`` parses the small files that say what the directory holds
(``model_index.json`` of a diffusers pipeline, ``unet/config.json``, the embedded generator's
``gptfl_generator.json``) exactly once; the registry (``gen/registry.py``) then sets the detected
kind. The spec is passed down to every check and loader instead of the path, so nothing re-reads
or re-guesses what the directory is. Its ``fingerprint`` is the content digest of every file,
hashed completely (``gptfl_hpc.provenance.digest``: a partial hash of a big file cannot prove
identity), computed once, on first use; it identifies the generator together with ``kind``.

A spec is JSON-able (``to_json`` / ``from_json``), so one process reads and hashes the directory
and broadcasts the result to the others.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from gptfl_hpc.errors import ModelError
from gptfl_hpc.gen.embedded import read_provenance

EXAMPLE_REPO = "stabilityai/stable-diffusion-2-1"


def download_hint(generator_dir: str | Path) -> str:
    """How to get a generator into `generator_dir` (compute nodes are offline)."""
    d = str(generator_dir)
    if d.count("/") == 1 and not d.startswith((".", "/")) and not Path(d).exists():
        return (f"it looks like a Hub repository id: download it on a machine with network "
                f"(`hf download {d} --local-dir /path/to/generator`) and set gen.generator to "
                "that directory")
    return (f"put a generator saved with save_pretrained there (e.g. `hf download {EXAMPLE_REPO} "
            f"--local-dir {d}` on a machine with network), or use gen.generator=embedded "
            "(`gptfl-hpc train-generator` writes <out>/generator)")


def missing_generator_message(generator_dir: str | Path) -> str:
    return f"generator directory {generator_dir}: not found; {download_hint(generator_dir)}"


def read_json(path: Path) -> dict | None:
    """A JSON object file; None when absent; one-line ModelError when unreadable."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{path}: not readable JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: not a JSON object; valid: a config written by save_pretrained")
    return obj


@dataclass(frozen=True)
class GeneratorSpec:
    """A generator directory, read once (see the module docstring)."""

    path: Path
    index: dict | None
    """model_index.json (a diffusers pipeline), None when absent."""
    unet_config: dict | None
    """unet/config.json, None when absent."""
    provenance: dict | None
    """gptfl_generator.json (the embedded generator's training record), None when absent."""
    kind: str = ""
    """Registry name of the detected kind ('' until the registry has resolved it)."""
    family: str = ""
    """The gen.kind value the kind answers to; stored as ``kind`` in the synthetic set."""
    _configs: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def read(cls, path: str | Path) -> GeneratorSpec:
        """Parse the directory's descriptor files (no weights, no hashing yet)."""
        d = Path(path)
        if not d.is_dir():
            raise ModelError(missing_generator_message(path))
        return cls(path=d, index=read_json(d / "model_index.json"),
                   unet_config=read_json(d / "unet" / "config.json"),
                   provenance=read_provenance(d))

    @cached_property
    def fingerprint(self) -> str:
        """Content digest of every file of the directory (hex SHA-256), computed once."""
        from gptfl_hpc.provenance import digest

        return digest(self.path)

    def with_kind(self, kind: str, family: str) -> GeneratorSpec:
        new = dataclasses.replace(self, kind=kind, family=family)
        if "fingerprint" in self.__dict__:  # keep a digest already computed
            new.__dict__["fingerprint"] = self.__dict__["fingerprint"]
        return new

    @property
    def has_text_encoder(self) -> bool:
        te = (self.index or {}).get("text_encoder")
        return isinstance(te, list) and bool(te) and te[0] is not None

    def component_config(self, name: str, filename: str = "config.json") -> dict | None:
        """``<path>/<name>/<filename>`` parsed (once per spec); None when absent."""
        key = f"{name}/{filename}"
        if key not in self._configs:
            self._configs[key] = read_json(self.path / name / filename)
        return self._configs[key]

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "index": self.index, "unet_config": self.unet_config,
                "provenance": self.provenance, "kind": self.kind, "family": self.family,
                "fingerprint": self.fingerprint}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GeneratorSpec:
        spec = cls(path=Path(d["path"]), index=d["index"], unet_config=d["unet_config"],
                   provenance=d["provenance"], kind=d["kind"], family=d["family"])
        spec.__dict__["fingerprint"] = d["fingerprint"]
        return spec
