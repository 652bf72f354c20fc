"""Time limits and preemption on clusters: checkpoint at a step boundary, requeue, resume.

SLURM warns a job before its time limit with a signal: submitit (Hydra's SLURM launcher)
asks for SIGUSR2, Lightning's own requeue handler listens for SIGUSR1, and either one,
acting inside the signal handler, would save mid-step, where ranks are in the middle of the
DP step's collectives. `RequeueOnSignal` takes over both signals and only notes the signal;
after the current logical step, all ranks agree to stop, save `last.ckpt` (weights,
optimizer, EMA, accountant history), and rank 0 requeues the SLURM job. The requeued job
runs the same command in the same run directory and `resume_checkpoint` picks the
checkpoint up, so no step and no privacy history is lost.

SIGTERM (`kill`, `scancel`, a container stopping) is handled the same way without the
requeue: the run saves `last.ckpt` after the current step and exits with status 143, saying
how to resume.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import lightning as L

from dpdit.checkpoints import last_checkpoint
from dpdit.cli import Interrupted

log = logging.getLogger(__name__)

SIGNALS = ("SIGUSR1", "SIGUSR2")
STOP_SIGNALS = ("SIGTERM",)


class Requeued(SystemExit):
    """Training stopped on a cluster's signal after saving; the job will run again."""


def slurm_job_id() -> str | None:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def resume_checkpoint(ckpt_path: str | None, output_dir: str) -> str | None:
    """`ckpt_path` if given; in a requeued SLURM job, the run directory's `last.ckpt`."""
    if ckpt_path is not None:
        return ckpt_path
    last = last_checkpoint(output_dir)
    if int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0 and last.is_file():
        log.info("requeued SLURM job: resuming from %s", last)
        return str(last)
    return None


class RequeueOnSignal(L.Callback):
    """On any of `signals`, save `<dirpath>/last.ckpt` after the current step, requeue the
    SLURM job (when there is one) and exit with `Requeued`; on any of `stop_signals`, save
    and exit with `Interrupted`."""

    def __init__(self, dirpath: str, signals: tuple[str, ...] = SIGNALS, stop_signals: tuple[str, ...] = STOP_SIGNALS):
        self.path = Path(dirpath) / "last.ckpt"
        self.requeue_signals = [signal.Signals[name] for name in signals]
        self.signals = self.requeue_signals + [signal.Signals[name] for name in stop_signals]
        self.received: signal.Signals | None = None
        self.previous_handlers = {}

    def _note(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Registered before Lightning registers its own SIGUSR1 handler, which then stays out.
        self.received = None
        self.previous_handlers = {signum: signal.signal(signum, self._note) for signum in self.signals}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning wraps the SIGTERM handler after `setup` with its own, whose exit between
        # two hooks has status 0 and saves nothing: only the note stays.
        for signum in self.signals:
            signal.signal(signum, self._note)

    def _restore_handlers(self) -> None:
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers = {}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        # The signal may reach ranks in different steps: stop when any rank has it.
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        trainer.save_checkpoint(self.path, weights_only=False)
        requeue = trainer.strategy.reduce_boolean_decision(self.received in self.requeue_signals, all=False)
        if not requeue:
            name = self.received.name if self.received is not None else "another rank's signal"
            raise Interrupted(
                f"stopped by {name} after step {trainer.global_step}; saved {self.path}: "
                f"resume with ckpt_path={self.path}"
            )
        job = slurm_job_id()
        if trainer.is_global_zero and job is not None:
            subprocess.run(["scontrol", "requeue", job], check=True)
        raise Requeued(
            f"stopped after step {trainer.global_step} on a signal; saved {self.path}"
            + (f" and requeued SLURM job {job}" if job else f": resume with ckpt_path={self.path}")
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # SIGTERM during the end-of-training outputs (report, samples, export) let them finish.
        if self.received is not None and self.received not in self.requeue_signals:
            raise Interrupted(
                f"{self.received.name} arrived after the last training step; the run's outputs were completed first"
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
