"""`python -m dpdit.evaluate`: how good the synthetic images are, as DPDM reports it.

Samples come from `evaluate.samples` (a `samples.npz` written by dpdit.sample or train.py,
or its folder) or are drawn from `ckpt_path` with the `sample.*` settings. The real data is
the `data` config (give the training's `data=...` or `experiment=...`).

* FID (Heusel et al., 2017) against the real `evaluate.fid_reference` split, on the 2048-d
  pool features of the standard TF-Inception-v3 (torch-fidelity's port; the weights are the
  ones every published FID uses), with torch-fidelity's statistics.
* Precision and recall (Kynkaenniemi et al., 2019; k = 3) on the same features, on at most
  `evaluate.prc_images` images of each side.
* Downstream accuracy (DPDM's protocol): a CNN trained on the synthetic images only, its
  epoch chosen on a held-out part of the synthetic images, then tested once on the real
  test split. The private test set never takes part in a choice.

FID and precision/recall read the real images: like every published FID, they are
measurements for the developer, not private releases. Results go to `evaluation.json` and to
the configured loggers (W&B, CSV).
"""

from __future__ import annotations

import copy
import json
import logging
import urllib.error
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dpdit.images import to_uint8
from dpdit.sample import pick_device, run_sampling
from dpdit.train import ConfigError, exit_on_config_error, finish_wandb_runs

log = logging.getLogger(__name__)
METRICS = ("fid", "precision_recall", "downstream")
INCEPTION_FEATURES = "2048"


#################################################################################
#                                 Image sets                                    #
#################################################################################


def load_samples(path: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images N x C x H x W and labels from a samples.npz, or a folder holding one."""
    file = Path(path)
    if file.is_dir():
        file = file / "samples.npz"
    if not file.is_file():
        raise FileNotFoundError(f"evaluate.samples={path}: no samples.npz there; write one with python -m dpdit.sample")
    with np.load(file) as arrays:
        return arrays["images"], arrays["labels"]


def dataset_arrays(dataset: Dataset, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """A dataset of ([-1, 1] image, label) pairs as uint8 images and labels."""
    images, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size):
        images.append(to_uint8(x))
        labels.append(torch.as_tensor(y).numpy())
    return np.concatenate(images), np.concatenate(labels)


#################################################################################
#                     FID and precision/recall (Inception)                      #
#################################################################################


def inception_weights(path: str | None) -> str:
    """The TF-Inception-v3 weights file: `path`, or torch-fidelity's in the torch hub cache,
    fetched there once when the machine can reach it."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"evaluate.inception_weights={path} does not exist: download {URL_INCEPTION_V3} there")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name
    if not cached.is_file():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(cached), progress=False)
        except (urllib.error.URLError, OSError) as error:
            raise FileNotFoundError(
                f"FID needs the standard Inception weights and they could not be downloaded ({error}). "
                f"On a machine with network access download\n    {URL_INCEPTION_V3}\nand put the file at "
                f"{cached} (or anywhere, with evaluate.inception_weights=/path/to/{cached.name}); "
                "or leave FID out with evaluate.metrics=[downstream]"
            ) from error
    return str(cached)


def inception(weights: str | None) -> nn.Module:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = inception_weights(weights)
    return FeatureExtractorInceptionV3("inception-v3-compat", [INCEPTION_FEATURES], feature_extractor_weights_path=path).eval()


@torch.no_grad()
def features(extractor: nn.Module, images: np.ndarray, batch_size: int, device: torch.device, desc: str) -> torch.Tensor:
    """Features of uint8 images (grey ones repeated to three channels), in float64 on the CPU."""
    extractor = extractor.to(device)
    rows = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        x = torch.from_numpy(images[start : start + batch_size]).to(device)
        output = extractor(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)
        rows.append((output[0] if isinstance(output, tuple) else output).double().cpu())
    return torch.cat(rows)


def frechet_distance(fake: torch.Tensor, real: torch.Tensor) -> float:
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    result = fid_statistics_to_metric(fid_features_to_statistics(fake), fid_features_to_statistics(real), verbose=False)
    return float(result["frechet_inception_distance"])


def precision_recall(fake: torch.Tensor, real: torch.Tensor, neighbours: int = 3) -> dict[str, float]:
    from torch_fidelity.metric_prc import prc_features_to_metric

    result = prc_features_to_metric(fake, real, prc_neighborhood=neighbours, verbose=False)
    return {"precision": float(result["precision"]), "recall": float(result["recall"])}


#################################################################################
#                      Downstream accuracy (DPDM's protocol)                    #
#################################################################################


def classifier(channels: int, image_size: int, num_classes: int, width: int = 32) -> nn.Module:
    """A small CNN: two conv-ReLU-pool stages and a two-layer head."""
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * side * side, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, num_classes),
    )


def to_inputs(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float() / 127.5 - 1.0


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(images.split(batch_size), labels.split(batch_size)))
    return correct / max(len(labels), 1)


def downstream_accuracy(
    synthetic: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    settings: DictConfig,
    device: torch.device,
) -> dict[str, Any]:
    """Train on synthetic images, pick the epoch by accuracy on held-out synthetic images,
    test that epoch's weights once on the real test split."""
    generator = torch.Generator().manual_seed(settings.seed)
    images, labels = to_inputs(synthetic[0]), torch.from_numpy(synthetic[1]).long()
    order = torch.randperm(len(labels), generator=generator)
    held = max(1, int(round(settings.validation_fraction * len(labels))))
    if len(labels) - held < 1:
        raise ValueError(f"evaluate.downstream.validation_fraction={settings.validation_fraction} leaves no synthetic image to train on")
    (val_x, val_y), (train_x, train_y) = [(images[i].to(device), labels[i].to(device)) for i in (order[:held], order[held:])]
    torch.manual_seed(settings.seed)
    model = classifier(images.shape[1], images.shape[-1], num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    best = {"validation_accuracy": -1.0}
    for epoch in tqdm(range(1, settings.epochs + 1), desc="downstream classifier", unit="epoch", leave=False):
        model.train()
        for batch in torch.randperm(len(train_y), generator=generator).split(settings.batch_size):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(train_x[batch]), train_y[batch]).backward()
            optimizer.step()
        score = accuracy(model, val_x, val_y)
        if score > best["validation_accuracy"]:
            best = {"validation_accuracy": score, "epoch": epoch, "weights": copy.deepcopy(model.state_dict())}
    model.load_state_dict(best.pop("weights"))
    test_x, test_y = to_inputs(test[0]).to(device), torch.from_numpy(test[1]).long().to(device)
    return {
        "accuracy": accuracy(model, test_x, test_y),
        **best,
        "train_images": len(train_y),
        "validation_images": held,
        "test_images": len(test_y),
    }


#################################################################################
#                                  The command                                  #
#################################################################################


def check_settings(settings: DictConfig) -> None:
    unknown = [m for m in settings.metrics if m not in METRICS]
    if unknown or not settings.metrics:
        raise ValueError(f"evaluate.metrics={list(settings.metrics)}: choose from {', '.join(METRICS)}")
    if settings.fid_reference not in ("train", "test"):
        raise ValueError(f"evaluate.fid_reference={settings.fid_reference!r} is unknown: choose train or test")
    if settings.downstream.epochs < 1:
        raise ValueError(f"evaluate.downstream.epochs={settings.downstream.epochs} must be at least 1")
    if not 0.0 < settings.downstream.validation_fraction < 1.0:
        raise ValueError(f"evaluate.downstream.validation_fraction={settings.downstream.validation_fraction} must lie in (0, 1)")


def synthetic_images(cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    if (cfg.evaluate.samples is None) == (cfg.ckpt_path is None):
        raise ValueError(
            "give either evaluate.samples=<samples.npz or its folder> or ckpt_path=<checkpoint> (to sample from it first)"
        )
    if cfg.evaluate.samples is not None:
        return load_samples(cfg.evaluate.samples)
    result = run_sampling(cfg)
    return result["images"], result["labels"]


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate as configured; returns the results written to evaluation.json."""
    settings = cfg.evaluate
    try:
        check_settings(settings)
        device = pick_device(cfg.sample.device)
        data = instantiate(cfg.data, poisson_sampling=False)
        needs_features = bool({"fid", "precision_recall"} & set(settings.metrics))
        splits = {"test"} if "downstream" in settings.metrics else set()
        splits |= {settings.fid_reference} if needs_features else set()
        # each split read once, also when FID compares with the test split
        real = {split: dataset_arrays(data.images(split)) for split in splits}
        test = real["test"] if "downstream" in settings.metrics else None
        reference = real[settings.fid_reference] if needs_features else None
        extractor = inception(settings.inception_weights) if needs_features else None
        synthetic = synthetic_images(cfg)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error
    real_shape = next(iter(real.values()))[0].shape[1:]
    if synthetic[0].shape[1:] != real_shape:
        raise ConfigError(f"the samples have shape {synthetic[0].shape[1:]} (C, H, W) but data={data.dataset} gives {real_shape}: evaluate against the data the model was trained on")

    results: dict[str, Any] = {"samples": len(synthetic[0]), "data": data.dataset}
    if extractor is not None:
        fake = features(extractor, synthetic[0], settings.batch_size, device, "inception: samples")
        true = features(extractor, reference[0], settings.batch_size, device, f"inception: real {settings.fid_reference}")
        results["fid_reference"] = {"split": settings.fid_reference, "images": len(true)}
        if "fid" in settings.metrics:
            results["fid"] = frechet_distance(fake, true)
        if "precision_recall" in settings.metrics:
            results.update(precision_recall(fake[: settings.prc_images], true[: settings.prc_images]))
    if test is not None:
        results["downstream"] = downstream_accuracy(synthetic, test, data.num_classes, settings.downstream, device)

    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "evaluation.json").write_text(json.dumps(results, indent=2))
    log_results(cfg, results)
    return results


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    flat = {f"eval/{key}": value for key, value in results.items() if isinstance(value, (int, float))}
    flat.update({f"eval/downstream_{key}": value for key, value in results.get("downstream", {}).items()})
    return flat


def log_results(cfg: DictConfig, results: dict[str, Any]) -> None:
    """Send the results to the configured loggers (a W&B run's summary, a CSV row)."""
    for config in cfg.get("logger", {}).values():
        logger = instantiate(config)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        logger.log_metrics(flat_metrics(results))
        logger.finalize("success")
        finish_wandb_runs([logger])


@hydra.main(version_base="1.3", config_path="../../configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    results = exit_on_config_error(run_evaluation, cfg)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
