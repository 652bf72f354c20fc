"""`privacy.clipping=bookkeeping`: book-keeping clipping (Bu, Wang, Zha and Karypis,
"Differentially Private Optimization on Large Model at Small Cost", ICML 2023): every
image's whole gradient clipped with one backward pass.

The forward pass keeps each trainable layer's inputs (activations a) and the place of its
output in the autograd graph. One `torch.autograd.grad` call then gives the gradients of
the summed per-image losses with respect to those outputs (g), and no parameter gradient at
all; the outputs themselves are freed as the pass goes. From (a, g) each layer gets
its per-image gradient norms by the cheaper of two ways (`bookkeeping_path`):

- the ghost norm: for a Linear over T tokens, ||sum_t g_t a_t^T||^2 = sum(a a^T * g g^T),
  two T x T Gram matrices per image (cheap when 2 T^2 <= in x out features); an
  Embedding's rows meet where the same id recurs;
- the per-image gradient itself (cheap otherwise), or, for any other trainable layer, its
  per-sample gradient from Opacus' grad sampler or functorch.

The per-image norms over all layers give the clip factors c_i = min(1, C / (norm_i + 1e-6))
(Opacus' formula), and each layer's clipped sum sum_i c_i grad_i is formed from what the
pass kept, written to `.grad` and the layer's kept tensors dropped. Norms, factors and sums
are computed in float32 when autocast ran the layers in bfloat16.

With K noise draws, each image's K rows are one sequence of K x T tokens (or their
per-sample gradients are summed), so the gradient clipped is that of the image's loss, the
mean over its draws.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, NamedTuple

import torch
from opacus.grad_sample import GradSampleHooks
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from opacus.grad_sample.linear import compute_linear_grad_sample
from torch import nn
from torch.autograd.graph import get_gradient_edge

from dpdit.privacy.clipping.base import (
    FUNCTORCH,
    GHOST_NORM,
    HOOK,
    OWN_GRADIENT,
    Backward,
    Clipper,
    ClippingMode,
    TracedLayer,
    by_image,
    full_precision,
    gram_matrices_outweigh_gradient,
    per_image_norm_bytes,
    trainable_parameters,
    widened,
)
from dpdit.privacy.sharding import as_gradient
from dpdit.units import size


def tokens_of(calls: list[torch.Tensor]) -> torch.Tensor:
    """A layer's [images, tokens, features] over all its calls: a layer called twice per
    image (parameter reuse) sees each image's tokens of both calls."""
    return calls[0] if len(calls) == 1 else torch.cat(calls, dim=1)


class KeptOutput(NamedTuple):
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


def gradient_of(output: KeptOutput, gradient: torch.Tensor | None) -> torch.Tensor:
    """An output's gradient; zero where the loss does not depend on it."""
    return torch.zeros(output.shape, dtype=output.dtype, device=output.device) if gradient is None else gradient


def has_own_rule(layer: nn.Module) -> bool:
    """Whether book-keeping clipping has a rule of its own for `layer` (Linear, Embedding)."""
    if isinstance(layer, nn.Embedding):
        return not (layer.scale_grad_by_freq or layer.sparse or layer.max_norm is not None)
    return type(layer) is nn.Linear


def bookkeeping_path(layer: nn.Module, tokens: int = 1) -> str:
    """Book-keeping's way to `layer`'s per-image norm with `tokens` rows of its input per
    image: by its own Linear and Embedding rules, the ghost norm or the per-image gradient,
    whichever holds fewer values (Bu et al., 2023); for other layers, Opacus' grad sampler
    or functorch."""
    if has_own_rule(layer):
        if isinstance(layer, nn.Linear) and gram_matrices_outweigh_gradient(layer, tokens):
            return OWN_GRADIENT
        return GHOST_NORM
    return HOOK if type(layer) in GradSampleHooks.GRAD_SAMPLERS else FUNCTORCH


class BookKeepingMode(ClippingMode):
    name = "bookkeeping"
    # the one backward pass leaves the clipped sum in `.grad`, as ghost clipping's second does
    optimizer = "ghost"
    # each layer's clipped sum is reduce-scattered to the ranks' rows as it is formed
    sharding_refusal = None

    def attach(self, model: nn.Module, max_grad_norm: float, draws: int, backward: Backward) -> Clipper:
        return BookKeeping(model, max_grad_norm)

    def path(self, layer: nn.Module, tokens: int = 1) -> str:
        return bookkeeping_path(layer, tokens)

    def kept_bytes_per_image(self, layer: TracedLayer) -> int:
        """What `layer` keeps per image until its clipped sum: the output gradients of its
        rows, and the per-image gradient where that is its path (its Gram matrices are
        transient, like ghost clipping's)."""
        if layer.call is None:
            return 0
        gradient = 0 if self.path(layer.module, layer.tokens) == GHOST_NORM else layer.parameters * layer.value_bytes
        return layer.call.count * layer.draws * math.prod(layer.call.output_shape[1:]) * layer.value_bytes + gradient

    def memory(self, model: nn.Module, layers: list[TracedLayer], batch_size: int, draws: int) -> dict[str, Any]:
        """Every layer's output gradients (and per-image gradients where it forms them) from
        the one backward pass until the clipped sums, which are the gradients themselves."""
        norms = per_image_norm_bytes(layers, batch_size)
        kept = batch_size * sum(self.kept_bytes_per_image(layer) for layer in layers)
        return {"bytes": norms + kept, "kept_output_gradient_bytes": kept}

    def describe_memory(self, memory: dict[str, Any]) -> str:
        return (
            f"{self.name}: {size(memory['kept_output_gradient_bytes'])} of output gradients (and per-image gradients "
            "where formed) kept from its one backward pass until the clipped sums, which are the gradients themselves"
        )


class BookKeeping(Clipper):
    """Book-keeping clipping on `model`'s trainable layers, to `max_grad_norm`. An image is
    as many consecutive rows of the forward pass as it has noise draws: each layer's rows
    are grouped per image by the number of per-image losses."""

    holder = "book-keeping clipping's hook list"

    def __init__(self, model: nn.Module, max_grad_norm: float):
        self.max_grad_norm = max_grad_norm
        self.layers = [m for m in model.modules() if trainable_parameters(m)]
        self.trainable_parameters = [p for layer in self.layers for p in trainable_parameters(layer)]
        for layer in self.layers:
            if bookkeeping_path(layer, 1) == FUNCTORCH:
                prepare_layer(layer, batch_first=True)
        # per layer, (inputs, output's gradient edge, output's shape) of each call since the last clipped sum
        self.kept: dict[nn.Module, list[tuple]] = defaultdict(list)
        self.handles = [layer.register_forward_hook(self.keep) for layer in self.layers]

    def keep(self, layer: nn.Module, inputs: tuple, output) -> None:
        # the output's place in the graph, not the output: it is freed as the backward pass goes
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
            inputs = tuple(x.detach() for x in inputs if isinstance(x, torch.Tensor))
            self.kept[layer].append(
                (inputs, get_gradient_edge(output), KeptOutput(output.shape, output.dtype, output.device))
            )

    def set_max_grad_norm(self, bound: float) -> None:
        self.max_grad_norm = bound

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()

    def per_image_norms(self, loss_per_image: torch.Tensor, optimizer=None) -> torch.Tensor:
        """Write sum_i c_i grad_i of `loss_per_image` into the trainable parameters' `.grad`
        with one backward pass; returns the per-image gradient norms before clipping."""
        images = loss_per_image.shape[0]
        kept, self.kept = self.kept, defaultdict(list)
        edges = [edge for calls in kept.values() for _, edge, _ in calls]
        gradients = iter(torch.autograd.grad(loss_per_image.sum(), edges, allow_unused=True))
        calls = {
            layer: [(inputs, gradient_of(output, next(gradients))) for inputs, _, output in layer_calls]
            for layer, layer_calls in kept.items()
        }
        del kept, edges
        with full_precision(loss_per_image.device):
            parts = {layer: self.per_image_part(layer, calls.pop(layer), images) for layer in list(calls)}
            norms = torch.stack([part.squared_norms for part in parts.values()]).sum(0).sqrt()
            factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            for layer in self.layers:
                part = parts.pop(layer, None)
                sums = part.clipped_sums(factors) if part is not None else {}
                for parameter in trainable_parameters(layer):
                    # a layer the forward pass did not call has no gradient
                    parameter.grad = (
                        as_gradient(parameter, sums.pop(parameter))
                        if parameter in sums
                        else torch.zeros_like(parameter)
                    )
        return norms

    def per_image_part(self, layer: nn.Module, calls: list, images: int):
        """What `layer` kept, in the form its path needs: its per-image squared norms and,
        given the clip factors, its clipped sums."""
        if has_own_rule(layer):
            a = tokens_of([by_image(widened(inputs[0]), images) for inputs, _ in calls])
            g = tokens_of([by_image(widened(g), images) for _, g in calls])
            if isinstance(layer, nn.Embedding):
                return EmbeddingPart(layer, a, g)
            if bookkeeping_path(layer, a.shape[1]) == OWN_GRADIENT:
                return GradientPart(compute_linear_grad_sample(layer, [a], g))
            return LinearGhostPart(layer, a, g)
        sampler = (
            ft_compute_per_sample_gradient
            if bookkeeping_path(layer, 1) == FUNCTORCH
            else GradSampleHooks.GRAD_SAMPLERS[type(layer)]
        )
        gradients: dict[nn.Parameter, torch.Tensor] = {}
        for inputs, g in calls:
            for parameter, per_row in sampler(layer, [widened(x) for x in inputs], widened(g)).items():
                per_image = per_row.unflatten(0, (images, -1)).sum(1)
                gradients[parameter] = gradients[parameter] + per_image if parameter in gradients else per_image
        return GradientPart({p: gradients[p] for p in trainable_parameters(layer)})


class GradientPart:
    """A layer whose per-image gradients were formed: their norms, then their weighted sum."""

    def __init__(self, gradients: dict[nn.Parameter, torch.Tensor]):
        self.gradients = gradients
        self.squared_norms = sum(grad.flatten(1).pow(2).sum(1) for grad in gradients.values())

    def clipped_sums(self, factors: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        return {p: torch.einsum("n,n...->...", factors, grad) for p, grad in self.gradients.items()}


class LinearGhostPart:
    """A Linear by its Gram matrices: ||sum_t g_t a_t^T||^2 = sum(a a^T * g g^T) per image."""

    def __init__(self, layer: nn.Linear, a: torch.Tensor, g: torch.Tensor):
        self.layer, self.a, self.g = layer, a, g
        squared = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
        if layer.weight.requires_grad:
            squared = squared + (a @ a.transpose(1, 2) * (g @ g.transpose(1, 2))).sum((1, 2))
        if layer.bias is not None and layer.bias.requires_grad:
            squared = squared + g.sum(1).pow(2).sum(1)
        # a sum of signed products: it can round below zero for a near-zero gradient, whose
        # square root would be NaN; clamped at zero, as Opacus' norm samplers do
        self.squared_norms = squared.clamp(min=0)

    def clipped_sums(self, factors: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        weighted = self.g * factors[:, None, None]
        sums = {}
        if self.layer.weight.requires_grad:
            sums[self.layer.weight] = weighted.flatten(0, 1).T @ self.a.flatten(0, 1)
        if self.layer.bias is not None and self.layer.bias.requires_grad:
            sums[self.layer.bias] = weighted.sum((0, 1))
        return sums


class EmbeddingPart:
    """An Embedding's rows: an image's gradient adds g_t into row id_t, so its squared norm
    sums g_t . g_s over the token pairs with the same id."""

    def __init__(self, layer: nn.Embedding, ids: torch.Tensor, g: torch.Tensor):
        if layer.padding_idx is not None:
            g = g * (ids != layer.padding_idx).unsqueeze(-1)
        self.layer, self.ids, self.g = layer, ids, g
        if ids.shape[1] == 1:
            self.squared_norms = g.pow(2).sum((1, 2))
        else:
            same = ids.unsqueeze(2) == ids.unsqueeze(1)
            self.squared_norms = (same * (g @ g.transpose(1, 2))).sum((1, 2)).clamp(min=0)  # as a Linear's

    def clipped_sums(self, factors: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        weighted = (self.g * factors[:, None, None]).flatten(0, 1)
        total = torch.zeros(self.layer.weight.shape, device=weighted.device, dtype=weighted.dtype)
        return {self.layer.weight: total.index_add_(0, self.ids.flatten(), weighted)}
