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


def _lpt(clients: list[int], cost: list[int] | dict[int, int],
         workers: list[int]) -> dict[int, int]:
    """Longest processing time first: each client (largest cost first, ties by id) to the
    least-loaded worker (ties by rank). Deterministic."""
    load = {w: 0 for w in workers}
    owner: dict[int, int] = {}
    for c in sorted(clients, key=lambda c: (-cost[c], c)):
        w = min(workers, key=lambda r: (load[r], r))
        owner[c] = w
        load[w] += cost[c]
    return owner


def assign_round(sampled: list[int], num_samples: list[int], local_epochs: int,
                 workers: list[int]) -> dict[int, int]:
    """Balanced placement: this round's sampled clients spread over the workers by expected
    cost (samples x local epochs), longest first. Every rank computes the same assignment from
    the seed-determined sample; no message is needed."""
    return _lpt(list(sampled), {c: num_samples[c] * local_epochs for c in sampled}, workers)


def place_clients(num_samples: list[int], workers: list[int]) -> dict[int, int]:
    """Owner rank per client: greedy longest-processing-time on sample counts.

    Every client is sampled with the same probability, so a client's expected work per round is
    proportional to its sample count; LPT keeps the ranks' expected loads within one client's
    size of each other. Deterministic (ties -> lower client id, then lower rank).
    """
    return _lpt(list(range(len(num_samples))), num_samples, workers)


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
