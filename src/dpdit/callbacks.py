"""Callbacks that write a run's outputs: the privacy report and CFG samples from the EMA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch import callbacks
from lightning.pytorch.loggers import WandbLogger

from dpdit.export import export_pipeline, exportable
from dpdit.images import save_grid, to_uint8
from dpdit.metrics import class_consistency


def _json_number(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


class ModelCheckpoint(callbacks.ModelCheckpoint):
    """Lightning's checkpointing, plus `last.ckpt` written when training ends: Lightning
    skips that save once any earlier `last.ckpt` exists, leaving the final steps unsaved."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self.dirpath is not None:
            trainer.save_checkpoint(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")


class PrivacyReport(L.Callback):
    """Writes `privacy_report.json` (epsilon, delta, sigma, clip, sample rate, steps, ...)."""

    def __init__(self, output_dir: str):
        self.path = Path(output_dir) / "privacy_report.json"

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        report = {key: _json_number(value) for key, value in pl_module.privacy.report().items()}
        report["trainable_parameters"] = sum(p.numel() for p in pl_module.model.parameters() if p.requires_grad)
        report["total_parameters"] = sum(p.numel() for p in pl_module.model.parameters())
        report["global_step"] = trainer.global_step
        self.path.write_text(json.dumps(report, indent=2))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update({f"privacy/{k}": v for k, v in report.items() if not isinstance(v, (list, dict))})


class SampleImages(L.Callback):
    """Generates `num_per_class` images per class with classifier-free guidance from the EMA
    weights at the end of training: `samples.npz` (uint8 images, labels) and `samples.png`.
    Latent models' samples are decoded to pixels by their VAE."""

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
    ):
        self.output_dir = Path(output_dir)
        self.num_per_class = num_per_class
        self.guidance_scale = guidance_scale
        self.steps = steps
        self.scheduler = scheduler
        self.seed = seed
        self.batch_size = batch_size
        self.grid_per_class = grid_per_class

    @torch.no_grad()
    def generate(self, pl_module: L.LightningModule) -> tuple[np.ndarray, np.ndarray]:
        model = pl_module.ema.module.eval()
        labels = torch.arange(model.num_classes, device=pl_module.device).repeat_interleave(self.num_per_class)
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        images = []
        for chunk in labels.split(self.batch_size):
            sample = pl_module.diffusion.sample(model, chunk, self.guidance_scale, self.steps, self.scheduler, generator)
            images.append(sample if model.vae is None else model.vae.decode(sample))
        return to_uint8(torch.cat(images)), labels.cpu().numpy()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        images, labels = self.generate(pl_module)
        np.savez_compressed(self.output_dir / "samples.npz", images=images, labels=labels)
        grid = save_grid(
            images.reshape(-1, self.num_per_class, *images.shape[1:])[:, : self.grid_per_class].reshape(-1, *images.shape[1:]),
            self.output_dir / "samples.png",
            rows=pl_module.ema.module.num_classes,
        )
        metrics = {}
        if getattr(trainer.datamodule, "dataset", None) == "digits":
            metrics["class_consistency"] = class_consistency(images, labels)
            (self.output_dir / "sample_metrics.json").write_text(json.dumps(metrics, indent=2))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples/grid", [grid], step=trainer.global_step)
                logger.experiment.summary.update({f"samples/{k}": v for k, v in metrics.items()})


class ExportPipeline(L.Callback):
    """Saves the EMA weights of a pretrained diffusers DiT with its VAE as a DiTPipeline in
    `<output_dir>/pipeline` at the end of training (other models have no pipeline form)."""

    def __init__(self, output_dir: str, scheduler: str = "ddim"):
        self.directory = Path(output_dir) / "pipeline"
        self.scheduler = scheduler

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.ema.module
        if not trainer.is_global_zero or not exportable(model):
            return
        export_pipeline(model, pl_module.diffusion, self.directory, trainer.datamodule.class_names, self.scheduler)
