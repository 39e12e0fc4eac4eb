"""Many small clients at once: ``fl.vmap_clients`` trains a chunk of a rank's clients of a round
together with ``torch.func`` (``functional_call`` + ``vmap`` over stacked per-client parameters).

The per-client maths are those of :func:`gptfl_hpc.fl.client.train_client`, step for step:

* every client keeps its own ``torch.Generator`` of (seed, "client-train", client, round) and
  draws its permutation and its augmentation exactly as ``train_client`` does (same calls, same
  order), so it trains on the same minibatches; a lone last sample is skipped the same way;
* dropout (plain ``nn.Dropout`` layers) replays the client's own global-RNG stream of (seed,
  "client-dropout", client, round): before each of its steps the client's RNG state is swapped
  in and ``F.dropout`` itself draws the masks on ones shaped and laid out in memory like the
  layer's input (the mask depends on the layout and the RNG state, not on the values); the
  vmapped model multiplies by them;
* the loss of a step is ``F.cross_entropy``'s mean over the client's batch (per-sample losses
  weighted by 1/b, the coefficient the mean reduction gives each sample); clients whose batch
  sizes differ at a step (a last, shorter batch) are vmapped in separate groups, never padded;
* clients are ordered by their number of steps (descending), so the clients still training at a
  step are a prefix of the stack: finished clients are neither computed nor changed (masked);
* the optimiser (SGD with momentum and weight decay, Adam, AdamW; the fl.body_lr_scale groups,
  frozen at 0) is torch.optim's single-tensor update restated on the stacked tensors with the same
  in-place ops in the same order and the same Python scalars: every client of a step is at the
  same optimiser step, so the bias corrections are one scalar for all of them;
* FedProx's proximal gradient and SCAFFOLD's correction and gradient sum are added elementwise in
  train_client's order; the optimiser update alone is bitwise torch.optim's.

What differs from the sequential loop is float reassociation inside batched kernels (a vmapped
linear layer is a batched matrix product, a vmapped convolution a grouped one): about one float32
ulp of the weights per client with SGD, more with Adam, which turns the tiny gradients of some
coordinates into steps of about the lr (measured and asserted in tests/test_vmap_clients.py).
What does not (measured on CPU): which other clients share the chunk, their order, the thread
count, hence the rank that trains a client. Where the maths cannot be matched,
:func:`fallback_reason` (or the probe of the model) names why and the engine trains those
clients one after another.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from gptfl_hpc.fl.client import ControlVariates, client_lr
from gptfl_hpc.seeding import derive, torch_generator

_RNN = (nn.RNNBase, nn.RNNCellBase)


def fallback_reason(model: nn.Module, fl_cfg: Any, *, dp: bool = False) -> str | None:
    """Why `model` cannot be trained vmapped with the same per-client maths, or None."""
    if dp:
        return "central DP is on (its clients stay on the sequential path)"
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return f"the model has BatchNorm in training mode ({name or type(m).__name__})"
        if isinstance(m, nn.modules.dropout._DropoutNd) and type(m) is not nn.Dropout:
            return f"the model has a {type(m).__name__} layer ({name}); only nn.Dropout is replayed"
        if isinstance(m, _RNN):
            return f"the model has a recurrent layer ({name}: {type(m).__name__})"
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        return f"the model has buffers that training may update in place ({buffers[0]})"
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return "the model has non-float32 parameters"
    if fl_cfg.client_optimizer not in ("sgd", "adam", "adamw"):
        return f"fl.client_optimizer {fl_cfg.client_optimizer} has no functional update here"
    return None


class _Replay:
    """The dropout masks of the current vmapped call, handed out in forward call order."""

    def __init__(self) -> None:
        self.masks: list[torch.Tensor] = []
        self.pos = 0

    def next(self) -> torch.Tensor:
        mask = self.masks[self.pos]
        self.pos += 1
        return mask


class _ReplayDropout(nn.Module):
    """Stands in for an ``nn.Dropout`` layer: multiplies by the precomputed (scaled) mask."""

    def __init__(self, replay: _Replay) -> None:
        super().__init__()
        self.replay = replay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.replay.next()


@dataclass
class _DropoutSite:
    p: float
    shape: tuple[int, ...]
    """The layer's input shape without the batch dimension."""
    order: tuple[int, ...]
    """The input's dimensions from the outermost in memory to the innermost."""

    def ones(self, b: int, device: torch.device) -> torch.Tensor:
        """Ones of the layer's input shape for `b` samples, laid out like its input."""
        full = (b, *self.shape)
        dense = torch.ones([full[d] for d in self.order], device=device)
        return dense.permute([self.order.index(d) for d in range(len(full))])


@dataclass
class _Client:
    pos: int
    """Its index in the caller's order."""
    steps: int
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    rng: list[torch.Tensor] = field(default_factory=list)
    count: int = 0
    total: float = 0.0


def client_steps(n: int, batch_size: int, epochs: int) -> int:
    """The optimiser steps train_client takes on `n` samples (a lone last sample is skipped)."""
    per_epoch = sum(1 for s in range(0, n, batch_size) if not (min(batch_size, n - s) < 2 < n))
    return per_epoch * epochs


def _batches(images: torch.Tensor, labels: torch.Tensor, transform: Any, batch_size: int,
             epochs: int, g: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """train_client's minibatches, drawn from `g` with the same calls in the same order."""
    n = len(labels)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            if len(idx) < 2 < n:
                continue
            yield transform(images[idx], g), labels[idx]


class CohortTrainer:
    """Trains up to ``fl.vmap_clients`` clients of a round together (see the module docstring).

    Built once per client rank from the rank's work model (only its structure is used: a copy
    with the dropout layers replaced is called with stacked parameters). ``reason`` is None
    when the model qualifies, else why the engine has to train one client after another.
    """

    def __init__(self, model: nn.Module, fl_cfg: Any, transform: Any, example: torch.Tensor,
                 *, dp: bool = False) -> None:
        self.fl = fl_cfg
        self.size = int(fl_cfg.vmap_clients)
        self.reason = fallback_reason(model, fl_cfg, dp=dp)
        self.sites: list[_DropoutSite] = []
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in model.named_parameters()]
        self.numels = [p.numel() for p in model.parameters()]
        self.lr_scale = self._lr_scales(model)
        self.replay = _Replay()
        self._order: list[nn.Module] = []
        self.template = copy.deepcopy(model)
        if self.reason is None:
            self.reason = self._probe(transform, example)
        if self.reason is None:
            self._swap_dropout()
        self.template.train()
        self._step = torch.func.vmap(torch.func.grad_and_value(self._loss))

    # ------------------------------------------------------------------------- set-up

    def _lr_scales(self, model: nn.Module) -> list[float | None]:
        """Each parameter's lr factor in make_optimizer's groups; None: frozen (not stepped)."""
        scale = float(getattr(self.fl, "body_lr_scale", 1.0))
        if scale == 1.0:
            return [1.0] * len(self.names)
        from gptfl_hpc.train.models import classifier_head

        head = {id(p) for p in classifier_head(model).parameters()}
        return [1.0 if id(p) in head else (scale if scale > 0 else None)
                for p in model.parameters()]

    def _probe(self, transform: Any, example: torch.Tensor) -> str | None:
        """Run the copy once on transformed batches of 1, 2 and 3 samples of `example` (raw
        samples as the shards hold them): record each dropout layer's call (in order), its
        input's shape and memory layout (the dropout mask depends on it: a channels-last input
        gets another mask from the same RNG state), and check that every parameter gets a
        gradient."""
        calls: list[tuple[nn.Module, torch.Tensor]] = []

        def hook(m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            calls.append((m, args[0].detach()))

        drops = [m for m in self.template.modules() if type(m) is nn.Dropout]
        handles = [m.register_forward_pre_hook(hook) for m in drops]
        device = example.device
        seen: dict[int, list[tuple[nn.Module, torch.Tensor]]] = {}
        try:
            with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda"
                                       else []):
                for b in (1, 2, 3):
                    calls.clear()
                    self.template.train()
                    self.template.zero_grad(set_to_none=True)
                    idx = torch.arange(b, device=device) % len(example)
                    x = transform(example[idx], torch.Generator().manual_seed(0))
                    self.template(x).float().sum().backward()
                    seen[b] = list(calls)
                    unused = [n for n, p in self.template.named_parameters() if p.grad is None]
                    if unused:
                        return f"parameter {unused[0]} gets no gradient (torch.optim skips it)"
        except RuntimeError as e:
            return f"the model's probe forward failed ({str(e).splitlines()[0]})"
        finally:
            for hd in handles:
                hd.remove()
            self.template.zero_grad(set_to_none=True)
        order = [m for m, _ in seen[2]]
        if len(set(map(id, order))) != len(order):
            return "a dropout layer runs more than once per forward"
        if any([m for m, _ in seen[b]] != order for b in (1, 3)):
            return "the dropout layers called depend on the batch size"
        sites = []
        for i, (m, t) in enumerate(seen[2]):
            site = _DropoutSite(float(cast(nn.Dropout, m).p), tuple(t.shape[1:]),
                                _dim_order(t))
            for b in (1, 2, 3):
                t_b = seen[b][i][1]
                ones = site.ones(b, device)
                if tuple(t_b.shape) != tuple(ones.shape) or not _same_layout(t_b, ones):
                    return (f"the input of dropout layer {i} is not laid out as (batch, ...) "
                            "alike at every batch size")
            sites.append(site)
        self.sites = sites
        self._order = order
        return None

    def _swap_dropout(self) -> None:
        """Replace the copy's nn.Dropout layers (in the template) by mask replays."""
        wanted = {id(m) for m in self._order}
        for parent in list(self.template.modules()):
            for name, child in list(parent.named_children()):
                if id(child) in wanted:
                    setattr(parent, name, _ReplayDropout(self.replay))
        for p in self.template.parameters():
            p.requires_grad_(False)  # only the stacked parameters are differentiated

    # ------------------------------------------------------------------------- one step

    def _loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
              coef: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
        """One client's minibatch loss: sum_i coef_i CE_i with coef_i = 1/b, whose gradient is
        that of F.cross_entropy's mean over the batch (the same 1/b per sample)."""
        self.replay.masks, self.replay.pos = list(masks), 0
        out = torch.func.functional_call(self.template, params, (x,))
        return (F.cross_entropy(out, y, reduction="none") * coef).sum()

    # ------------------------------------------------------------------------- a chunk

    def train(self, global_params: torch.Tensor, data: Sequence[tuple[torch.Tensor, torch.Tensor]],
              transform: Any, *, seed: int, client_ids: Sequence[int], round_: int,
              controls: Sequence[ControlVariates | None] | None = None
              ) -> tuple[torch.Tensor, list[float]]:
        """Train the clients `client_ids` (data[i] = (images, labels) of client_ids[i]) from the
        flat parameters `global_params`; return their trained flat parameters, one row per
        client in the given order, and their mean training losses. `controls`: SCAFFOLD's per
        client (updated in place, as train_client does)."""
        assert self.reason is None, self.reason
        fl = self.fl
        dev = global_params.device
        devices = [dev.index or 0] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            clients = []
            for pos, (cid, (x, y)) in enumerate(zip(client_ids, data)):
                g = torch_generator(seed, "client-train", cid, round_)
                torch.manual_seed(derive(seed, "client-dropout", cid, round_))
                clients.append(_Client(
                    pos, client_steps(len(y), fl.batch_size, fl.local_epochs),
                    _batches(x, y, transform, fl.batch_size, fl.local_epochs, g),
                    rng=_rng_state(dev)))
            # longest first (stable): the clients training at step s are a prefix of the stack
            clients.sort(key=lambda c: -c.steps)
            params = self._run(global_params, clients, round_, controls)
        flat = torch.cat([p.reshape(len(clients), -1) for p in params], dim=1)
        where = {c.pos: i for i, c in enumerate(clients)}  # back to the callers' order
        rows = flat.index_select(0, torch.tensor([where[i] for i in range(len(clients))],
                                                 device=dev))
        losses = [0.0] * len(clients)
        for c in clients:
            losses[c.pos] = c.total / max(c.count, 1)
        return rows, losses

    def _run(self, global_params: torch.Tensor, clients: list[_Client], round_: int,
             controls: Sequence[ControlVariates | None] | None) -> list[torch.Tensor]:
        fl = self.fl
        n = len(clients)
        dev = global_params.device
        anchors = _split(global_params, self.shapes, self.numels)
        params = [a.unsqueeze(0).repeat(n, *([1] * a.dim())) for a in anchors]
        lr = client_lr(fl, round_)
        opt = _Optimiser(fl, [None if s is None else lr * s for s in self.lr_scale], params)
        mu = fl.prox_mu if fl.algorithm == "fedprox" else 0.0
        scaffold = controls is not None and any(c is not None for c in controls)
        corr: list[torch.Tensor] = []
        sums: list[torch.Tensor] = []
        if scaffold:
            assert controls is not None
            ordered = [controls[c.pos] for c in clients]
            if any(c is None for c in ordered):
                raise ValueError("SCAFFOLD needs a control for every client of the chunk")
            stacked = torch.stack([c.correction for c in ordered if c is not None])
            corr = [t.contiguous() for t in _split_rows(stacked, self.shapes, self.numels)]
            sums = [torch.zeros_like(p) for p in params]
        totals = torch.zeros(n, dtype=torch.float64, device=dev)
        for s in range(clients[0].steps if clients else 0):
            m = sum(1 for c in clients if c.steps > s)
            xs, ys, masks = self._draw(clients[:m], dev)
            grads, loss = self._grads(params, xs, ys, masks)
            sizes = torch.tensor([len(y) for y in ys], dtype=torch.float64, device=dev)
            totals[:m] += loss.detach().double() * sizes  # no host sync per step
            if mu > 0:  # FedProx: + mu (w - w_global), elementwise
                for gr, p, a in zip(grads, params, anchors):
                    gr.add_(p[:m] - a, alpha=mu)
            if scaffold:  # SCAFFOLD: sum the uncorrected gradient, then correct it
                for gr, sm, cr in zip(grads, sums, corr):
                    sm[:m].add_(gr)
                    gr.add_(cr[:m])
            opt.step(m, grads)
        for c, total in zip(clients, totals.tolist()):
            c.total = total
        if scaffold:
            assert controls is not None
            for i, c in enumerate(clients):
                cv = controls[c.pos]
                assert cv is not None
                cv.grad_sum.copy_(torch.cat([sm[i].reshape(-1) for sm in sums]))
                cv.steps += c.steps
        return params

    def _grads(self, params: list[torch.Tensor], xs: list[torch.Tensor],
               ys: list[torch.Tensor], masks: list[list[torch.Tensor]]
               ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The minibatch gradients and losses of the first m = len(xs) rows of `params`.

        Clients are vmapped in groups of equal batch size, never zero-padded to a common one:
        padding would change the reduction order of a weight gradient with the sizes of the
        other clients' batches, so a client's bits would depend on its chunk."""
        m = len(xs)
        groups: dict[int, list[int]] = {}
        for i, y in enumerate(ys):
            groups.setdefault(len(y), []).append(i)
        if len(groups) == 1:  # the common case: views of the stacks, no copies
            return self._call([p[:m] for p in params], xs, ys, masks)
        out = [p.new_empty((m, *p.shape[1:])) for p in params]
        loss_out = params[0].new_empty(m)
        for rows in groups.values():
            at = torch.tensor(rows, device=params[0].device)
            grads, loss = self._call([p.index_select(0, at) for p in params],
                                     [xs[i] for i in rows], [ys[i] for i in rows],
                                     [masks[i] for i in rows])
            for o, gr in zip(out, grads):
                o[at] = gr
            loss_out[at] = loss
        return out, loss_out

    def _call(self, params: list[torch.Tensor], xs: list[torch.Tensor], ys: list[torch.Tensor],
              masks: list[list[torch.Tensor]]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One vmapped forward and backward: clients of one batch size b, one row each."""
        # contiguous: a stack of ONE channels-last batch keeps that layout (and gets other
        # kernels), a stack of several does not
        x, y = torch.stack(xs).contiguous(), torch.stack(ys)
        coef = torch.ones(y.shape, device=x.device) / len(ys[0])  # 1/b, float32 division
        stacked = [torch.stack([mk[i] for mk in masks]) for i in range(len(self.sites))]
        grads, loss = self._step(dict(zip(self.names, params)), x, y, coef, stacked)
        return [grads[k] for k in self.names], loss

    def _draw(self, clients: list[_Client], dev: torch.device
              ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor]]]:
        """Each client's next minibatch and dropout masks, drawn in its own RNG streams."""
        xs, ys, masks = [], [], []
        for c in clients:
            _set_rng_state(dev, c.rng)
            x, y = next(c.batches)
            b = len(y)
            c.count += b
            # nn.Dropout's own draw on ones laid out like its input: the same mask
            masks.append([F.dropout(site.ones(b, dev), site.p, True) for site in self.sites])
            c.rng = _rng_state(dev)
            xs.append(x)
            ys.append(y)
        return xs, ys, masks


# ------------------------------------------------------------------------------ optimiser


class _Optimiser:
    """torch.optim's single-tensor SGD / Adam / AdamW update on stacked per-client tensors.

    The same in-place ops in the same order with the same Python scalars as
    ``torch.optim._single_tensor_{sgd,adam}`` (torch 2.x; dampening 0, no Nesterov, no
    amsgrad), applied to the first ``m`` rows (the clients still training). ``lrs[i]`` is the
    lr of parameter i (None: frozen, as fl.body_lr_scale=0 leaves it out of the optimiser).
    """

    def __init__(self, fl_cfg: Any, lrs: list[float | None], params: list[torch.Tensor]) -> None:
        self.kind = fl_cfg.client_optimizer
        self.wd = float(fl_cfg.client_weight_decay)
        self.momentum = float(fl_cfg.client_momentum)
        self.lrs, self.params = lrs, params
        self.t = 0
        self.beta1, self.beta2, self.eps = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults
        adam = self.kind in ("adam", "adamw")
        self.exp_avg = [torch.zeros_like(p) for p in params] if adam else []
        self.exp_avg_sq = [torch.zeros_like(p) for p in params] if adam else []
        self.buf = ([torch.zeros_like(p) for p in params]
                    if self.kind == "sgd" and self.momentum != 0 else [])

    def step(self, m: int, grads: list[torch.Tensor]) -> None:
        self.t += 1  # every client still training takes its t-th step now
        for i, (p_all, grad) in enumerate(zip(self.params, grads)):
            lr = self.lrs[i]
            if lr is None:
                continue
            p = p_all[:m]
            if self.kind == "sgd":
                self._sgd(p, grad, self.buf[i][:m] if self.buf else None, lr)
            else:
                self._adam(p, grad, self.exp_avg[i][:m], self.exp_avg_sq[i][:m], lr)

    def _sgd(self, param: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor | None,
             lr: float) -> None:
        if self.wd != 0:
            grad = grad.add(param, alpha=self.wd)
        if buf is not None:  # momentum
            if self.t == 1:
                buf.copy_(grad)  # torch: buf = grad.detach().clone()
            else:
                buf.mul_(self.momentum).add_(grad, alpha=1)
            grad = buf
        param.add_(grad, alpha=-lr)

    def _adam(self, param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
              exp_avg_sq: torch.Tensor, lr: float) -> None:
        beta1, beta2 = self.beta1, self.beta2
        if self.wd != 0:
            if self.kind == "adamw":
                param.mul_(1 - lr * self.wd)
            else:
                grad = grad.add(param, alpha=self.wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = float(self.t)  # torch keeps it in a float32 tensor and reads it with .item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


# ------------------------------------------------------------------------------ helpers


def _rng_state(dev: torch.device) -> list[torch.Tensor]:
    """The global RNG state(s) that layers and transforms on `dev` draw from."""
    states = [torch.get_rng_state()]
    if dev.type == "cuda":
        states.append(torch.cuda.get_rng_state(dev))
    return states


def _set_rng_state(dev: torch.device, states: list[torch.Tensor]) -> None:
    torch.set_rng_state(states[0])
    if dev.type == "cuda":
        torch.cuda.set_rng_state(states[1], dev)


def _dim_order(t: torch.Tensor) -> tuple[int, ...]:
    """`t`'s dimensions from the largest stride to the smallest (size-1 dimensions last)."""
    strides = t.stride()
    return tuple(sorted(range(t.dim()), key=lambda d: (t.shape[d] == 1, -strides[d], d)))


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides wherever a dimension has more than one element."""
    sa, sb = a.stride(), b.stride()
    return a.shape == b.shape and all(sa[d] == sb[d] for d in range(a.dim()) if a.shape[d] > 1)


def _split(flat: torch.Tensor, shapes: Sequence[tuple[int, ...]],
           numels: Sequence[int]) -> list[torch.Tensor]:
    out, offset = [], 0
    for shape, k in zip(shapes, numels):
        out.append(flat[offset:offset + k].view(shape))
        offset += k
    return out


def _split_rows(rows: torch.Tensor, shapes: Sequence[tuple[int, ...]],
                numels: Sequence[int]) -> list[torch.Tensor]:
    out, offset = [], 0
    for shape, k in zip(shapes, numels):
        out.append(rows[:, offset:offset + k].reshape(len(rows), *shape))
        offset += k
    return out
