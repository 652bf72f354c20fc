"""Training entry: validate the whole configuration, then fit, then write the run's outputs.

Every check that can fail runs before the first training step, so bad input never costs
compute and never touches an existing checkpoint or privacy history.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dpdit.cluster import resume_checkpoint
from dpdit.data import ImageDataModule
from dpdit.distributed import DPDDPStrategy
from dpdit.module import DiffusionModule
from dpdit.privacy import (
    DPSGDTraining,
    NonPrivateTraining,
    PrivacyConfig,
    calibrate_noise_multiplier,
    check_model_is_private,
    check_precision,
    epsilon_of,
    steps_of,
)


def load_privacy_state(ckpt_path: str | None) -> dict[str, Any] | None:
    """The privacy entry of a checkpoint (its accountant history), read without the weights."""
    if ckpt_path is None:
        return None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    return checkpoint.get("privacy", {"enabled": False})


def check_output_directory(output_dir: str, ckpt_path: str | None) -> None:
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    if last.exists() and (ckpt_path is None or Path(ckpt_path).resolve() != last.resolve()):
        raise FileExistsError(
            f"{last} already exists and would be overwritten: resume it with ckpt_path={last} "
            "or choose a new hydra.run.dir"
        )


def check_batches(datamodule: ImageDataModule) -> None:
    n = datamodule.dataset_size
    if not 0 < datamodule.batch_size <= n:
        raise ValueError(f"data.batch_size={datamodule.batch_size} must lie in [1, {n}] (the dataset size)")
    if not 0 < datamodule.physical_batch_size <= datamodule.batch_size:
        raise ValueError(
            f"data.physical_batch_size={datamodule.physical_batch_size} must lie in "
            f"[1, data.batch_size={datamodule.batch_size}]: it is the part of a logical batch "
            "that fits in memory at once"
        )


def check_data_matches_model(datamodule: ImageDataModule, model: torch.nn.Module) -> None:
    image, _ = datamodule.train_dataset[0]
    expected = (model.in_channels, model.input_size, model.input_size)
    if tuple(image.shape) != expected:
        raise ValueError(
            f"data={datamodule.dataset} gives images of shape {tuple(image.shape)} (C, H, W) but the "
            f"model expects {expected}: set data.channels/data.image_size to match the data, "
            "or model.in_channels/model.input_size to match the model"
        )


def make_privacy(
    config: PrivacyConfig, datamodule: ImageDataModule, max_steps: int, state: dict[str, Any] | None
) -> DPSGDTraining | NonPrivateTraining:
    """The training's privacy: sigma calibrated for the steps still to take after `state`,
    the checkpoint's privacy entry (whose history the returned object continues)."""
    if not config.enabled:
        privacy = NonPrivateTraining(datamodule.batch_size)
    else:
        config.validate(datamodule.dataset_size)
        if max_steps is None or max_steps <= 0:
            raise ValueError("privacy=dp needs trainer.max_steps > 0: the noise is calibrated for it")
        sample_rate = datamodule.sample_rate
        sigma = noise_multiplier_for(config, sample_rate, max_steps, state)
        privacy = DPSGDTraining(config, sample_rate, datamodule.dataset_size, sigma)
    if state is not None:
        privacy.load_state_dict(state)
    return privacy


def noise_multiplier_for(config: PrivacyConfig, sample_rate: float, max_steps: int, state: dict[str, Any] | None) -> float:
    """The configured sigma, else the resumed run's sigma while it keeps the budget, else a
    sigma calibrated so that the history plus the remaining steps spend the target."""
    if config.noise_multiplier is not None:
        return config.noise_multiplier
    history = [tuple(entry) for entry in (state or {}).get("history", [])]
    remaining = max(max_steps - steps_of(history), 0)
    previous = (state or {}).get("noise_multiplier")
    if previous is not None and config.target_epsilon >= epsilon_of(
        [*history, (previous, sample_rate, remaining)], config.delta, config.accountant
    ):
        return previous
    return calibrate_noise_multiplier(
        config.target_epsilon, config.delta, sample_rate, remaining, config.accountant, history
    )


def make_trainer(config: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    """The configured Trainer; with several processes, on `DPDDPStrategy`, whose gradient
    sum is the only one that keeps DP-SGD (and the micro-batched step) exact."""
    trainer: L.Trainer = instantiate(config, callbacks=callbacks, logger=loggers or False)
    if trainer.world_size == 1 or isinstance(trainer.strategy, DPDDPStrategy):
        return trainer
    if config.get("strategy", "auto") != "auto":
        raise ValueError(
            f"trainer.strategy={config.strategy} on {trainer.world_size} processes would average "
            "gradients its own way, which breaks the DP step: use trainer=ddp "
            "(dpdit.distributed.DPDDPStrategy) or leave trainer.strategy=auto"
        )
    return instantiate(config, strategy=DPDDPStrategy(), callbacks=callbacks, logger=loggers or False)


class ConfigError(ValueError):
    """A setting that cannot work; the message names it and the fix."""


def setup(cfg: DictConfig) -> tuple[L.Trainer, DiffusionModule, ImageDataModule]:
    """Build and check everything; raises ConfigError before any training or writing.
    A requeued SLURM job resumes from its run directory's last checkpoint."""
    cfg.ckpt_path = resume_checkpoint(cfg.ckpt_path, cfg.paths.output_dir)
    try:
        return _build(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, InstantiationException) as error:
        raise ConfigError(str(error)) from error


def _build(cfg: DictConfig) -> tuple[L.Trainer, DiffusionModule, ImageDataModule]:
    check_output_directory(cfg.paths.output_dir, cfg.ckpt_path)
    privacy_state = load_privacy_state(cfg.ckpt_path)
    L.seed_everything(cfg.seed, workers=True)

    privacy_config = PrivacyConfig(**OmegaConf.to_container(cfg.privacy, resolve=True))
    if privacy_config.enabled:
        check_precision(cfg.trainer.precision, privacy_config.clipping)
    # The model first: a pretrained one brings the VAE that encodes the data.
    model = instantiate(cfg.model)
    datamodule: ImageDataModule = instantiate(
        cfg.data, poisson_sampling=privacy_config.enabled, seed=cfg.seed, vae=model.vae
    )
    datamodule.setup("fit")
    check_batches(datamodule)
    check_data_matches_model(datamodule, model)
    privacy = make_privacy(privacy_config, datamodule, cfg.trainer.max_steps, privacy_state)
    if privacy.enabled:
        check_model_is_private(model, privacy_config.clipping)

    module = DiffusionModule(
        model=model,
        diffusion=instantiate(cfg.diffusion),
        optimizer=instantiate(cfg.optimizer),
        privacy=privacy,
        physical_batch_size=datamodule.physical_batch_size,
        ema_decay=cfg.ema_decay,
        seed=cfg.seed,
    )
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values()]
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values()]
    trainer = make_trainer(cfg.trainer, callbacks, loggers)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return trainer, module, datamodule


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train as configured; returns the privacy report."""
    trainer, module, datamodule = setup(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    return module.privacy.report()
