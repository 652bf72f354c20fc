"""`python -m dpdit.evaluate`: how good the synthetic images are, as DPDM reports it.

Samples come from `evaluate.samples` (a `samples.npz` written by dpdit.sample or train.py,
or its folder) or are drawn from `ckpt_path` with the `sample.*` settings. The real data is
the `data` config (give the training's `data=...` or `experiment=...`).

* FID (Heusel et al., 2017) against the real `evaluate.fid_reference` split, on the 2048-d
  pool features of the standard TF-Inception-v3 (torch-fidelity's port; the weights are the
  ones every published FID uses), with torch-fidelity's statistics.
* Precision and recall (Kynkaenniemi et al., 2019; k = 3) on the same features, on at most
  `evaluate.prc_images` images of each side.
* The same two in the feature space of a reference classifier (`classifier_fd`,
  `classifier_precision`/`_recall`), and `class_consistency`, the share of samples it
  assigns to their label. It is the downstream CNN trained on the real training split, with
  its seed, and its 128-d penultimate layer is the feature space: it needs no download, so
  it works offline on any labelled data, and it reads the images at their own size (no
  upsampling of 8x8 digits to Inception's 299 px).
* Downstream accuracy (DPDM's protocol): a CNN trained on the synthetic images only, its
  epoch chosen on a held-out part of the synthetic images, then tested once on the real
  test split. The private test set never takes part in a choice.

`evaluate.metrics=auto` (the default) gives all of them, with FID and precision/recall only
where the Inception weights are on the machine or can be downloaded; without them it says
what to download and where to put it. All of these read the real images: like every
published FID, they are measurements for the developer, not private releases. Results go to
`evaluation.json` and to the configured loggers (W&B, CSV).
"""

from __future__ import annotations

import copy
import json
import logging
import socket
import urllib.error
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dpdit.cli import ConfigError, command, settings_checked
from dpdit.images import from_uint8, to_uint8
from dpdit.logs import finish_wandb_runs
from dpdit.sample import pick_device, run_sampling

log = logging.getLogger(__name__)
INCEPTION_METRICS = ("fid", "precision_recall")
CLASSIFIER_METRICS = ("classifier_fd", "classifier_precision_recall", "class_consistency")
METRICS = (*INCEPTION_METRICS, *CLASSIFIER_METRICS, "downstream")
INCEPTION_FEATURES = "2048"
# how long `evaluate.metrics=auto` waits for the Inception weights' server
DOWNLOAD_TIMEOUT_S = 20


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


def inception_weights(path: str | None, timeout: float | None = None) -> str:
    """The TF-Inception-v3 weights file: `path`, or torch-fidelity's in the torch hub cache,
    fetched there once when the machine can reach it (within `timeout` seconds per attempt)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"evaluate.inception_weights={path} does not exist: download {URL_INCEPTION_V3} there"
            )
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name
    if not cached.is_file():
        previous_timeout = socket.getdefaulttimeout()
        try:
            socket.setdefaulttimeout(timeout)
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(cached), progress=False)
        except (urllib.error.URLError, OSError) as error:
            raise FileNotFoundError(
                f"FID needs the standard Inception weights and they could not be downloaded ({error}). "
                f"On a machine with network access download\n    {URL_INCEPTION_V3}\nand put the file at "
                f"{cached} (or anywhere, with evaluate.inception_weights=/path/to/{cached.name}); "
                "evaluate.metrics=auto measures everything else without them"
            ) from error
        finally:
            socket.setdefaulttimeout(previous_timeout)
    return str(cached)


def inception(weights: str | None) -> nn.Module:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = inception_weights(weights)
    return FeatureExtractorInceptionV3(
        "inception-v3-compat", [INCEPTION_FEATURES], feature_extractor_weights_path=path
    ).eval()


@torch.no_grad()
def features(
    extractor: nn.Module, images: np.ndarray, batch_size: int, device: torch.device, desc: str
) -> torch.Tensor:
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
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * side * side, 128),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(128, num_classes),
    )


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    model.eval()
    correct = sum(
        int((model(x).argmax(1) == y).sum()) for x, y in zip(images.split(batch_size), labels.split(batch_size))
    )
    return correct / max(len(labels), 1)


def train_epochs(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: DictConfig,
    generator: torch.Generator,
    desc: str,
):
    """Train `model` on the images with Adam, one epoch per iteration (yields the epoch)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    for epoch in tqdm(range(1, settings.epochs + 1), desc=desc, unit="epoch", leave=False):
        model.train()
        for batch in torch.randperm(len(labels), generator=generator).split(settings.batch_size):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
        yield epoch


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
    images, labels = from_uint8(synthetic[0]), torch.from_numpy(synthetic[1]).long()
    order = torch.randperm(len(labels), generator=generator)
    held = max(1, int(round(settings.validation_fraction * len(labels))))
    if len(labels) - held < 1:
        raise ValueError(
            f"evaluate.downstream.validation_fraction={settings.validation_fraction} "
            "leaves no synthetic image to train on"
        )
    (val_x, val_y), (train_x, train_y) = [
        (images[i].to(device), labels[i].to(device)) for i in (order[:held], order[held:])
    ]
    torch.manual_seed(settings.seed)
    model = classifier(images.shape[1], images.shape[-1], num_classes).to(device)
    best = {"validation_accuracy": -1.0}
    for epoch in train_epochs(model, train_x, train_y, settings, generator, "downstream classifier"):
        score = accuracy(model, val_x, val_y)
        if score > best["validation_accuracy"]:
            best = {"validation_accuracy": score, "epoch": epoch, "weights": copy.deepcopy(model.state_dict())}
    model.load_state_dict(best.pop("weights"))
    test_x, test_y = from_uint8(test[0]).to(device), torch.from_numpy(test[1]).long().to(device)
    return {
        "accuracy": accuracy(model, test_x, test_y),
        **best,
        "train_images": len(train_y),
        "validation_images": held,
        "test_images": len(test_y),
    }


#################################################################################
#                 Reference classifier: metrics that need no download           #
#################################################################################


def reference_classifier(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    settings: DictConfig,
    device: torch.device,
) -> tuple[nn.Module, dict[str, Any]]:
    """The downstream CNN trained on the real training split for `settings.epochs` epochs
    from `settings.seed`: the same network for every evaluation of this data."""
    generator = torch.Generator().manual_seed(settings.seed)
    images, labels = from_uint8(train[0]).to(device), torch.from_numpy(train[1]).long().to(device)
    torch.manual_seed(settings.seed)
    model = classifier(images.shape[1], images.shape[-1], num_classes).to(device)
    for _ in train_epochs(model, images, labels, settings, generator, "reference classifier (real training split)"):
        pass
    model.eval()
    test_x, test_y = from_uint8(test[0]).to(device), torch.from_numpy(test[1]).long().to(device)
    return model, {
        "train_images": len(labels),
        "epochs": settings.epochs,
        "test_accuracy": accuracy(model, test_x, test_y),
    }


@torch.no_grad()
def classifier_outputs(
    model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """The penultimate-layer features (float64, CPU) and predicted classes of uint8 images."""
    features, predicted = [], []
    for x in from_uint8(images).split(batch_size):
        hidden = model[:-2](x.to(device))  # before the dropout and the output layer
        features.append(hidden.double().cpu())
        predicted.append(model[-1](hidden).argmax(1).cpu())
    return torch.cat(features), torch.cat(predicted)


#################################################################################
#                                  The command                                  #
#################################################################################


def chosen_metrics(settings: DictConfig) -> list[str]:
    """`evaluate.metrics` as a list: `auto` is every metric, the Inception ones only where
    their weights are on the machine or can be downloaded."""
    if settings.metrics == "auto":
        if settings.inception_weights is not None:
            inception_weights(settings.inception_weights)  # a file named but missing is a mistake
            return list(METRICS)
        try:
            inception_weights(settings.inception_weights, timeout=DOWNLOAD_TIMEOUT_S)
            return list(METRICS)
        except FileNotFoundError as error:
            log.warning("evaluate.metrics=auto leaves out FID and precision/recall: %s", error)
            return [m for m in METRICS if m not in INCEPTION_METRICS]
    metrics = (
        list(settings.metrics)
        if isinstance(settings.metrics, Sequence) and not isinstance(settings.metrics, str)
        else [settings.metrics]
    )
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"evaluate.metrics={metrics}: choose auto or a list from {', '.join(METRICS)}")
    return metrics


def check_settings(settings: DictConfig) -> None:
    if settings.fid_reference not in ("train", "test"):
        raise ValueError(f"evaluate.fid_reference={settings.fid_reference!r} is unknown: choose train or test")
    for name in ("downstream", "reference_classifier"):
        if settings[name].epochs < 1:
            raise ValueError(f"evaluate.{name}.epochs={settings[name].epochs} must be at least 1")
    if not 0.0 < settings.downstream.validation_fraction < 1.0:
        raise ValueError(
            f"evaluate.downstream.validation_fraction={settings.downstream.validation_fraction} must lie in (0, 1)"
        )


def synthetic_images(cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    if (cfg.evaluate.samples is None) == (cfg.ckpt_path is None):
        raise ValueError(
            "give either evaluate.samples=<samples.npz or its folder> "
            "or ckpt_path=<checkpoint> (to sample from it first)"
        )
    if cfg.evaluate.samples is not None:
        return load_samples(cfg.evaluate.samples)
    log.info(
        "drawing sample.num_images=%d images from %s to evaluate (the downstream classifier trains on "
        "them, as in DPDM; fewer are quicker and noisier: sample.num_images=1000)",
        cfg.sample.num_images,
        cfg.ckpt_path,
    )
    result = run_sampling(cfg)
    return result["images"], result["labels"]


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate as configured; returns the results written to evaluation.json."""
    settings = cfg.evaluate
    with settings_checked():
        check_settings(settings)
        metrics = chosen_metrics(settings)
        device = pick_device(cfg.sample.device)
        data = instantiate(cfg.data, poisson_sampling=False)
        inception_needed = bool(set(INCEPTION_METRICS) & set(metrics))
        classifier_needed = bool(set(CLASSIFIER_METRICS) & set(metrics))
        splits = {"test"} if "downstream" in metrics or classifier_needed else set()
        splits |= {settings.fid_reference} if inception_needed or classifier_needed else set()
        splits |= {"train"} if classifier_needed else set()
        # each split read once, also when FID compares with the test split
        real = {split: dataset_arrays(data.images(split)) for split in splits}
        extractor = inception(settings.inception_weights) if inception_needed else None
        synthetic = synthetic_images(cfg)
    real_shape = next(iter(real.values()))[0].shape[1:]
    if synthetic[0].shape[1:] != real_shape:
        raise ConfigError(
            f"the samples have shape {synthetic[0].shape[1:]} (C, H, W) but data={data.dataset} gives {real_shape}: "
            "evaluate against the data the model was trained on"
        )

    results: dict[str, Any] = {"samples": len(synthetic[0]), "data": data.dataset, "metrics": metrics}
    if inception_needed or classifier_needed:
        results["fid_reference"] = {"split": settings.fid_reference, "images": len(real[settings.fid_reference][0])}
    if extractor is not None:
        fake = features(extractor, synthetic[0], settings.batch_size, device, "inception: samples")
        true = features(
            extractor,
            real[settings.fid_reference][0],
            settings.batch_size,
            device,
            f"inception: real {settings.fid_reference}",
        )
        if "fid" in metrics:
            results["fid"] = frechet_distance(fake, true)
        if "precision_recall" in metrics:
            results.update(precision_recall(fake[: settings.prc_images], true[: settings.prc_images]))
    if classifier_needed:
        model, results["reference_classifier"] = reference_classifier(
            real["train"], real["test"], data.num_classes, settings.reference_classifier, device
        )
        fake, predicted = classifier_outputs(model, synthetic[0], device)
        true, _ = classifier_outputs(model, real[settings.fid_reference][0], device)
        if "classifier_fd" in metrics:
            results["classifier_fd"] = frechet_distance(fake, true)
        if "classifier_precision_recall" in metrics:
            scores = precision_recall(fake[: settings.prc_images], true[: settings.prc_images])
            results.update({f"classifier_{key}": value for key, value in scores.items()})
        if "class_consistency" in metrics:
            results["class_consistency"] = float((predicted.numpy() == synthetic[1]).mean())
    if "downstream" in metrics:
        results["downstream"] = downstream_accuracy(
            synthetic, real["test"], data.num_classes, settings.downstream, device
        )

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


@command("evaluate")
def main(cfg: DictConfig) -> None:
    results = run_evaluation(cfg)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
