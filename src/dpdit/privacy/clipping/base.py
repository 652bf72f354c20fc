"""What every clipping mode is: a `ClippingMode` says how it attaches to a model, which
Opacus optimizer steps with it, each layer's path to its per-image norm, the bytes it keeps
per image and the precisions it allows; `attach` gives a `Clipper`, which turns one
micro-batch's per-image losses into per-image norms and clipped gradients.

The numerics every mode shares live here too: one fold of an image's rows, float32 under
mixed precision, and which of a Linear's two ways to its norm is smaller.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

# The paths to a layer's per-image norm (the inspector's table shows them).
GHOST_NORM = "ghost norm"
OWN_GRADIENT = "per-sample gradient (own rule)"
HOOK = "per-sample gradient (hook)"
FUNCTORCH = "per-sample gradient (functorch)"

Backward = Callable[[torch.Tensor], None]


@dataclass
class Call:
    """What one traced forward pass of one image saw of a layer."""

    input_shape: list[int]
    output_shape: list[int]
    count: int = 1


@dataclass
class TracedLayer:
    """A layer (or functorch subtree) a mode clips, as one traced image saw it: its trained
    weights' count, tensors and value size, and its call (None when the pass never used it)."""

    name: str
    module: nn.Module
    call: Call | None
    parameters: int
    tensors: int
    value_bytes: int
    draws: int

    @property
    def tokens(self) -> int:
        """Rows of its input per image: each draw's tokens, one sequence per image."""
        return self.draws * (math.prod(self.call.input_shape[1:-1]) if self.call else 1)


class Clipper(ABC):
    """A clipping mode attached to one model: per micro-batch, the per-image norms and either
    per-sample gradients on the parameters (which Opacus' optimizer clips) or the clipped
    sum in `.grad` (which it takes as it is)."""

    # who else holds the trained parameters (besides the optimizer), for `check_parameters_held`
    holder: ClassVar[str | None] = None
    trainable_parameters: list[nn.Parameter] | None = None

    @abstractmethod
    def per_image_norms(self, loss_per_image: torch.Tensor, optimizer) -> torch.Tensor:
        """The backward pass of one micro-batch's per-image losses; returns each image's
        gradient norm before clipping. `optimizer` is the DP optimizer of the step."""

    def set_max_grad_norm(self, bound: float) -> None:
        """Clip to `bound` from now on, where the clipper itself clips (adaptive clipping);
        where Opacus' optimizer clips, its own bound is the one that counts."""


class ClippingMode(ABC):
    """One way to per-image clipped gradients (`privacy.clipping=<name>`)."""

    name: ClassVar[str]
    # Opacus' optimizer to step with: "hooks" clips the per-sample gradients it finds on the
    # parameters; "ghost" takes the clipped sum the backward pass left in `.grad`
    optimizer: ClassVar[str]
    # why bf16-mixed would break the per-image bound; None when norms, clipping and sums stay in float32
    bf16_refusal: ClassVar[str | None] = None
    # why this mode cannot train sharded parameters (trainer=fsdp); None when it can
    sharding_refusal: ClassVar[str | None] = "it has no way to shard its clipped sums"

    @abstractmethod
    def attach(self, model: nn.Module, max_grad_norm: float, draws: int, backward: Backward) -> Clipper:
        """This mode on `model` (not wrapped), clipping to `max_grad_norm`, each image `draws`
        consecutive rows; `backward` runs a backward pass (Lightning's `manual_backward`)."""

    @abstractmethod
    def path(self, layer: nn.Module, tokens: int = 1) -> str:
        """How `layer`'s per-image norm is found, with `tokens` rows of its input per image."""

    @abstractmethod
    def memory(self, model: nn.Module, layers: list[TracedLayer], batch_size: int, draws: int) -> dict[str, Any]:
        """What this mode keeps beyond non-private training at `batch_size` images of `draws`
        rows each (the inspector's estimate): `{"bytes": n, ...}`, the rest named parts."""

    def minimum_bytes(self, model: nn.Module, images: int, draws: int) -> dict[str, int]:
        """What this mode holds at least, by part, counted from the parameters alone (the
        memory refusal's lower bound before any step)."""
        return {}

    def describe_memory(self, memory: dict[str, Any]) -> str:
        """A line on what `memory` (as `memory` returned it, merged over modes) holds."""
        return ""

    def layer_problems(self, layer: TracedLayer) -> list[str]:
        """Why this mode would fail on `layer`."""
        return []


#################################################################################
#                              Shared numerics                                 #
#################################################################################


def full_precision(device: torch.device):
    """A context without autocast: per-sample norms, clipping and noise under bf16-mixed
    must run in the parameters' precision, not in bfloat16."""
    return torch.autocast(device.type, enabled=False)


def widened(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 if autocast gave it in a 16-bit float type."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def by_image(x: torch.Tensor, images: int) -> torch.Tensor:
    """An image's rows as one sequence: [images x draws, ..., d] to [images, draws x ..., d]
    (token ids: [images, draws x ...])."""
    return x.reshape(images, -1, x.shape[-1]) if x.is_floating_point() else x.reshape(images, -1)


def mean_over_draws(per_row: torch.Tensor, draws: int) -> torch.Tensor:
    """Per-row values [n * draws, ...], each image's `draws` rows consecutive, to per-image means [n, ...]."""
    return per_row.unflatten(0, (-1, draws)).mean(dim=1)


def gram_matrices_outweigh_gradient(layer: nn.Module, tokens: int) -> bool:
    """Whether a Linear's ghost norm over `tokens` rows per sample (two tokens x tokens Gram
    matrices, g g^T and a a^T) holds more values than its per-sample weight gradient: then
    forming that gradient is the cheaper way to its norm (Li et al., 2022)."""
    return 2 * tokens**2 > layer.weight.numel()


def trainable_parameters(layer: nn.Module) -> list[nn.Parameter]:
    return [p for p in layer.parameters(recurse=False) if p.requires_grad]


def trained_bytes(model: nn.Module) -> int:
    """Bytes of one copy of the trained weights (a gradient, a clipped sum)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def per_image_norm_bytes(layers: list[TracedLayer], batch_size: int) -> int:
    """One norm per image and trained tensor (ghost and book-keeping keep them until the clip)."""
    return batch_size * sum(layer.tensors * layer.value_bytes for layer in layers)
