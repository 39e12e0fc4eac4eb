"""Preemption: Slurm's warning signal (``--signal=USR1@N``) and SIGTERM set a flag.

Every phase polls :func:`stop_requested` at its safe boundary (a synthesis batch, a pretraining
epoch, an FL round), saves its progress and raises :class:`gptfl_hpc.errors.Preempted` (exit code
124). The job script then requeues the job and the next run resumes. Under MPI the ranks agree on
the stop inside the per-round reduction, so all of them stop at the same round.

``GPTFL_STOP_AFTER`` (tests): request a stop after that many boundaries have been passed, to
preempt at an exact point without racing a signal.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

log = logging.getLogger(__name__)

_flag: dict[str, Any] = {"stop": False, "signal": None, "boundaries": 0, "installed": False}
SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM")


def _handler(signum: int, frame: object) -> None:
    _flag["stop"] = True
    _flag["signal"] = signal.Signals(signum).name


def install() -> None:
    """Install the handlers (idempotent). Call once per process before long work."""
    if _flag["installed"]:
        return
    for name in SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            try:
                signal.signal(sig, _handler)
            except ValueError:  # not the main thread
                return
    _flag["installed"] = True


def boundary() -> bool:
    """Mark one safe boundary; return True when the process should stop here."""
    _flag["boundaries"] += 1
    limit = os.environ.get("GPTFL_STOP_AFTER")
    if limit and limit.isdigit() and _flag["boundaries"] >= int(limit):
        _flag["stop"] = True
        _flag["signal"] = _flag["signal"] or "GPTFL_STOP_AFTER"
    return _flag["stop"]


def stop_requested() -> bool:
    return _flag["stop"]


def reason() -> str:
    return str(_flag["signal"])


def reset() -> None:
    _flag.update(stop=False, signal=None, boundaries=0)
