"""One client's local training: a pure function of (global weights, client data, seed, round).

Nothing here depends on which rank trains the client, so 1 process and N ranks compute the same
updates (up to float summation order in the cross-rank sum).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from gptfl_hpc.seeding import derive, torch_generator

PRETRANSFORM_BYTES = 64 << 20
"""Largest float32 copy of one client's images transformed once per round (else per batch)."""


def client_lr(fl_cfg: Any, round_: int) -> float:
    """The client learning rate of a round (a pure function of the round: resume-safe)."""
    if fl_cfg.client_lr_schedule == "cosine":
        return fl_cfg.client_lr * 0.5 * (1.0 + math.cos(math.pi * (round_ - 1) / fl_cfg.rounds))
    return fl_cfg.client_lr


def make_optimizer(fl_cfg: Any, params: Sequence[torch.Tensor], lr: float,
                   model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
    """The client optimiser. With fl.body_lr_scale < 1 (and the `model` given), every
    parameter but the final classifier layer's (train/models.py classifier_head) gets the lr
    times the scale; at 0 they are left out of the optimiser (frozen: bitwise unchanged). At 1
    it is the plain optimiser over `params`, bit for bit as before the option existed."""
    scale = float(getattr(fl_cfg, "body_lr_scale", 1.0))
    groups: list = list(params)
    if scale != 1.0 and model is not None:
        from gptfl_hpc.train.models import classifier_head

        head = {id(p) for p in classifier_head(model).parameters()}
        top = [p for p in params if id(p) in head]
        body = [p for p in params if id(p) not in head]
        groups = [{"params": top}] + ([{"params": body, "lr": lr * scale}] if scale > 0 else [])
    if fl_cfg.client_optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=fl_cfg.client_momentum,
                               weight_decay=fl_cfg.client_weight_decay)
    cls = torch.optim.Adam if fl_cfg.client_optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=lr, weight_decay=fl_cfg.client_weight_decay)


@dataclass
class ControlVariates:
    """SCAFFOLD on one client (Karimireddy et al. 2020, Alg. 1).

    ``correction`` (flat, the model's parameters) is c - c_k: it is added to every minibatch
    gradient before the optimiser step. ``grad_sum`` accumulates the uncorrected minibatch
    gradients and ``steps`` counts the steps, so the new client control variate is
    ``grad_sum / steps``, the mean local gradient: with plain SGD (no momentum, no weight
    decay) this equals the paper's option II, c_k - c + (x - y_k) / (K lr), exactly, and it
    stays a gradient-scale estimate with other optimisers (tests/test_scaffold.py)."""

    correction: torch.Tensor
    grad_sum: torch.Tensor
    steps: int = 0

    def new_control(self) -> torch.Tensor:
        return self.grad_sum / max(self.steps, 1)


def train_client(model: torch.nn.Module, params: Sequence[torch.Tensor],
                 global_params: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                 transform: Any, fl_cfg: Any, *, seed: int,
                 client_id: int, round_: int, control: ControlVariates | None = None,
                 own_dropout_stream: bool = False) -> float:
    """Train `model` in place on one client's data; return the mean training loss.

    `params` are the model's parameters (views into its flat buffer) and `global_params` the
    flat parameter part of the round's global model (for FedProx's proximal term); `control`:
    SCAFFOLD's correction and gradient accumulator (updated in place); `own_dropout_stream`:
    the model's dropout layers are fl/concurrent.py's and draw from a generator of this
    thread (the same masks as torch's global generator seeded alike).
    """
    g = torch_generator(seed, "client-train", client_id, round_)
    if own_dropout_stream:
        # the concurrent trainer (fl/concurrent.py): the model's dropout layers draw from this
        # thread's generator, seeded as the global one is below (the same masks), so threads
        # never share torch's global RNG
        from gptfl_hpc.fl.concurrent import dropout_stream

        with dropout_stream(torch_generator(seed, "client-dropout", client_id, round_)):
            return _train(model, params, global_params, images, labels, transform, fl_cfg, g,
                          round_, control)
    devices = [images.device.index or 0] if images.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        # layers that draw from torch's global RNG (dropout) get a stream of their own per
        # (client, round), so a client's update does not depend on which rank trains it or on
        # which clients trained before it there
        torch.manual_seed(derive(seed, "client-dropout", client_id, round_))
        return _train(model, params, global_params, images, labels, transform, fl_cfg, g,
                      round_, control)


def _train(model: torch.nn.Module, params: Sequence[torch.Tensor], global_params: torch.Tensor,
           images: torch.Tensor, labels: torch.Tensor, transform: Any, fl_cfg: Any,
           g: torch.Generator, round_: int, control: ControlVariates | None = None) -> float:
    opt = make_optimizer(fl_cfg, params, client_lr(fl_cfg, round_), model)
    n = len(labels)
    bs = fl_cfg.batch_size
    mu = fl_cfg.prox_mu if fl_cfg.algorithm == "fedprox" else 0.0
    anchors = _split_like(global_params, params) if mu > 0 else []
    corrections = _split_like(control.correction, params) if control is not None else []
    sums = _split_like(control.grad_sum, params) if control is not None else []
    model.train()
    # without augmentation an image transform is a per-row elementwise map: apply it once per
    # client instead of once per minibatch (the same bits: tests/test_federate.py), while the
    # float copy stays small
    whole = None
    if getattr(transform, "rowwise", False) and not transform.augment and \
            images.numel() * 4 <= PRETRANSFORM_BYTES:
        whole = transform(images, g)
    total = torch.zeros((), dtype=torch.float64, device=labels.device)
    count = 0
    for _ in range(fl_cfg.local_epochs):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, bs):
            idx = perm[start:start + bs]
            if len(idx) < 2 < n:  # a lone sample breaks BatchNorm and adds only noise
                continue
            x = transform(images[idx], g) if whole is None else whole[idx]
            y = labels[idx]
            loss = F.cross_entropy(model(x), y)
            total += loss.detach().double() * len(idx)  # no host sync per step
            count += len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p, w0 in zip(params, anchors):
                # FedProx: the gradient of (mu/2)||w - w_global||^2, added elementwise (no
                # reduction over the model, so no thread-count-dependent summation)
                if p.grad is not None:
                    p.grad.add_(p.detach() - w0, alpha=mu)
            if control is not None:  # SCAFFOLD: g <- g - c_k + c (elementwise as well)
                for p, s, corr in zip(params, sums, corrections):
                    if p.grad is not None:
                        s.add_(p.grad)
                        p.grad.add_(corr)
                control.steps += 1
            opt.step()
    return float(total.item()) / max(count, 1)


def _split_like(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of `flat` shaped like `params`, in order."""
    out, offset = [], 0
    for p in params:
        out.append(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return out
