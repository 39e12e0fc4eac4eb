"""Pure FL maths on flat arrays: no MPI, no ranks, no I/O.

Aggregation: clients send the sample-weighted sum of their model deltas; the server divides by
the summed weight (never a sum of averages, never a uniform 1/K).

Server optimisers act on the averaged delta Δ = mean_k n_k (w_k - w) / Σ n_k, which is the
negative pseudo-gradient (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Alg. 2):

- fedavg / fedprox:  w += η Δ                                   (η = server_lr, 1.0 = FedAvg)
- fedavgm:           m = β m + Δ;            w += η m          (Hsu et al. 2019)
- fedadagrad:        m = β1 m + (1-β1) Δ;   v = v + Δ²;                      w += η m/(√v+τ)
- fedadam:           m = β1 m + (1-β1) Δ;   v = β2 v + (1-β2) Δ²;            w += η m/(√v+τ)
- fedyogi:           m = β1 m + (1-β1) Δ;   v = v - (1-β2) Δ² sign(v - Δ²);  w += η m/(√v+τ)

Reddi et al. initialise v to τ²; we do the same.
"""

from __future__ import annotations

import torch


def weighted_mean(weighted_sum: torch.Tensor, total_weight: float) -> torch.Tensor:
    if total_weight <= 0:
        raise ValueError("total weight must be positive")
    return weighted_sum / total_weight


class ServerOptimizer:
    """Applies one server step in place on the flat global buffer."""

    def __init__(self, algorithm: str, numel: int, *, lr: float, momentum: float = 0.9,
                 beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.algorithm = algorithm
        self.lr, self.momentum, self.beta1, self.beta2, self.tau = lr, momentum, beta1, beta2, tau
        self.state: dict[str, torch.Tensor] = {}
        if algorithm == "fedavgm":
            self.state["m"] = torch.zeros(numel)
        elif algorithm in ("fedadam", "fedyogi", "fedadagrad"):
            self.state["m"] = torch.zeros(numel)
            self.state["v"] = torch.full((numel,), tau * tau)
        elif algorithm not in ("fedavg", "fedprox"):
            raise ValueError(f"unknown algorithm {algorithm}")

    def step(self, weights: torch.Tensor, delta: torch.Tensor) -> None:
        a = self.algorithm
        if a in ("fedavg", "fedprox"):
            weights.add_(delta, alpha=self.lr)
            return
        m = self.state["m"]
        if a == "fedavgm":
            m.mul_(self.momentum).add_(delta)
            weights.add_(m, alpha=self.lr)
            return
        v = self.state["v"]
        m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        d2 = delta * delta
        if a == "fedadagrad":
            v.add_(d2)
        elif a == "fedadam":
            v.mul_(self.beta2).add_(d2, alpha=1 - self.beta2)
        else:  # fedyogi
            v.sub_((1 - self.beta2) * d2 * torch.sign(v - d2))
        weights.add_(self.lr * m / (v.sqrt() + self.tau))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k in self.state:
            self.state[k].copy_(state[k])


def gradient_diversity(sum_sq_norms: float, sum_vec_sq_norm: float) -> float:
    """Σ_k ||u_k||² / ||Σ_k u_k||² (u_k: a client's sample-weighted update n_k Δ_k)."""
    return float(sum_sq_norms / sum_vec_sq_norm) if sum_vec_sq_norm > 0 else float("nan")
