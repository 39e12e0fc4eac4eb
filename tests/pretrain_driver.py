"""Run pretrain() under mpiexec for tests: ``mpiexec -n N python -m mpi4py tests/pretrain_driver.py
--synthetic F --data-dir D --out O [--epochs E] [--batch-size B] [--optimizer O] [--lr LR]
[--model NAME] [--no-augment] [--seed S] [--data-path auto|device|stream]
[--resume-after-preempt]``.

``--resume-after-preempt``: when the run raises Preempted (GPTFL_STOP_AFTER), clear the stop
request and call pretrain() again in the same processes, as a requeued job would (it resumes from
the checkpoint on disk with fresh model/optimizer objects); saves one mpiexec start in tests.

Every rank takes part (comm = the MPI world). A GptflError exits with its exit code on every rank
(all ranks raise the same error, so none is left in a collective); anything else propagates and
``python -m mpi4py`` aborts the job.
"""

from __future__ import annotations

import argparse
import os
import sys

from gptfl_hpc import signals
from gptfl_hpc.config import ModelConfig, PretrainConfig, RunConfig
from gptfl_hpc.errors import GptflError, Preempted
from gptfl_hpc.log import init_logging
from gptfl_hpc.parallel.comm import get_comm
from gptfl_hpc.train.pretrain import pretrain


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--synthetic", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--model", default="digits_cnn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--data-path", default="auto", choices=["auto", "device", "stream"])
    p.add_argument("--resume-after-preempt", action="store_true")
    a = p.parse_args()
    comm = get_comm()
    init_logging(comm.rank)
    cfg = PretrainConfig(epochs=a.epochs, batch_size=a.batch_size, optimizer=a.optimizer,
                         lr=a.lr, data_path=a.data_path)
    kwargs = dict(model_cfg=ModelConfig(name=a.model), run_cfg=RunConfig(seed=a.seed),
                  synthetic_path=a.synthetic, data_dir=a.data_dir, out_dir=a.out,
                  augment=not a.no_augment, fingerprint="driver", comm=comm)
    try:
        try:
            pretrain(cfg, **kwargs)
        except Preempted as e:
            if not a.resume_after_preempt:
                raise
            sys.stderr.write(f"[gptfl r{comm.rank}] driver: preempted ({e}); running again\n")
            os.environ.pop("GPTFL_STOP_AFTER", None)
            signals.reset()
            pretrain(cfg, **kwargs, resume=True)
    except GptflError as e:
        sys.stderr.write(f"[gptfl r{comm.rank}] pretrain: error: {e}\n")
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
