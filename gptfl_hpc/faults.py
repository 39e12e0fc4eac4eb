"""Fault injection for tests (environment variables; no effect when unset).

* ``GPTFL_FAULT_RAISE_RANK=r`` raises at the first fault point reached on rank r; with
  ``GPTFL_FAULT_PHASE=p`` only at a point of phase p (prepare, generator, synthesize, pretrain,
  federate, client, server, report). Fault points sit in server code and client code alike,
  so a failure of rank 0 (the server) is exercised in every phase.
* ``GPTFL_FAULT_NAN_CLIENT=k[,k...]`` poisons client k's update with a NaN (the engine drops it).
"""

from __future__ import annotations

import os


class InjectedFault(RuntimeError):
    """A deliberate failure (tests); deliberately not a GptflError: it behaves like a bug."""


def point(phase: str, rank: int) -> None:
    want = os.environ.get("GPTFL_FAULT_RAISE_RANK")
    if want is None or not want.strip().lstrip("-").isdigit() or int(want) != rank:
        return
    only = os.environ.get("GPTFL_FAULT_PHASE")
    if only and only != phase:
        return
    raise InjectedFault(f"injected fault on rank {rank} in phase {phase} "
                        "(GPTFL_FAULT_RAISE_RANK)")


def nan_clients() -> set[int]:
    return {int(x) for x in os.environ.get("GPTFL_FAULT_NAN_CLIENT", "").split(",")
            if x.strip().isdigit()}
