"""An ordered pool of decode processes: ``prepare`` decodes (or synthesises) its samples once,
in parallel, with the results in a fixed order so the shards do not depend on the worker count.

:class:`OrderedPool` is the generic form of ``images.Decoder`` (whose approach it follows and
whose worker set-up, CPU count and progress format it reuses): ``pool.map(fn, tasks)`` runs the
module-level function ``fn(task) -> (result | None, error)`` on every task in ``workers``
spawned processes (never forked: the parent may be an MPI rank; 1 worker = in this process),
keeps at most ``4 * workers`` tasks in flight (bounded memory) and yields the results in task
order. A task that reports an error stops the pool with a one-line DataError naming what failed;
a worker that dies (killed, out of memory) too. A progress line (items/s, ETA) every 10 s.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

from gptfl_hpc.data.images import PROGRESS_SECONDS, _hms, _init_worker, cpu_count
from gptfl_hpc.errors import DataError

log = logging.getLogger(__name__)

Task = Any
Result = tuple[Any, str]
"""What a task function returns: (its result, "") or (None, "path: why it failed")."""

__all__ = ["OrderedPool", "cpu_count"]


class OrderedPool:
    """Runs ``fn`` over tasks in worker processes, results in task order (module docstring).

    ``sizes`` (optional, one per task) count the items a task covers (files, utterances) for
    the progress lines; ``advice`` ends the error message of a failed task.
    """

    def __init__(self, workers: int, what: str, unit: str = "files",
                 advice: str = "fix or remove the file and run prepare again") -> None:
        self.workers = max(1, int(workers))
        self.what, self.unit, self.advice = what, unit, advice
        self.done = self.total = 0
        self.pool: Any = None
        self.t0 = self.last = time.monotonic()

    def __enter__(self) -> OrderedPool:
        if self.workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(self.workers, initializer=_init_worker,
                                            mp_context=multiprocessing.get_context("spawn"))
        self.t0 = self.last = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def map(self, fn: Callable[[Task], Result], tasks: Sequence[Task],
            sizes: Sequence[int] | None = None) -> Iterator[Any]:
        sizes = list(sizes) if sizes is not None else [1] * len(tasks)
        self.total += sum(sizes)
        log.info("%s: %d %s with %d worker process(es)", self.what, sum(sizes), self.unit,
                 self.workers)
        if self.pool is None:
            for t, n in zip(tasks, sizes):
                yield self._checked(fn(t), n)
            return
        from concurrent.futures.process import BrokenProcessPool

        window: deque[tuple[Future, int]] = deque()
        it = iter(zip(tasks, sizes))
        try:
            while True:
                while len(window) < 4 * self.workers:
                    nxt = next(it, None)
                    if nxt is None:
                        break
                    window.append((self.pool.submit(fn, nxt[0]), nxt[1]))
                if not window:
                    return
                fut, n = window.popleft()
                yield self._checked(fut.result(), n)
        except BrokenProcessPool:
            raise DataError(f"{self.what}: a worker process died (killed, or out of memory); "
                            "lower data.workers or give the job more memory") from None

    def _checked(self, result: Result, n: int) -> Any:
        value, error = result
        if value is None:
            raise DataError(f"{error} ({self.advice})")
        self.done += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            log.info("%s: %d/%d %s (%.1f%%), %.0f %s/s (%.1f per worker), ETA %s", self.what,
                     self.done, self.total, self.unit, 100.0 * self.done / max(self.total, 1),
                     rate, self.unit, rate / self.workers, _hms(eta))
        return value

    def summary(self) -> dict[str, float]:
        seconds = time.monotonic() - self.t0
        rate = self.done / max(seconds, 1e-9)
        log.info("%s: %d %s in %.1fs, %.0f %s/s with %d worker(s)", self.what, self.done,
                 self.unit, seconds, rate, self.unit, self.workers)
        return {self.unit: self.done, "seconds": round(seconds, 3), "workers": self.workers}
