"""The round's reduction buffer: the clients' weighted updates plus statistics, one flat array.

Every rank adds the updates of the clients it trained into its own buffer; one in-place
``Allreduce(SUM)`` of that buffer gives every rank the sum over all sampled clients. Layout::

    [ sum_k (n_k / N) * delta_k  (model numel) | extra vectors (e.g. SCAFFOLD) | statistics ]

where N = sum of the sampled clients' sample counts (every rank knows them from the manifest),
so the model part is the sample-weighted mean update when no client is dropped. SCAFFOLD's
extra part is sum_k (1 / num_clients) * (c_k+ - c_k), its clients' control-variate changes
(fl/scaffold.py); with central DP the model part is sum_k clip(delta_k), unweighted, and the
noise is added after the reduction (fl/dp.py). Every part is a sum over clients: the server
never needs one client's vector (what secure aggregation requires).

Two encodings (``fl.aggregation``):

* ``exact`` (default): int64 fixed point on a grid of 2**-40. Each client's weighted update is
  rounded to the grid once (a deterministic function of that client's training only), and
  integer addition is associative, so the sum -- and therefore the new global model -- is
  bit-identical for any number of ranks, any placement of clients on ranks and any reduction
  order MPI picks. The rounding is far below float32 resolution for weights above ~1e-5 (an
  averaged update element below 2**-41 rounds to 0); averaged update elements must stay below
  2**22 in magnitude (a client update larger than that is dropped as diverged). Twice the bytes
  of float32 on the wire.
* ``float32``: the plain float32 sum, half the bytes; the result depends on the order of the
  additions (rank-local partial sums, then MPI's order), i.e. on the rank count and placement,
  in the last bits (about 1e-7 relative per round).

Statistics use the same encoding (fixed point: exact; float32: as is), so with ``exact`` the
reported train loss and gradient diversity are placement-independent too.
"""

from __future__ import annotations

import math

import numpy as np
import torch

GRID_BITS = 40
SCALE = float(2**GRID_BITS)
LIMIT = float(2**22)
"""Largest |weighted update element| the fixed-point encoding accepts (int64 headroom for
sums over many clients)."""
STAT_BITS = 24
"""Fixed-point bits of the statistics (SQNORM, which can be tiny, uses GRID_BITS)."""
ENCODINGS = ("exact", "float32")

# statistics slots (after the vectors); S_UNCLIPPED: DP clients whose update norm was <= the
# clip norm (adaptive clipping); S_RANKTIME + r: rank r's compute seconds
(S_WEIGHT, S_LOSS, S_SQNORM, S_OK, S_DROPPED, S_DIVERGED, S_STOP, S_UNCLIPPED,
 S_RANKTIME) = range(9)
N_STATS = S_RANKTIME


class RoundBuffer:
    """One rank's reduction buffer for a round (host memory; numpy-allocated, see params.py)."""

    def __init__(self, numel: int, world: int, encoding: str = "exact", extra: int = 0,
                 device: torch.device | str = "cpu") -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"aggregation {encoding!r}; valid: {', '.join(ENCODINGS)}")
        self.numel, self.extra, self.world, self.encoding = numel, extra, world, encoding
        self.vec = numel + extra
        self.exact = encoding == "exact"
        dtype = np.int64 if self.exact else np.float32
        self.host = np.zeros(self.vec + N_STATS + world, dtype=dtype)
        self.device = torch.device(device)
        # on a GPU the vectors accumulate on the device and are copied to the host once
        tdtype = torch.int64 if self.exact else torch.float32
        self._vec = (torch.from_numpy(self.host[:self.vec]) if self.device.type == "cpu"
                     else torch.zeros(self.vec, dtype=tdtype, device=self.device))
        self.stats = np.zeros(N_STATS + world, dtype=np.float64)
        self._stat_scale = np.full(N_STATS + world, 2.0**STAT_BITS)
        self._stat_scale[S_SQNORM] = SCALE
        self._scratch: dict[tuple[str, torch.dtype, str], torch.Tensor] = {}

    def zero(self) -> None:
        self.host[:] = 0
        if self._vec.device.type != "cpu":
            self._vec.zero_()
        self.stats[:] = 0

    # ------------------------------------------------------------------------ adding

    def encode(self, update: torch.Tensor, scale: float,
               peak: float | None = None) -> torch.Tensor | None:
        """`scale * update` in the buffer's encoding (on the update's device); None if any
        element is out of the encodable range (the caller drops the client as diverged).

        `peak`: max |update| when the caller knows it (:func:`peak_abs`); then the range check
        is one scalar comparison, the same verdict as the elementwise one (rounding is
        monotonic: max_i fl(|u_i| * scale) = fl(max_i |u_i| * scale)). The exact encoding
        works in place on one float64 copy; its bits equal round((u * scale) * SCALE)."""
        if self.exact:
            x = update.to(torch.float64, copy=True)
            x.mul_(scale)
            ok = peak * scale < LIMIT if peak is not None else bool((x.abs() < LIMIT).all())
            if not ok:  # (the scalar comparison refuses NaN too)
                return None
            x.mul_(SCALE)  # a power of two: exact
            torch.round(x, out=x)
            return x.to(torch.int64)
        return update.float() * float(np.float32(scale))

    def fits(self, peak: float, scale: float) -> bool:
        """Whether an update with max |element| `peak` can be encoded at `scale`: the verdict
        :meth:`encode` gives (False for NaN)."""
        return peak * scale < LIMIT if self.exact else True

    def add_update(self, update: torch.Tensor, scale: float, start: int = 0) -> None:
        """Add ``encode(update, scale)`` to the vectors, through scratch buffers kept between
        calls: the same bits as ``add_vector(encode(update, scale))`` without its three
        model-sized temporaries (allocating and faulting in 2 x 13 MB per client cost more than
        the arithmetic: 13.4 ms against 1.7 ms for a 1.6M-parameter update, measured). The
        caller checks :meth:`fits` first."""
        n = update.numel()
        if self.exact:
            x = self.scratch("f64", n, torch.float64, update.device)
            x.copy_(update)
            # one multiply: scale * 2**40 is exact, and rounding commutes with a power-of-two
            # factor, so fl(u * (scale * SCALE)) = fl(u * scale) * SCALE, encode()'s bits
            x.mul_(scale * SCALE)
            enc = self.scratch("encoded", n, torch.int64, update.device)
            if x.device.type == "cpu" and torch.get_num_threads() == 1:
                # one pass instead of two (rint, then an exact cast of integral values); with
                # more threads torch's two parallel passes are faster (measured)
                np.rint(x.numpy(), out=enc.numpy(), casting="unsafe")
            else:
                torch.round(x, out=x)
                enc.copy_(x)
        else:
            enc = self.scratch("encoded", n, torch.float32, update.device)
            torch.mul(update, float(np.float32(scale)), out=enc)
        self.add_vector(enc, start)

    def scratch(self, name: str, n: int, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> torch.Tensor:
        """A reusable 1-D buffer of at least `n` elements (its first `n` returned); one per
        (name, dtype, device), grown when needed, never shrunk; its contents are garbage.
        :meth:`add_update` uses the names "f64" and "encoded": a caller may share "f64" only
        between calls."""
        key = (name, dtype, str(torch.device(device)))
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < n:
            np_dtype = {torch.float64: np.float64, torch.int64: np.int64,
                        torch.float32: np.float32}[dtype]
            buf = (torch.from_numpy(np.empty(n, dtype=np_dtype))  # numpy: huge pages
                   if torch.device(device).type == "cpu"
                   else torch.empty(n, dtype=dtype, device=device))
            self._scratch[key] = buf
        return buf[:n]

    def add_vector(self, encoded: torch.Tensor, start: int = 0) -> None:
        self._vec[start:start + encoded.numel()].add_(encoded.to(self._vec.device))

    def add_stat(self, slot: int, value: float) -> None:
        self.stats[slot] += value

    # ------------------------------------------------------------------------ exchange

    def pack(self, rank: int, seconds: float) -> np.ndarray:
        """Copy the vectors (GPU) and statistics into the host buffer; return it for MPI."""
        if self._vec.device.type != "cpu":
            self.host[:self.vec] = self._vec.cpu().numpy()
        self.stats[N_STATS + rank] = seconds
        s = self.host[self.vec:]
        if self.exact:
            s[:] = np.round(self.stats * self._stat_scale).astype(np.int64)
        else:
            s[:] = self.stats.astype(np.float32)
        return self.host

    def unpack(self) -> tuple[torch.Tensor, np.ndarray]:
        """After the reduction: (the summed vectors as float64 on the host, statistics)."""
        if self.exact:
            vec = torch.from_numpy(self.host[:self.vec]).double() / SCALE
            stats = self.host[self.vec:].astype(np.float64) / self._stat_scale
        else:
            vec = torch.from_numpy(self.host[:self.vec]).double()
            stats = self.host[self.vec:].astype(np.float64)
        return vec, stats


def sq_norm(update: torch.Tensor, scratch: torch.Tensor | None = None) -> float:
    """||update||^2 in float64, the same bits at any thread count (numpy pairwise summation).
    `scratch`: a float64 CPU tensor of at least update.numel() elements to work in (no
    allocation; its contents are overwritten)."""
    if scratch is not None:
        buf = scratch[:update.numel()]
        buf.copy_(update.detach().reshape(-1))
        u = buf.numpy()
    else:
        u = update.detach().to("cpu", torch.float64, copy=True).numpy()
    np.multiply(u, u, out=u)
    return float(np.add.reduce(u))


def peak_abs(update: torch.Tensor) -> float:
    """max |update| in one pass without a temporary (NaN if any element is NaN; inf if any is
    infinite): the finiteness and range checks of a client update in one reduction."""
    lo, hi = torch.aminmax(update.detach())
    return max(-float(lo), float(hi)) if not (math.isnan(lo) or math.isnan(hi)) else math.nan


def finite(x: float) -> bool:
    return math.isfinite(x)
