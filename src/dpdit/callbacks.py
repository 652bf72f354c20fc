"""Callbacks that write a run's outputs: the privacy report and CFG samples from the EMA."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch import callbacks
from lightning.pytorch.loggers import WandbLogger

from dpdit import logs
from dpdit.cli import Interrupted
from dpdit.cluster import Requeued
from dpdit.export import export_pipeline, why_not_exportable
from dpdit.files import write_json_atomically
from dpdit.images import save_grid
from dpdit.metrics import class_consistency
from dpdit.sample import generate, save_samples

log = logging.getLogger(__name__)


def _json_number(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


class ModelCheckpoint(callbacks.ModelCheckpoint):
    """Lightning's checkpointing, plus `last.ckpt` written right after the last training
    step, before any end-of-training output (report, samples, export) runs: a failure
    there then loses no trained weights and no privacy history. (Lightning itself skips
    that save once any earlier `last.ckpt` exists, leaving the final steps unsaved.)"""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step >= trainer.max_steps or trainer.should_stop:
            self.save_final(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_final(trainer)

    def save_final(self, trainer: L.Trainer) -> None:
        if self.save_last and self.dirpath is not None and self._last_global_step_saved != trainer.global_step:
            trainer.save_checkpoint(
                Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}", weights_only=False
            )
            self._last_global_step_saved = trainer.global_step


class PrivacyReport(L.Callback):
    """Writes `privacy_report.json` (epsilon, delta, sigma, clip, sample rate, steps, history,
    the epsilon of every accountant, why training stopped) when training ends or stops on a
    cluster's signal, and attaches it with the resolved config (`config_resolved.yaml`) to the W&B run."""

    def __init__(self, output_dir: str):
        self.path = Path(output_dir) / "privacy_report.json"

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, stopped: str) -> None:
        if not trainer.is_global_zero:
            return
        report = {key: _json_number(value) for key, value in pl_module.privacy.report().items()}
        report["stopped"] = stopped
        report["trainable_parameters"] = sum(p.numel() for p in pl_module.model.parameters() if p.requires_grad)
        report["total_parameters"] = sum(p.numel() for p in pl_module.model.parameters())
        report["global_step"] = trainer.global_step
        write_json_atomically(self.path, report)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(
                    {f"privacy/{k}": v for k, v in report.items() if not isinstance(v, (list, dict))}
                )
            if isinstance(logger, logs.WandbLogger):
                for name in (self.path.name, "config_resolved.yaml"):
                    if (self.path.parent / name).is_file():
                        logger.attach(self.path.parent / name)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        privacy = pl_module.privacy
        if privacy.budget_exhausted and trainer.global_step < trainer.max_steps:
            stopped = (
                f"privacy budget: one more step would spend epsilon {privacy.ledger.epsilon_after_next_step():.4g} "
                f"> privacy.target_epsilon={privacy.ledger.target_epsilon:g}"
            )
        else:
            stopped = f"trainer.max_steps={trainer.max_steps} reached"
        self.write(trainer, pl_module, stopped)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (Requeued, Interrupted)):
            self.write(trainer, pl_module, f"signal: {exception}")


class SampleImages(L.Callback):
    """Generates `num_per_class` images per class with classifier-free guidance from the EMA
    weights at the end of training: `samples.npz` (uint8 images, labels) and `samples.png`.
    Latent models' samples are decoded to pixels by their VAE.

    While it trains, every `every_n_steps` steps (null: `progress_grids` grids over the run,
    none in a run of fewer than `MIN_STEPS_FOR_PROGRESS` steps), a grid of
    `progress_per_class` images per class at `progress_steps` sampler steps, from the same
    noise each time so that grids compare over the run: `samples/step_<N>.png`, and
    `samples/progress` on W&B. The EMA weights are post-processing of the released iterates:
    the grids cost no privacy. Training's own randomness is reseeded every step, so they
    change nothing of it."""

    MIN_STEPS_FOR_PROGRESS = 100

    def __init__(
        self,
        output_dir: str,
        num_per_class: int = 10,
        guidance_scale: float = 2.0,
        steps: int = 50,
        scheduler: str = "ddim",
        seed: int = 0,
        batch_size: int = 500,
        grid_per_class: int = 10,
        every_n_steps: int | None = None,
        progress_grids: int = 10,
        progress_per_class: int = 8,
        progress_steps: int = 20,
    ):
        self.output_dir = Path(output_dir)
        self.num_per_class = num_per_class
        self.guidance_scale = guidance_scale
        self.steps = steps
        self.scheduler = scheduler
        self.seed = seed
        self.batch_size = batch_size
        self.grid_per_class = grid_per_class
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(
                f"callbacks.sample_images.every_n_steps={every_n_steps} must be at least 1 (null: about "
                "progress_grids grids over the run)"
            )
        self.every_n_steps = every_n_steps
        self.progress_grids = progress_grids
        self.progress_per_class = progress_per_class
        self.progress_steps = progress_steps
        self.progress_seconds = 0.0
        self.started = time.perf_counter()

    def interval(self, max_steps: int) -> int | None:
        """Steps between progress grids in a run of `max_steps` (None: no grid)."""
        if self.every_n_steps is not None:
            return self.every_n_steps
        if max_steps < self.MIN_STEPS_FOR_PROGRESS or self.progress_grids < 1:
            return None
        return max(1, max_steps // self.progress_grids)

    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule, model, per_class: int, steps: int):
        # the data's classes: an audited model also has a class per canary
        num_classes = trainer.datamodule.num_classes
        labels = torch.arange(num_classes, device=pl_module.device).repeat_interleave(per_class)
        images = generate(
            model,
            pl_module.diffusion,
            labels,
            self.guidance_scale,
            steps,
            self.scheduler,
            self.seed,
            self.batch_size,
            progress=False,
        )
        return images, labels.cpu().numpy(), num_classes

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        interval = self.interval(trainer.max_steps)
        step = trainer.global_step
        if interval is None or step % interval or step >= trainer.max_steps:
            return
        start = time.perf_counter()
        model = pl_module.sampling_model()
        if not trainer.is_global_zero:
            return
        images, labels, num_classes = self.sample(
            trainer, pl_module, model, self.progress_per_class, self.progress_steps
        )
        (self.output_dir / "samples").mkdir(parents=True, exist_ok=True)
        grid = save_grid(images, self.output_dir / "samples" / f"step_{step}.png", rows=num_classes)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples/progress", [grid], step=step)
        self.progress_seconds += time.perf_counter() - start

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.sampling_model()
        if not trainer.is_global_zero:
            return
        if self.progress_seconds:
            elapsed = time.perf_counter() - self.started
            log.info(
                "progress grids: %.1f s of the %.1f s of training (%.1f%%)",
                self.progress_seconds,
                elapsed,
                100 * self.progress_seconds / elapsed,
            )
        images, labels, num_classes = self.sample(trainer, pl_module, model, self.num_per_class, self.steps)
        grid = save_samples(images, labels, self.output_dir, num_classes, self.grid_per_class)
        metrics = {}
        # judged by a classifier trained on the private digits, without noise: only where the
        # mechanism releases exact values
        if getattr(trainer.datamodule, "dataset", None) == "digits" and pl_module.privacy.releases_exact_values:
            metrics["class_consistency"] = class_consistency(images, labels)
            write_json_atomically(self.output_dir / "sample_metrics.json", metrics)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples/grid", [grid], step=trainer.global_step)
                logger.experiment.summary.update({f"samples/{k}": v for k, v in metrics.items()})


class ExportPipeline(L.Callback):
    """Saves the EMA weights as a DiTPipeline in `<output_dir>/pipeline` at the end of
    training (`dpdit.export`); a model without an exact DiTPipeline form is skipped."""

    def __init__(self, output_dir: str, scheduler: str = "ddim"):
        self.directory = Path(output_dir) / "pipeline"
        self.scheduler = scheduler

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.sampling_model()
        if not trainer.is_global_zero:
            return
        reason = why_not_exportable(model)
        if reason is not None:
            log.info("no DiTPipeline export: %s", reason)
            return
        export_pipeline(model, pl_module.diffusion, self.directory, trainer.datamodule.class_names, self.scheduler)
