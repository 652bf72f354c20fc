"""Building a run: every check of its settings, then its data, privacy mechanism, module and
trainer, the same way for `train`, `audit` and `profile`.

Every check that can fail runs before the first training step, so bad input never costs
compute and never touches an existing checkpoint or privacy history.
"""

from __future__ import annotations

import logging
import os
from functools import singledispatch
from pathlib import Path
from typing import Any, Callable, NamedTuple

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from dpdit.checkpoints import initialise_from, last_checkpoint, privacy_state, read_checkpoint, weights_under
from dpdit.cli import settings_checked
from dpdit.cluster import resume_checkpoint
from dpdit.data import ImageDataModule
from dpdit.distributed import DPDDPStrategy, DPFSDPStrategy
from dpdit.files import write_text_atomically
from dpdit.memory import check_memory_fits
from dpdit.module import DiffusionModule
from dpdit.prior import has_public_prior, prepare_prior, settings_line, start_from_prior, uses_pretrained_model
from dpdit.privacy import (
    DPSGD,
    History,
    Mechanism,
    NonPrivate,
    NonPrivateConfig,
    PrivacyConfig,
    calibrate_noise_multiplier,
    check_resumable,
    steps_of,
)

log = logging.getLogger(__name__)


def inherited_history(config: PrivacyConfig, checkpoint: dict[str, Any], path: str) -> History:
    """The earlier spend that counts towards this run: the checkpoint's history when it was
    trained on this run's data (privacy.init_data=same), nothing when on disjoint data."""
    if config.init_data == "disjoint":
        return []
    state = privacy_state(checkpoint)
    if not state.get("enabled"):
        raise ValueError(
            f"init_ckpt_path={path} has no privacy history: if it was trained on this data, it "
            "was without DP and no guarantee can be stated. If it never saw this run's data "
            "(public or other data), say so with privacy.init_data=disjoint"
        )
    return [tuple(entry) for entry in state["history"]]


# Settings that shape what a checkpoint's weights mean: a resume must keep them.
RESUME_DATA_SETTINGS = ("dataset", "image_size", "channels", "num_classes")


def check_checkpoint_fits(model: torch.nn.Module, checkpoint: dict[str, Any], data: DictConfig, path: str) -> None:
    """Fail before anything is written if a checkpoint to resume was trained on another model
    or other data settings: its tensors' shapes must match the model's, and the data
    settings that do not show in shapes (the image size of a position table that is not
    saved) must equal those stored with it."""
    saved, expected = weights_under(checkpoint, "model."), model.state_dict()
    problems = [
        f"{key} is {tuple(saved[key].shape)} there and {tuple(value.shape)} here"
        for key, value in sorted(expected.items())
        if key in saved and saved[key].shape != value.shape
    ]
    problems += [f"{key} is not there" for key in sorted(expected.keys() - saved.keys())]
    problems += [f"{key} is not in this model" for key in sorted(saved.keys() - expected.keys())]
    if problems:
        more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise ValueError(
            f"ckpt_path={path} was trained with another model ({problems[0]}{more}): resume with the model settings "
            "it was trained with (its config is stored in it), or start a new run with init_ckpt_path"
        )
    stored = (checkpoint.get("config") or {}).get("data", {})
    for key in RESUME_DATA_SETTINGS:
        if key in stored and stored[key] != data.get(key):
            raise ValueError(
                f"ckpt_path={path} was trained with data.{key}={stored[key]} but this run sets "
                f"data.{key}={data.get(key)}: resume with data.{key}={stored[key]}, or start a new run "
                "with init_ckpt_path"
            )


def save_run_config(resolved: dict[str, Any], output_dir: str, resumed_step: int | None) -> None:
    """`config_resolved.yaml`; a resume in the same directory first keeps the earlier one as
    `config_resolved.before-step-<N>.yaml` rather than overwrite it."""
    path = Path(output_dir) / "config_resolved.yaml"
    text = OmegaConf.to_yaml(OmegaConf.create(resolved))
    if path.is_file() and resumed_step is not None and path.read_text() != text:
        kept = path.with_name(f"config_resolved.before-step-{resumed_step}.yaml")
        if not kept.exists():
            os.replace(path, kept)
            log.info("resumed in place: the earlier run configuration is kept as %s", kept)
    write_text_atomically(path, text)


def check_output_directory(output_dir: str, ckpt_path: str | None) -> None:
    last = last_checkpoint(output_dir)
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
            "or model.in_channels/model.image_size to match the model"
        )


def check_own_data(data: DictConfig, privacy_config: PrivacyConfig) -> None:
    """What this run's own images allow checking before a public stage trains for minutes:
    that they are there, that the batches fit them, and the privacy settings for their number."""
    images = instantiate(data, poisson_sampling=False)
    check_batches(images)
    privacy_config.validate(images.dataset_size)


class RunStart(NamedTuple):
    """Where a new run's weights come from: the public `prior`'s record (its DiTPipeline for a
    `pretrained` diffusers DiT, else its checkpoint), or the `checkpoint` read from
    init_ckpt_path `path`; neither for a run from scratch or a resume."""

    prior: dict[str, Any] | None = None
    checkpoint: dict[str, Any] | None = None
    path: str | None = None
    pretrained: bool = False


@singledispatch
def make_mechanism(config, datamodule: ImageDataModule, max_steps: int, resumed=None, start=RunStart()) -> Mechanism:
    """The run's mechanism, by the privacy node's settings class (`privacy=dp` or `none`),
    continuing the `resumed` checkpoint's state or starting at `start`."""
    raise TypeError(f"no privacy mechanism for {type(config).__name__}")


@make_mechanism.register
def _without_privacy(
    config: NonPrivateConfig, datamodule: ImageDataModule, max_steps: int, resumed=None, start=RunStart()
) -> NonPrivate:
    """Training without privacy; resuming a DP checkpoint is refused (its spend would be dropped)."""
    config.validate(datamodule.dataset_size)
    privacy = NonPrivate(datamodule.batch_size)
    if resumed is not None:
        privacy.load_state_dict(privacy_state(resumed))
    return privacy


@make_mechanism.register
def _dp_sgd(
    config: PrivacyConfig, datamodule: ImageDataModule, max_steps: int, resumed=None, start=RunStart()
) -> DPSGD:
    """DP-SGD, continuing the `resumed` checkpoint's accountant and secret key, or starting
    from the history of init_ckpt_path when it was trained on the same data, with the
    datamodule's randomness. A resumed run keeps its noise multiplier; a new one calibrates
    sigma so that the history plus `max_steps` steps spend the target. Either way the run
    stops before a step would exceed the target, and a run the target allows no step is
    refused."""
    config.validate(datamodule.dataset_size)
    if max_steps is None or max_steps <= 0:
        raise ValueError("privacy=dp needs trainer.max_steps > 0: the noise is calibrated for it")
    inherited = inherited_history(config, start.checkpoint, start.path) if start.checkpoint is not None else []
    state = privacy_state(resumed) if resumed is not None else {"history": inherited}
    if resumed is not None:
        check_resumable(state)
    history = [tuple(entry) for entry in state.get("history", [])]
    remaining = max(max_steps - (resumed or {}).get("global_step", 0), 0)
    # privacy.noise_multiplier and calibration give the step's sigma (with the released
    # statistics, sigma_eff); a checkpoint keeps the gradients' own
    if config.noise_multiplier is not None:
        sigma = config.gradient_noise_multiplier(config.noise_multiplier)
    elif "noise_multiplier" in state:
        sigma = state["noise_multiplier"]
    else:
        effective = calibrate_noise_multiplier(
            config.target_epsilon, config.delta, datamodule.sample_rate, remaining, config.accountant, history
        )
        sigma = config.gradient_noise_multiplier(effective)
    privacy = DPSGD(
        config,
        datamodule.sample_rate,
        datamodule.dataset_size,
        sigma,
        datamodule.randomness,
        history,
        init_checkpoint=starting_point(config, start, inherited),
    )
    if resumed is not None:
        privacy.load_state_dict(state)
    allowed = privacy.ledger.limit_steps(remaining)
    if allowed == 0 and remaining > 0 and resumed is None:
        raise ValueError(
            f"privacy.target_epsilon={config.target_epsilon:g} allows no step at noise multiplier {sigma:g} "
            f"(one step spends epsilon {privacy.ledger.epsilon_after_next_step():.4g}): raise "
            "privacy.noise_multiplier, or leave it null to calibrate it to the target"
        )
    if allowed < remaining:
        log.warning(
            "privacy budget: at noise multiplier %.4g and sample rate %.4g, privacy.target_epsilon=%g "
            "allows %d of the %d remaining steps; training will stop after step %d",
            sigma,
            datamodule.sample_rate,
            config.target_epsilon,
            allowed,
            remaining,
            max_steps - remaining + allowed,
        )
    return privacy


def starting_point(config: PrivacyConfig, start: RunStart, inherited: History) -> dict[str, Any] | None:
    """Where a new DP run starts from, for its report: the public prior (its spend does not
    count), or init_ckpt_path with what of its history counts."""
    if start.prior is not None:
        path = start.prior["pipeline"] if start.pretrained else start.prior["checkpoint"]
        return {"path": path, "data": "disjoint", "steps_counted": 0, "public_prior": start.prior}
    if start.path is not None:
        return {"path": str(start.path), "data": config.init_data, "steps_counted": steps_of(inherited)}
    return None


def make_module(
    cfg: DictConfig,
    model: torch.nn.Module,
    mechanism: Mechanism,
    physical_batch_size: int,
    config: dict | None = None,
    **settings: Any,
) -> DiffusionModule:
    """The training module (`cfg.module`: the diffusion loss, optimizer, EMA and seed, which
    `settings` override) of `model` under `mechanism`; `config`, the resolved run
    configuration, is saved in its checkpoints."""
    build = instantiate(cfg.module, **settings)
    return build(model=model, privacy=mechanism, physical_batch_size=physical_batch_size, config=config)


def shards(trainer: DictConfig) -> bool:
    """Whether the configured trainer shards the model (trainer=fsdp)."""
    target = OmegaConf.select(trainer, "strategy._target_")
    return target is not None and issubclass(get_class(target), DPFSDPStrategy)


def make_trainer(config: DictConfig, callbacks: list, loggers: list, **settings: Any) -> L.Trainer:
    """The configured Trainer (`settings` override it); with several processes, on
    `DPDDPStrategy`, whose gradient sum is the only one that keeps DP-SGD (and the
    micro-batched step) exact."""
    trainer: L.Trainer = instantiate(config, callbacks=callbacks, logger=loggers or False, **settings)
    if trainer.world_size == 1 or isinstance(trainer.strategy, (DPDDPStrategy, DPFSDPStrategy)):
        return trainer
    if config.get("strategy", "auto") != "auto":
        raise ValueError(
            f"trainer.strategy={config.strategy} on {trainer.world_size} processes would average "
            "gradients its own way, which breaks the DP step: use trainer=ddp "
            "(dpdit.distributed.DPDDPStrategy), trainer=fsdp (DPFSDPStrategy) or leave trainer.strategy=auto"
        )
    return instantiate(config, strategy=DPDDPStrategy(), callbacks=callbacks, logger=loggers or False)


def setup(
    cfg: DictConfig, train_public_stage: Callable[[DictConfig], Any] | None = None
) -> tuple[L.Trainer, DiffusionModule, ImageDataModule]:
    """Build and check everything; raises ConfigError before any training or writing.
    A requeued SLURM job resumes from its run directory's last checkpoint. A new run with a
    `prior` starts from the public stage that `train_public_stage` trains (once; cached)."""
    cfg.ckpt_path = resume_checkpoint(cfg.ckpt_path, cfg.paths.output_dir)
    with settings_checked():
        return _build(cfg, train_public_stage)


def _build(cfg: DictConfig, train_public_stage) -> tuple[L.Trainer, DiffusionModule, ImageDataModule]:
    check_output_directory(cfg.paths.output_dir, cfg.ckpt_path)
    if cfg.get("prior") is not None:
        log.info(settings_line(cfg))
    if cfg.ckpt_path is not None and cfg.init_ckpt_path is not None:
        raise ValueError(
            "ckpt_path and init_ckpt_path are both set: ckpt_path resumes a run, "
            "init_ckpt_path starts a new one from another run's weights; give one"
        )
    privacy_config: PrivacyConfig | NonPrivateConfig = instantiate(cfg.privacy)
    privacy_config.check_precision(cfg.trainer.precision)
    sharded = shards(cfg.trainer)
    if sharded:
        privacy_config.check_sharding()
    # A new run (not a resume, not from a given checkpoint) starts from the public prior.
    prior = None
    if has_public_prior(cfg) and cfg.ckpt_path is None and cfg.init_ckpt_path is None:
        if train_public_stage is None:
            raise ValueError("this command trains from the model's initial weights: set prior=none")
        check_own_data(cfg.data, privacy_config)
        prior = prepare_prior(cfg, train_public_stage)
        start_from_prior(cfg, prior)
    resumed = read_checkpoint(cfg.ckpt_path, "ckpt_path")
    initial = read_checkpoint(cfg.init_ckpt_path, "init_ckpt_path")
    L.seed_everything(cfg.seed, workers=True)
    # The model first: a pretrained one brings the VAE that encodes the data.
    model = instantiate(cfg.model)
    if resumed is not None:
        check_checkpoint_fits(model, resumed, cfg.data, cfg.ckpt_path)
    if initial is not None:
        initialise_from(model, initial, cfg.init_ckpt_path)
    datamodule: ImageDataModule = instantiate(
        cfg.data,
        poisson_sampling=privacy_config.poisson_sampling,
        randomness=privacy_config.randomness(cfg.seed),
        vae=model.vae,
    )
    datamodule.setup("fit")
    check_batches(datamodule)
    check_data_matches_model(datamodule, model)
    start = RunStart(prior, initial, cfg.init_ckpt_path, uses_pretrained_model(cfg))
    privacy = make_mechanism(privacy_config, datamodule, cfg.trainer.max_steps, resumed, start)
    privacy_config.check_model(model)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    module = make_module(cfg, model, privacy, datamodule.physical_batch_size, config=resolved)
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values()]
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values()]
    trainer = make_trainer(cfg.trainer, callbacks, loggers)
    check_memory_fits(
        model,
        privacy_config.clipping,
        datamodule.physical_batch_size,
        privacy.noise_multiplicity,
        trainer.strategy.root_device,
        cfg.optimizer._target_,
        shards=trainer.world_size if sharded else 1,
    )
    if trainer.is_global_zero:
        save_run_config(resolved, cfg.paths.output_dir, resumed.get("global_step") if resumed else None)
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)
    return trainer, module, datamodule
