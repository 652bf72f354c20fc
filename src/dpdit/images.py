"""Model-space images to and from uint8 arrays, grids and files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float images N x C x H x W to uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 images to float [-1, 1] (the inverse of `to_uint8` up to its rounding)."""
    return torch.from_numpy(images).float() / 127.5 - 1.0


def save_grid(images: np.ndarray, path: Path, rows: int, min_side: int = 256) -> Image.Image:
    """A PNG grid with one row per class, enlarged (nearest) so small images stay visible."""
    grid = make_grid(torch.from_numpy(images), nrow=max(len(images) // rows, 1), padding=1)
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    scale = max(1, min_side // max(picture.size))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    picture.save(path)
    return picture
