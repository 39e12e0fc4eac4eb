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


class JsonlWriter:
    """Append-only JSON-lines file (rank 0's metrics). Each line is flushed and fsynced."""

    def __init__(self, path: str | Path, truncate_after: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None and self.path.exists():
            # resume: keep only the rounds that the checkpoint covers
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("round", 0) <= truncate_after]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, self.path)
        elif truncate_after is None and self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
