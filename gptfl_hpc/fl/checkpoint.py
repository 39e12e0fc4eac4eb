"""FL checkpoints: ``<out>/ckpt/round-NNNNN/`` written under a temporary name and renamed.

A checkpoint directory holds ``model.safetensors``, ``server_opt.safetensors`` (the server
optimiser's state), optional per-rank state files (``rank-RRRRR.safetensors``: state that lives
on the rank that owns it, such as SCAFFOLD's client control variates) and ``state.json``, written
last inside the temporary directory. Per-rank files: every client rank writes its own into the
temporary directory (:meth:`Checkpoints.save_rank`), the ranks meet in a barrier, and rank 0
then writes its files, lists the rank files in ``state.json`` and renames the directory
(:meth:`Checkpoints.save` with ``rank_files``), so a checkpoint is complete for every rank or
not there at all. A checkpoint counts only when its ``state.json`` parses,
names the request fingerprint and round, and every file it lists exists: a checkpoint torn by a
crash (or by hand) is skipped with a warning and the newest valid one is used.

:class:`CheckpointPolicy` decides when to save (every ``every`` rounds, at the last round and
when a stop was requested), in the spirit of pfl-research's ``CheckpointPolicy``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptfl_hpc.fsio import load_safetensors, save_safetensors, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointPolicy:
    every: int
    last_round: int

    def should_save(self, round_: int, stop: bool) -> bool:
        return stop or round_ % self.every == 0 or round_ == self.last_round


class Checkpoints:
    """``root/round-NNNNN/`` checkpoints; the newest ``keep`` valid ones are kept."""

    def __init__(self, out_dir: str | Path, keep: int) -> None:
        self.root = Path(out_dir) / "ckpt"
        self.keep = keep

    def _state(self, d: Path) -> dict[str, Any] | None:
        try:
            state = json.loads((d / "state.json").read_text(encoding="utf-8"))
            if not isinstance(state, dict) or not isinstance(state.get("round"), int):
                raise ValueError("no round")
            missing = [f for f in state.get("files", []) if not (d / f).is_file()]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            return state
        except (OSError, UnicodeDecodeError, ValueError) as e:
            log.warning("ignoring checkpoint %s: %s", d, " ".join(str(e).split())[:200])
            return None

    def valid(self) -> list[tuple[Path, dict[str, Any]]]:
        """(directory, state) of every valid checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(self.root.glob("round-*")):
            if d.is_dir() and (state := self._state(d)) is not None:
                out.append((d, state))
        return out

    def fingerprints(self) -> set[str]:
        return {str(s.get("fingerprint")) for _, s in self.valid()}

    def tmp_dir(self, round_: int) -> Path:
        return self.root / f".tmp-round-{round_:05d}"

    @staticmethod
    def rank_file(rank: int) -> str:
        return f"rank-{rank:05d}.safetensors"

    def save_rank(self, round_: int, rank: int, tensors: dict) -> str:
        """A client rank's own state into the checkpoint of `round_` being written (call
        before the barrier that precedes rank 0's :meth:`save`). `tensors` must not be empty."""
        tmp = self.tmp_dir(round_)
        tmp.mkdir(parents=True, exist_ok=True)
        save_safetensors(tensors, tmp / self.rank_file(rank))
        return self.rank_file(rank)

    def save(self, round_: int, tensors: dict[str, dict], state: dict[str, Any],
             rank_files: Iterable[str] = ()) -> Path:
        """Write ``{name}.safetensors`` for each entry of `tensors`, then state.json; rename.

        `rank_files`: the per-rank files the client ranks have already written into the
        temporary directory (:meth:`save_rank`); they are kept and listed, anything else left
        there by an interrupted earlier attempt is removed."""
        final = self.root / f"round-{round_:05d}"
        tmp = self.tmp_dir(round_)
        keep = sorted(rank_files)
        if keep:
            missing = [f for f in keep if not (tmp / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{tmp}: per-rank checkpoint file(s) "
                                        f"{', '.join(missing)} were not written")
            for f in tmp.iterdir():
                if f.name not in keep:
                    shutil.rmtree(f) if f.is_dir() else f.unlink()
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        files = list(keep)
        for name, group in tensors.items():
            save_safetensors(group, tmp / f"{name}.safetensors")
            files.append(f"{name}.safetensors")
        write_json(tmp / "state.json", {**state, "round": round_, "files": sorted(files)})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old, _ in self.valid()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        valid = self.valid()
        return valid[-1] if valid else None

    @staticmethod
    def load(d: Path, name: str) -> dict:
        tensors, _ = load_safetensors(d / f"{name}.safetensors")
        return tensors

    @staticmethod
    def has(d: Path, name: str) -> bool:
        return (d / f"{name}.safetensors").is_file()

    @staticmethod
    def rank_states(d: Path, state: dict[str, Any]) -> Iterator[dict]:
        """The tensors of every per-rank file of checkpoint `d` (any rank count: a resumed run
        picks the entries of the clients it owns now)."""
        for f in state.get("files", []):
            if f.startswith("rank-"):
                yield load_safetensors(d / f)[0]
