"""Reading what `train.py` writes: a checkpoint, its EMA weights and privacy state, a run's
last checkpoint, and the model a checkpoint's own configuration builds."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dpdit.models.finetune import weights_for

EMA_PREFIX = "ema.module."


def last_checkpoint(run_dir: str | Path) -> Path:
    """Where a run keeps its latest checkpoint."""
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def read_checkpoint(path: str | None, setting: str) -> dict[str, Any] | None:
    """A checkpoint's contents, memory-mapped (the weights are read only where used)."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"{setting}={path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise ValueError(
            f"{setting}={path} cannot be read ({str(error).splitlines()[0].split('. ')[0]}): the file is truncated, "
            "corrupt or not a checkpoint written by train.py; give another checkpoint (e.g. an earlier "
            "one from the same checkpoints/ folder)"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{setting}={path} is not a checkpoint written by train.py (it holds no state_dict)")
    return checkpoint


def privacy_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return checkpoint.get("privacy", {"enabled": False})


def weights_under(checkpoint: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors of the submodule at `prefix` (`model.`, `ema.module.`), named as in it."""
    return {
        key[len(prefix) :]: value for key, value in checkpoint.get("state_dict", {}).items() if key.startswith(prefix)
    }


def initialise_from(
    model: torch.nn.Module, checkpoint: dict[str, Any], path: str, setting: str = "init_ckpt_path"
) -> None:
    """Load the EMA weights of an earlier run (the weights its samples came from); a plain
    run's weights go into the base layers of a model with LoRA adapters."""
    weights = weights_under(checkpoint, EMA_PREFIX)
    if not weights:
        raise ValueError(f"{setting}={path} holds no EMA weights: give a checkpoint written by train.py")
    try:
        model.load_state_dict(weights_for(model, weights))
    except (RuntimeError, ValueError) as error:
        raise ValueError(
            f"{setting}={path} does not fit this model ({str(error).splitlines()[0]}): "
            "set model=... and its sizes as in the run that wrote it"
        ) from error


def model_of(path: str | Path, setting: str) -> tuple[torch.nn.Module, DictConfig]:
    """The EMA model of a checkpoint, rebuilt from the run configuration stored in it, and that configuration."""
    checkpoint = read_checkpoint(str(path), setting)
    if "config" not in checkpoint:
        raise ValueError(f"{setting}={path} holds no run configuration: give a checkpoint written by train.py")
    config = OmegaConf.create(checkpoint["config"])
    model = instantiate(config.model)
    initialise_from(model, checkpoint, str(path), setting)
    return model, config
