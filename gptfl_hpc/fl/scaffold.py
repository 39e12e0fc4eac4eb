"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020, Alg. 1) on the one-Allreduce round.

State: the server control variate c (one vector the size of the model's parameters, held and
updated identically on every rank) and the client control variates c_k, each kept on the rank
that owns client k and nowhere else (fl.placement=static pins clients to ranks). They start at
zero.

Round r, sampled set S, global weights x:

* client k (on its rank): local training from x with every minibatch gradient corrected,
  g <- g - c_k + c; the new c_k+ is the mean of its uncorrected minibatch gradients (equal to
  the paper's option II, c_k - c + (x - y_k) / (K lr), for plain SGD; fl/client.py);
* the round's ONE Allreduce carries [ sum_k (n_k / N) (y_k - x) | sum_k (c_k+ - c_k) / M |
  statistics ] (M = data.num_clients), one flat buffer about twice the model's size;
* every rank: x <- x + server_lr * (the model part), c <- c + (the control part).

The model part is sample-weighted like FedAvg here (the paper's |S|^-1 sum is the special case
of equal sample counts); the control part follows the paper's c <- c + (1/M) sum_k Δc_k. A client
whose update is dropped (non-finite or too large) keeps its old c_k and adds nothing. The c_k of
a rank are saved in that rank's ``rank-RRRRR.safetensors`` of each checkpoint
(fl/checkpoint.py), keyed by client id, and loaded by whichever rank owns the client on resume.
"""

from __future__ import annotations

import torch

from gptfl_hpc.fl.client import ControlVariates


def client_key(cid: int) -> str:
    return f"client_{cid:08d}"


class Scaffold:
    """The control variates on one rank: c (every rank) and c_k of the clients it owns."""

    def __init__(self, n_params: int, num_clients: int, owned: set[int]) -> None:
        self.n_params, self.num_clients, self.owned = n_params, num_clients, set(owned)
        self.c = torch.zeros(n_params, dtype=torch.float32)
        self.clients: dict[int, torch.Tensor] = {}

    def control(self, cid: int) -> torch.Tensor:
        if cid not in self.owned:
            raise RuntimeError(f"client {cid} is not owned by this rank (SCAFFOLD needs static "
                               "placement)")
        return self.clients.get(cid, torch.zeros(self.n_params, dtype=torch.float32))

    def begin(self, cid: int, device: torch.device) -> ControlVariates:
        """The client's correction c - c_k and a zeroed gradient accumulator, on `device`."""
        correction = (self.c - self.control(cid)).to(device)
        return ControlVariates(correction, torch.zeros(self.n_params, device=device))

    def change(self, cid: int, cv: ControlVariates) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_k+ on the device, Δc_k = c_k+ - c_k on the device)."""
        new = cv.new_control()
        return new, new - self.control(cid).to(new.device)

    def commit(self, cid: int, new: torch.Tensor) -> None:
        self.clients[cid] = new.detach().to("cpu", torch.float32).clone()

    def server_update(self, control_sum: torch.Tensor) -> None:
        """c <- c + sum_k Δc_k / M (the reduced control part, already divided by M)."""
        self.c.copy_((self.c.double() + control_sum.double()).float())

    # checkpoints
    def rank_state(self) -> dict[str, torch.Tensor]:
        state = {client_key(c): t for c, t in sorted(self.clients.items())}
        return state or {"_": torch.zeros(1)}  # a safetensors file needs one tensor

    def load_rank_states(self, states: list[dict[str, torch.Tensor]]) -> int:
        """Take the c_k of the clients this rank owns from every rank's saved file."""
        n = 0
        for state in states:
            for key, t in state.items():
                if key.startswith("client_") and int(key[7:]) in self.owned:
                    self.clients[int(key[7:])] = t.to(torch.float32).clone()
                    n += 1
        return n
