"""VAE latents of a dataset, encoded once and cached on disk for every later run and rank.

The cache file's name is a hash of everything the latents depend on: the images (file
names, sizes and times, or the dataset's generating settings), the resolution, the flips
and the VAE's configuration and weights. A file lock makes concurrent runs (DDP ranks,
parallel jobs) wait for the first one's encoding instead of repeating it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dpdit.models.pretrained import FrozenVAE


class LatentDataset(Dataset):
    """Latents [N, V, C, h, w] with labels [N]. V = 2 holds each image and its mirror
    (encoded separately, as flipping latents is not flipping images); an access picks one."""

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor):
        self.latents = latents
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        view = int(torch.randint(self.latents.shape[1], ())) if self.latents.shape[1] > 1 else 0
        return self.latents[index, view], self.labels[index]


def describe_images(dataset: Dataset, settings: dict[str, Any]) -> dict[str, Any]:
    """What the images are: the files of a folder dataset, else the settings that make them."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return {"settings": settings, "size": len(dataset)}
    files = []
    for path, label in samples:
        stat = os.stat(path)
        files.append((os.path.relpath(path, dataset.root), label, stat.st_size, stat.st_mtime_ns))
    return {"settings": settings, "files": files}


def cache_key(images: dict[str, Any], vae: FrozenVAE, flips: bool) -> str:
    content = json.dumps({"images": images, "vae": vae.fingerprint(), "flips": flips}, sort_keys=True, default=str)
    return hashlib.sha256(content.encode()).hexdigest()[:20]


@torch.no_grad()
def encode_dataset(dataset: Dataset, vae: FrozenVAE, flips: bool, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    latents, labels = [], []
    for images, targets in tqdm(DataLoader(dataset, batch_size=batch_size), desc="encoding latents"):
        images = images.to(device)
        views = [vae.encode(images)]
        if flips:
            views.append(vae.encode(images.flip(-1)))
        latents.append(torch.stack(views, dim=1).cpu())
        labels.append(torch.as_tensor(targets))
    return torch.cat(latents), torch.cat(labels)


def cached_latents(
    dataset: Dataset, vae: FrozenVAE, cache_dir: str | Path, images: dict[str, Any], flips: bool, batch_size: int
) -> LatentDataset:
    """The latents of `dataset` (deterministic images; `flips` adds mirrors), from the cache
    in `cache_dir`, encoding them first if no run has yet."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{cache_key(images, vae, flips)}.pt"
    with FileLock(f"{path}.lock"):
        if not path.exists():
            latents, labels = encode_dataset(dataset, vae, flips, batch_size)
            partial = path.with_suffix(".partial")
            torch.save({"latents": latents, "labels": labels, "vae": vae.name_or_path, "images": images}, partial)
            partial.replace(path)
    cached = torch.load(path, map_location="cpu", weights_only=True)
    return LatentDataset(cached["latents"], cached["labels"])
