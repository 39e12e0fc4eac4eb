"""Who trains what: client sampling per round and client placement on ranks. Pure functions."""

from __future__ import annotations

import numpy as np

from gptfl_hpc.seeding import rng


def sample_clients(seed: int, round_: int, num_clients: int, k: int) -> list[int]:
    """k distinct clients for a round, from a seed derived from (seed, round) only.

    Independent of the method, the init and the number of ranks, so GPT-FL and every baseline
    see the same client sequence. Sampled WITHOUT replacement (the reference code used
    np.random.choice with replacement: a duplicate in 37 % of rounds at 10 of 100).
    """
    if not 1 <= k <= num_clients:
        raise ValueError(f"cannot sample {k} of {num_clients} clients")
    chosen = rng(seed, "sample-clients", round_).choice(num_clients, size=k, replace=False)
    return sorted(int(c) for c in chosen)


def place_clients(num_samples: list[int], workers: list[int]) -> dict[int, int]:
    """Owner rank per client: greedy longest-processing-time on sample counts.

    Every client is sampled with the same probability, so a client's expected work per round is
    proportional to its sample count; LPT keeps the ranks' expected loads within one client's
    size of each other. Deterministic (ties -> lower client id, then lower rank).
    """
    load = {w: 0 for w in workers}
    owner: dict[int, int] = {}
    order = sorted(range(len(num_samples)), key=lambda c: (-num_samples[c], c))
    for c in order:
        w = min(workers, key=lambda r: (load[r], r))
        owner[c] = w
        load[w] += num_samples[c]
    return owner


def rounds_to_target(accuracies: list[tuple[int, float | None]], target: float) -> int | None:
    for r, acc in accuracies:
        if acc is not None and acc >= target:
            return r
    return None


def imbalance(num_samples: list[int], owner: dict[int, int]) -> float:
    """max/mean expected load over workers (1.0 = perfectly balanced)."""
    loads: dict[int, int] = {}
    for c, w in owner.items():
        loads[w] = loads.get(w, 0) + num_samples[c]
    v = np.array(list(loads.values()), dtype=float)
    return float(v.max() / v.mean()) if v.size and v.mean() > 0 else 1.0
