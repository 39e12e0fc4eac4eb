"""Logging set up once per process, with the rank in every line.

Rank 0 logs at INFO; other ranks at WARNING unless GPTFL_LOG_LEVEL says otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

_FMT = "[gptfl r{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s"


def init_logging(rank: int = 0) -> None:
    level = os.environ.get("GPTFL_LOG_LEVEL") or ("INFO" if rank == 0 else "WARNING")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FMT.format(rank=rank), datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("urllib3", "filelock", "PIL", "matplotlib", "h5py", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The complete records of a JSON-lines file. A torn last line (a writer killed mid-line)
    or any other unparseable line is skipped with a warning, never a traceback."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            logging.getLogger(__name__).warning("%s line %d: not a JSON record (torn by a "
                                                "crash?); ignored", p, i)
            continue
        rows.append(row)
    return rows


class JsonlWriter:
    """Append-only JSON-lines file (rank 0's metrics). Each line is flushed and fsynced.

    ``keep_through=None`` starts a new file; ``keep_through=r`` (resume) keeps only the complete
    records of rounds <= r and rewrites the file atomically, dropping a torn tail.
    """

    def __init__(self, path: str | Path, keep_through: int | None = None) -> None:
        from gptfl_hpc.fsio import write_text

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_through is not None:
            keep = [r for r in read_jsonl(self.path) if int(r.get("round", 0)) <= keep_through]
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        elif self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
