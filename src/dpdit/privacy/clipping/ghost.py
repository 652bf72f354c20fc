"""`privacy.clipping=ghost`: Opacus' ghost clipping (Li et al., 2022; Bu et al., 2023). The
first backward pass gives per-image norms without per-sample gradients where a layer has a
norm sampler (Linear, Embedding), a second one the clipped sum, which Opacus' ghost
optimizer takes from `.grad`."""

from __future__ import annotations

import math
from typing import Any

import torch
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.grad_sample.linear import compute_linear_norm_sample
from opacus.grad_sample.utils import get_hooks_class
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn

from dpdit.privacy.clipping.base import (
    FUNCTORCH,
    GHOST_NORM,
    HOOK,
    Backward,
    Clipper,
    ClippingMode,
    TracedLayer,
    by_image,
    gram_matrices_outweigh_gradient,
    mean_over_draws,
    per_image_norm_bytes,
)
from dpdit.privacy.clipping.opacus_hooks import attach_opacus_hooks
from dpdit.units import size

HOOKS = get_hooks_class("ghost")


class GhostClipping(Clipper):
    """Opacus' ghost hooks: norms in the first backward pass, the clipped sum in the second."""

    holder = "Opacus' ghost clipping hook list"

    def __init__(self, hooks):
        self.hooks = hooks
        self.trainable_parameters = hooks.trainable_parameters

    def per_image_norms(self, loss_per_image: torch.Tensor, optimizer) -> torch.Tensor:
        DPTensorFastGradientClipping(self.hooks, optimizer, loss_per_image, "mean").backward()
        return self.hooks.per_sample_gradient_norms

    def set_max_grad_norm(self, bound: float) -> None:
        self.hooks.max_grad_norm = bound


class Ghost(ClippingMode):
    name = "ghost"
    optimizer = "ghost"
    bf16_refusal = (
        "ghost clipping's second backward pass sums the batch's clipped gradients in bfloat16, whose "
        "rounding mixes images and breaks the per-image bound"
    )
    sharding_refusal = (
        "under FSDP its first backward pass (the norms) would reduce-scatter a whole gradient that is thrown "
        "away, twice book-keeping's communication for the same clipped sum"
    )

    def attach(self, model: nn.Module, max_grad_norm: float, draws: int, backward: Backward) -> Clipper:
        hooks = attach_opacus_hooks(model, "ghost", max_grad_norm=max_grad_norm, use_ghost_clipping=True)
        if draws > 1:
            hooks.NORM_SAMPLERS = self.per_image_norm_samplers(model, hooks, draws)
        return GhostClipping(hooks)

    def path(self, layer: nn.Module, tokens: int = 1) -> str:
        if type(layer) in HOOKS.NORM_SAMPLERS:
            return GHOST_NORM
        return HOOK if type(layer) in HOOKS.GRAD_SAMPLERS else FUNCTORCH

    def per_image_norm_samplers(self, model: nn.Module, hooks, draws: int) -> dict:
        """Norm samplers with `draws` rows per image, for every trainable layer type of `model`,
        by the layer's path: its own norm sampler over the folded rows, or the norm of the
        mean of its per-row gradients (hook sampler, or functorch), which Opacus would
        otherwise turn into per-row norms."""
        samplers = {}
        for layer in {m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))}:
            kind = type(layer)
            path = self.path(layer)
            if path == GHOST_NORM:
                linear_gradient = hooks.GRAD_SAMPLERS[kind] if kind is nn.Linear else None
                samplers[kind] = per_image_norm_sampler(hooks.NORM_SAMPLERS[kind], draws, linear_gradient)
            else:
                grad_sampler = hooks.GRAD_SAMPLERS[kind] if path == HOOK else ft_compute_per_sample_gradient
                samplers[kind] = norm_of_mean_gradient_sampler(grad_sampler, draws)
        return samplers

    def transient_bytes_per_image(self, layer: TracedLayer) -> int:
        """The memory ghost clipping needs for `layer` per image, freed after its norm.

        A Linear's norm sampler forms g g^T and a a^T over the T tokens of each image (T^2
        values each) for the weight and another g g^T for the bias; with a 2-D input T is 1.
        With K draws an image's rows are one sequence of K T tokens, unless forming the
        per-image gradient is smaller, which the training then does. Other norm samplers (the
        embedding's) sum the output gradient per row they touched, at most its size. A layer
        without a norm sampler holds its full per-row gradients."""
        if layer.call is None:
            return 0
        if self.path(layer.module) != GHOST_NORM:
            return layer.draws * layer.parameters * layer.value_bytes
        module = layer.module
        if HOOKS.NORM_SAMPLERS[type(module)] is compute_linear_norm_sample:
            if layer.draws > 1 and gram_matrices_outweigh_gradient(module, layer.tokens):
                return layer.parameters * layer.value_bytes
            matrices = 2 * module.weight.requires_grad + (module.bias is not None and module.bias.requires_grad)
            return matrices * layer.tokens**2 * layer.value_bytes
        return layer.draws * math.prod(layer.call.output_shape[1:]) * layer.value_bytes

    def memory(self, model: nn.Module, layers: list[TracedLayer], batch_size: int, draws: int) -> dict[str, Any]:
        """One norm per image and parameter tensor, plus the largest per-layer transient."""
        norms = per_image_norm_bytes(layers, batch_size)
        transients = [self.transient_bytes_per_image(layer) for layer in layers]
        peak = max(transients)
        return {
            "bytes": norms + batch_size * peak,
            "ghost_norm_bytes": norms,
            "ghost_peak_bytes": batch_size * peak,
            "ghost_peak_layer": layers[transients.index(peak)].name,
            "ghost_peak_layers": transients.count(peak),
        }

    def describe_memory(self, memory: dict[str, Any]) -> str:
        more = memory["ghost_peak_layers"] - 1
        return (
            f"{self.name}: {size(memory['ghost_norm_bytes'])} of stored norms plus the largest transient, "
            f"{size(memory['ghost_peak_bytes'])} at {memory['ghost_peak_layer']}"
            + (f" (and {more} more layers alike)" if more else "")
        )

    def layer_problems(self, layer: TracedLayer) -> list[str]:
        if layer.call is None or self.path(layer.module) != GHOST_NORM:
            return []
        problems = []
        if layer.call.count > 1:
            problems.append(
                f"called {layer.call.count} times per forward pass: ghost clipping refuses parameter reuse, "
                "so privacy.clipping=ghost fails here; use hooks or functorch"
            )
        dims = len(layer.call.input_shape)
        if HOOKS.NORM_SAMPLERS[type(layer.module)] is compute_linear_norm_sample and dims >= 4:
            problems.append(
                f"{dims}-D input: Opacus' Linear norm sampler takes 2-D or 3-D inputs only, "
                "so privacy.clipping=ghost fails here; use hooks or functorch"
            )
        return problems


def per_image_norm_sampler(sampler, draws: int, grad_sampler=None):
    """An Opacus ghost norm sampler whose norms are per image. Each image's `draws` rows
    become one sequence (`by_image`), on which a Linear's or Embedding's per-sample gradient
    is the sum of the rows' gradients; the norm of their mean is that norm / draws.

    Folding multiplies a Linear's sequence by `draws` and its Gram matrices by draws^2; with a
    `grad_sampler` (the Linear's), a layer whose Gram matrices would outweigh its gradient
    takes the norm of the per-image gradient that sampler sums over the folded sequence."""

    def compute(module, activations, backprops):
        images = backprops.shape[0] // draws
        activations, backprops = [by_image(a, images) for a in activations], by_image(backprops, images)
        if grad_sampler is not None and gram_matrices_outweigh_gradient(module, backprops.shape[1]):
            grads = grad_sampler(module, activations, backprops)
            norms = {parameter: grad.flatten(1).norm(dim=1) for parameter, grad in grads.items()}
        else:
            norms = sampler(module, activations, backprops)
        return {parameter: norm / draws for parameter, norm in norms.items()}

    return compute


def norm_of_mean_gradient_sampler(grad_sampler, draws: int):
    """A ghost norm sampler for a layer without one: the norm of the mean of each image's
    `draws` per-row gradients, from Opacus' grad sampler for the layer."""

    def compute(module, activations, backprops):
        grads = grad_sampler(module, activations, backprops)
        return {parameter: mean_over_draws(grad, draws).flatten(1).norm(dim=1) for parameter, grad in grads.items()}

    return compute
