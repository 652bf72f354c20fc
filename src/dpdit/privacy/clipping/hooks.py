"""`privacy.clipping=hooks`: Opacus' per-sample gradients from its hook samplers (functorch
for a layer without one), clipped by Opacus' optimizer. Every layer's per-sample gradient is
held until the backward pass ends."""

from __future__ import annotations

from typing import Any

import torch
from opacus.grad_sample import GradSampleHooks
from torch import nn

from dpdit.privacy.clipping.base import (
    FUNCTORCH,
    HOOK,
    Backward,
    Clipper,
    ClippingMode,
    TracedLayer,
    mean_over_draws,
    trained_bytes,
)
from dpdit.privacy.clipping.opacus_hooks import attach_opacus_hooks
from dpdit.units import size


class PerSampleGradients(Clipper):
    """Per-sample gradients on the parameters (`grad_sample`), per image over its rows."""

    def __init__(self, hooks, draws: int, backward: Backward):
        self.hooks, self.draws, self.backward = hooks, draws, backward

    def per_image_norms(self, loss_per_image: torch.Tensor, optimizer) -> torch.Tensor:
        self.backward(loss_per_image.mean())
        if self.draws > 1:
            for parameter in optimizer.params:
                parameter.grad_sample = mean_over_draws(parameter.grad_sample, self.draws)
        # Opacus computes these norms again when it clips; it does not keep them.
        return torch.stack([g.flatten(1).norm(dim=1) for g in optimizer.grad_samples], dim=1).norm(dim=1)


class Hooks(ClippingMode):
    name = "hooks"
    optimizer = "hooks"
    # Opacus' hook samplers may take functorch's vmap instead: force_functorch
    functorch_only = False
    sharding_refusal = (
        "it keeps every image's gradient of every layer, at the gathered weights' whole size, until the "
        "optimizer clips them: sharding cannot split what it holds"
    )

    def attach(self, model: nn.Module, max_grad_norm: float, draws: int, backward: Backward) -> Clipper:
        return PerSampleGradients(
            attach_opacus_hooks(model, "hooks", force_functorch=self.functorch_only), draws, backward
        )

    def path(self, layer: nn.Module, tokens: int = 1) -> str:
        return HOOK if not self.functorch_only and type(layer) in GradSampleHooks.GRAD_SAMPLERS else FUNCTORCH

    def minimum_bytes(self, model: nn.Module, images: int, draws: int) -> dict[str, int]:
        """A gradient of every trained weight per row, and the clipped sum."""
        gradients = trained_bytes(model)
        return {"per-sample gradients": images * draws * gradients, "clipped sum": gradients}

    def memory(self, model: nn.Module, layers: list[TracedLayer], batch_size: int, draws: int) -> dict[str, Any]:
        """Every layer's per-row gradient until the backward pass ends (then the per-image
        means, which the optimizer clips), and the clipped sum beside the gradients."""
        parts = self.minimum_bytes(model, batch_size, draws)
        return {
            "bytes": sum(parts.values()),
            "per_sample_gradient_bytes": parts["per-sample gradients"],
            "clipped_sum_bytes": parts["clipped sum"],
        }

    def describe_memory(self, memory: dict[str, Any]) -> str:
        return (
            f"{self.name}: {size(memory['per_sample_gradient_bytes'])} of per-sample gradients and their clipped sum, "
            f"{size(memory['clipped_sum_bytes'])}, beside the gradients"
        )
