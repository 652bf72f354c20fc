"""`python -m dpdit.sample ckpt_path=...`: class-conditional images from a checkpoint's EMA weights.

The model and the diffusion are rebuilt from the configuration stored in the checkpoint by
train.py, so a checkpoint is all a user has to give, with the `sample.*` settings. Image i is
drawn with its own generator, seeded by (sample.seed, i): the same seed on the same device
gives the same images whatever `sample.batch_size`, and asking for more images extends a
set instead of changing it.

Writes to the run directory `images/<class>/<i>.png`, `samples.npz` (uint8 images N x C x
H x W and their labels) and `samples.png`, a grid of the first images of each class.
Sampling from the EMA weights is post-processing of the private model: it costs no privacy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from dpdit.checkpoints import model_of
from dpdit.cli import command, settings_checked
from dpdit.diffusion import SAMPLERS, GaussianDiffusion
from dpdit.images import save_grid, to_uint8
from dpdit.randomness import derived_seed

log = logging.getLogger(__name__)
DEVICES = ("auto", "cpu", "cuda")


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index`'s generator: independent across images and seeds."""
    return derived_seed(seed, 2, index)


def class_labels(num_images: int, labels: Sequence[int] | None, num_classes: int) -> torch.Tensor:
    """`num_images` labels: `labels` in turn, or every class in turn (a balanced set)."""
    if num_images < 1:
        raise ValueError(f"sample.num_images={num_images} must be at least 1")
    cycle = list(range(num_classes)) if labels is None else list(labels)
    if not cycle:
        raise ValueError("sample.class_labels=[] names no class: give labels or null for every class")
    wrong = [label for label in cycle if not 0 <= label < num_classes]
    if wrong:
        raise ValueError(f"sample.class_labels holds {wrong}, outside the model's classes 0..{num_classes - 1}")
    return torch.tensor(cycle).repeat(-(-num_images // len(cycle)))[:num_images]


@torch.no_grad()
def generate(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    labels: torch.Tensor,
    guidance_scale: float,
    steps: int,
    scheduler: str,
    seed: int,
    batch_size: int,
    progress: bool = True,
    desc: str = "sampling",
) -> np.ndarray:
    """uint8 images N x C x H x W, one per label, with classifier-free guidance, in batches;
    a latent model's samples are decoded to pixels by its VAE."""
    model.eval()
    device = labels.device
    images = []
    with tqdm(total=len(labels), desc=desc, unit="image", disable=not progress) as bar:
        for start in range(0, len(labels), batch_size):
            chunk = labels[start : start + batch_size]
            generators = [
                torch.Generator(device=device).manual_seed(image_seed(seed, start + i)) for i in range(len(chunk))
            ]
            x = diffusion.sample(model, chunk, guidance_scale, steps, scheduler, generators, progress=False)
            images.append(to_uint8(x if model.vae is None else model.vae.decode(x)))
            bar.update(len(chunk))
    return np.concatenate(images)


def load_checkpoint_model(ckpt_path: str | None) -> tuple[nn.Module, GaussianDiffusion, DictConfig]:
    """A checkpoint's EMA model, its diffusion and the configuration it was trained with."""
    if ckpt_path is None:
        raise ValueError(
            "ckpt_path is not set: give a checkpoint written by train.py, "
            "e.g. ckpt_path=outputs/<run>/checkpoints/last.ckpt"
        )
    model, config = model_of(ckpt_path, "ckpt_path")
    return model, instantiate(config.diffusion), config


def pick_device(setting: str) -> torch.device:
    if setting not in DEVICES:
        raise ValueError(f"sample.device={setting!r} is unknown: choose one of {', '.join(DEVICES)}")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("sample.device=cuda but no GPU is visible: use sample.device=cpu")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def write_images(images: np.ndarray, labels: np.ndarray, directory: Path) -> None:
    """One PNG per image, `<label>/<index>.png` (the layout of torchvision's ImageFolder)."""
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = directory / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(folder / f"{index:06d}.png")


def save_samples(
    images: np.ndarray, labels: np.ndarray, output_dir: Path, num_classes: int, grid_per_class: int = 10
) -> Image.Image:
    """`samples.npz` and `samples.png`, a grid with a row of the first images of each class."""
    output_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(output_dir / "samples.npz", images=images, labels=labels)
    shown = [i for c in range(num_classes) for i in np.flatnonzero(labels == c)[:grid_per_class]]
    rows = len({int(labels[i]) for i in shown})
    return save_grid(images[shown], output_dir / "samples.png", rows=max(rows, 1))


def check_settings(settings: DictConfig) -> None:
    if settings.scheduler not in SAMPLERS:
        raise ValueError(f"sample.scheduler={settings.scheduler!r} is unknown: choose one of {', '.join(SAMPLERS)}")
    if settings.steps < 1:
        raise ValueError(f"sample.steps={settings.steps} must be at least 1")
    if settings.batch_size < 1:
        raise ValueError(f"sample.batch_size={settings.batch_size} must be at least 1")


def run_sampling(cfg: DictConfig) -> dict[str, Any]:
    """Sample as configured and write the outputs; returns what was written."""
    with settings_checked():
        settings = cfg.sample
        check_settings(settings)
        device = pick_device(settings.device)
        model, diffusion, run_config = load_checkpoint_model(cfg.ckpt_path)
        labels = class_labels(settings.num_images, settings.class_labels, model.null_class)
    output_dir = Path(cfg.paths.output_dir)
    images = generate(
        model.to(device),
        diffusion,
        labels.to(device),
        settings.guidance_scale,
        settings.steps,
        settings.scheduler,
        settings.seed,
        settings.batch_size,
        desc=f"sampling sample.num_images={len(labels)} images",
    )
    labels = labels.numpy()
    save_samples(images, labels, output_dir, model.null_class)
    if settings.png:
        write_images(images, labels, output_dir / "images")
    OmegaConf.save(
        OmegaConf.create({"ckpt_path": cfg.ckpt_path, "sample": OmegaConf.to_container(settings), "run": run_config}),
        output_dir / "sample_config.yaml",
    )
    log.info("wrote %d images to %s", len(images), output_dir)
    return {"images": images, "labels": labels, "output_dir": output_dir, "run_config": run_config}


@command("sample")
def main(cfg: DictConfig) -> None:
    result = run_sampling(cfg)
    print(f"written: {len(result['images'])} images in {result['output_dir']} (samples.npz, samples.png, images/)")


if __name__ == "__main__":
    main()
