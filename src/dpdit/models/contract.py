"""What dpdit reads of a model: the contract `DiT` and `PretrainedDiT` satisfy. Training,
sampling, export, the inspector and the profiler use a model through these names only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from dpdit.models.pretrained import FrozenVAE


@runtime_checkable
class Denoiser(Protocol):
    """A class-conditional noise predictor on square inputs, patch by patch."""

    in_channels: int  # channels of its input: the image's, or the VAE's latents'
    out_channels: int  # in_channels, twice that with a learned variance
    input_size: int  # its input's height and width (pixels, or latents)
    patch_size: int
    num_classes: int
    null_class: int  # the label that means "no class" (classifier-free guidance)
    learn_sigma: bool  # whether the variance half of the output is trained
    vae: FrozenVAE | None  # the frozen VAE whose latents it works on; None: pixels

    def sharding_units(self) -> list[nn.Module]:
        """The submodules FSDP shards one at a time, each gathered only while it runs: modules
        whose own forward the model calls (DiT's blocks)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, input_size, input_size], t: [B] timesteps, y: [B] labels ->
        [B, out_channels, input_size, input_size]."""
