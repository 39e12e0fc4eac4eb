"""Federated validation: every client holds out part of its own data, and the global model is
scored there by the clients themselves (``fl.client_val_fraction``).

This is the validation data an FL deployment actually has. The server's synthetic split
(train/synval.py) comes from the distribution the model was pretrained on and cannot rank
fine-tuning regimes by real accuracy (README, "Does the FL stage add to synthetic-only?"); the
clients' held-out rows come from the private distribution, and the server still never sees a
sample: each client rank scores the clients it owns and only per-client *counts* cross MPI (the
number of held-out rows, how many were classified correctly, the summed loss), as in Flower's or
pfl-research's federated evaluation.

The split: client k with n_k rows holds out ``v_k = min(floor(f n_k), n_k - 1)`` of them (at
least one row always trains), drawn by a permutation from (run.seed, "client-val", k); the rest
train in their stored order. Every rank can compute v_k from the manifest's counts alone, so the
server weights updates by the training rows without reading a shard. With f = 0 nothing changes
(bitwise the runs without the option).

Exactness: each client's counts go into its own slots of one float64 vector that is summed with a
single Allreduce; every slot receives one non-zero term, so the sums are exact whatever the rank
count or reduction order, and rank 0 totals the clients in client order. The aggregate accuracy
is therefore bit-identical for any number of ranks and any placement.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from gptfl_hpc.seeding import rng

log = logging.getLogger(__name__)

FIELDS = 3  # per client: held-out rows, correct, summed cross-entropy
KEYS = ("client_val_accuracy", "client_val_loss", "client_val_client_mean",
        "client_val_client_min", "client_val_samples", "client_val_clients", "t_client_val")
"""The metrics.jsonl fields of a federated validation (None in rounds without one)."""


def held_out(n: int, fraction: float) -> int:
    """Rows client of size `n` holds out for validation (at least one row keeps training)."""
    if fraction <= 0.0 or n < 2:
        return 0
    return min(int(math.floor(fraction * n + 1e-9)), n - 1)


def train_sizes(sizes: list[int], fraction: float) -> list[int]:
    """Training rows per client once the validation rows are held out."""
    return [n - held_out(n, fraction) for n in sizes]


def split_rows(n: int, fraction: float, seed: int, cid: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows in stored order, held-out rows in stored order) of client `cid`."""
    v = held_out(n, fraction)
    if v == 0:
        return np.arange(n), np.arange(0)
    mask = np.zeros(n, dtype=bool)
    mask[rng(seed, "client-val", cid).permutation(n)[:v]] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


class ClientValidation:
    """The federated evaluation of one run: ``__call__(rnd)`` is a collective (every rank calls
    it at the same rounds) and returns the aggregate metrics on every rank."""

    def __init__(self, fed: Any) -> None:
        from gptfl_hpc.train.transforms import make_transform

        m = fed.manifest
        self.fed = fed
        self.fraction = float(fed.fl.client_val_fraction)
        self.n_clients = len(fed.sizes)
        self.val_sizes = [held_out(c.num_samples, self.fraction) for c in m.clients]
        # each client is scored by its static owner (the rank whose files it is under
        # fl.placement=static; balanced placement reads any shard anyway)
        rank = fed.comm.rank
        self.mine = [c for c in range(self.n_clients)
                     if fed.static_owner[c] == rank and self.val_sizes[c] > 0]
        self.tf = make_transform(m.kind, m.norm_mean, m.norm_std, tuple(m.input_shape), False)
        if sum(self.val_sizes) == 0:
            from gptfl_hpc.errors import ConfigError

            raise ConfigError(f"config key fl.client_val_fraction: {self.fraction} holds out no "
                              f"row of any client (largest client {max(fed.sizes)} rows); valid: "
                              "a fraction with floor(fraction x client size) >= 1 for some "
                              "client, or 0")

    def _score(self) -> np.ndarray:
        """This rank's clients' counts in their slots of the (clients, FIELDS) vector."""
        from gptfl_hpc.train.evaluate import evaluate

        fed = self.fed
        out = np.zeros((self.n_clients, FIELDS), dtype=np.float64)
        if not self.mine:
            return out
        wm = fed.work_model
        assert wm is not None and fed.data is not None
        wm.flat.copy_(fed.global_model.flat.to(fed.dev))
        for cid in self.mine:
            x, y = fed.data.get_val(cid)
            m = evaluate(wm.model, x, y, self.tf, batch_size=fed.fl.eval_batch_size,
                         device=fed.dev, num_classes=fed.manifest.num_classes)
            n = int(m["num_samples"])
            out[cid] = (n, round(m["accuracy"] * n), m["loss"] * n)
        return out

    def __call__(self, rnd: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        counts = self._score()
        self.fed.comm.allreduce_sum_(counts)
        n, correct, loss = counts[:, 0], counts[:, 1], counts[:, 2]
        scored = n > 0
        per_client = correct[scored] / n[scored]
        total = float(n.sum())
        return {
            "client_val_accuracy": float(correct.sum() / total),
            "client_val_loss": float(loss.sum() / total),
            # the unweighted view: every client counts once, and the worst one
            "client_val_client_mean": float(per_client.mean()),
            "client_val_client_min": float(per_client.min()),
            "client_val_samples": int(total), "client_val_clients": int(scored.sum()),
            "t_client_val": time.perf_counter() - t0,
        }
