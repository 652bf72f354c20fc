"""Per-sample gradients and norms: attaching Opacus to a model, the path each layer's
per-sample norm takes, float32 under mixed precision, and noise multiplicity.

Noise multiplicity (DPDM, Dockhorn et al. 2023): with K noise draws
(`privacy.noise_multiplicity`), each image enters the forward pass as K consecutive rows,
each with its own timestep and noise, and its loss is the mean over its rows. Opacus sees K
rows per image, so its per-row results are gathered into one per image before clipping: in
`hooks` and `functorch` mode the per-row gradients are averaged over each image's rows after
the backward pass (`mean_over_draws`); in `ghost` mode the norm samplers fold each image's
rows into one sequence, whose gradient is the sum over the rows (`per_image_norm_samplers`).
Either way the mean gradient over the K draws is clipped once, and the sensitivity, and with
it the accounting, is that of K=1.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import GradSampleHooks
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.grad_sample.utils import get_hooks_class
from torch import nn

# The paths to a layer's per-sample norm.
GHOST_NORM = "ghost norm"
OWN_GRADIENT = "per-sample gradient (own rule)"
HOOK = "per-sample gradient (hook)"
FUNCTORCH = "per-sample gradient (functorch)"
BOOKKEEPING = "bookkeeping"


def clipping_path(layer: nn.Module, mode: str, tokens: int = 1) -> str:
    """How `layer`'s per-sample norm is found in clipping `mode`, with `tokens` rows of its
    input per image, as the attaching code sets it up: in book-keeping mode by
    `bookkeeping_path`; in Opacus' modes (`attach_per_sample_hooks`) ghost takes a norm
    sampler where Opacus registers one; otherwise a registered hook sampler computes the
    per-sample gradient, and functorch (forced in `functorch` mode) does for any other layer."""
    if mode == BOOKKEEPING:
        return bookkeeping_path(layer, tokens)
    hooks = get_hooks_class(mode)
    if type(layer) in getattr(hooks, "NORM_SAMPLERS", {}):
        return GHOST_NORM
    if mode != "functorch" and type(layer) in hooks.GRAD_SAMPLERS:
        return HOOK
    return FUNCTORCH


def has_own_rule(layer: nn.Module) -> bool:
    """Whether book-keeping clipping has a rule of its own for `layer` (Linear, Embedding)."""
    if isinstance(layer, nn.Embedding):
        return not (layer.scale_grad_by_freq or layer.sparse or layer.max_norm is not None)
    return type(layer) is nn.Linear


def bookkeeping_path(layer: nn.Module, tokens: int) -> str:
    """Book-keeping's way to `layer`'s per-image norm with `tokens` rows of its input per
    image: by its own Linear and Embedding rules, the ghost norm or the per-image gradient,
    whichever holds fewer values (Bu et al., 2023); for other layers, Opacus' grad sampler
    or functorch."""
    if has_own_rule(layer):
        if isinstance(layer, nn.Linear) and gram_matrices_outweigh_gradient(layer, tokens):
            return OWN_GRADIENT
        return GHOST_NORM
    return HOOK if type(layer) in GradSampleHooks.GRAD_SAMPLERS else FUNCTORCH


def attach_per_sample_hooks(model: nn.Module, mode: str, max_grad_norm: float, draws: int):
    """Opacus' hooks for clipping `mode` on `model` (not wrapped): per-sample gradients (or,
    in ghost mode, norms) computed in float32, per image over its `draws` rows."""
    ghost = {"max_grad_norm": max_grad_norm, "use_ghost_clipping": True} if mode == "ghost" else {}
    functorch = {"force_functorch": True} if mode == "functorch" else {}
    hooks = get_hooks_class(mode)(model, batch_first=True, loss_reduction="mean", strict=True, **ghost, **functorch)
    hooks.GRAD_SAMPLERS = {layer: in_float32(f) for layer, f in hooks.GRAD_SAMPLERS.items()}
    if mode == "ghost" and draws > 1:
        hooks.NORM_SAMPLERS = per_image_norm_samplers(model, hooks, draws)
    return hooks


def full_precision(device: torch.device):
    """A context without autocast: per-sample norms, clipping and noise under bf16-mixed
    must run in the parameters' precision, not in bfloat16."""
    return torch.autocast(device.type, enabled=False)


def widened(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 if autocast gave it in a 16-bit float type."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def in_float32(sampler):
    """A per-sample gradient function that computes in float32 when autocast
    gave it bfloat16 activations or gradients: the norms that clipping compares with C,
    and the clipped vectors that are summed, then carry no bfloat16 rounding."""

    def compute(module, activations, backprops, *args, **kwargs):
        with full_precision(backprops.device):
            return sampler(module, [widened(a) for a in activations], widened(backprops), *args, **kwargs)

    return compute


def mean_over_draws(per_row: torch.Tensor, draws: int) -> torch.Tensor:
    """Per-row values [n * draws, ...], each image's `draws` rows consecutive, to per-image means [n, ...]."""
    return per_row.unflatten(0, (-1, draws)).mean(dim=1)


def gram_matrices_outweigh_gradient(layer: nn.Module, tokens: int) -> bool:
    """Whether a Linear's ghost norm over `tokens` rows per sample (two tokens x tokens Gram
    matrices, g g^T and a a^T) holds more values than its per-sample weight gradient: then
    forming that gradient is the cheaper way to its norm (Li et al., 2022)."""
    return 2 * tokens**2 > layer.weight.numel()


def per_image_norm_samplers(model: nn.Module, hooks, draws: int) -> dict:
    """Ghost clipping's norm samplers with `draws` rows per image, for every trainable layer
    type of `model`, by the layer's clipping path: its own norm sampler over the folded rows,
    or the norm of the mean of its per-row gradients (hook sampler, or functorch), which
    Opacus would otherwise turn into per-row norms."""
    samplers = {}
    for layer in {m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))}:
        kind = type(layer)
        path = clipping_path(layer, "ghost")
        if path == GHOST_NORM:
            linear_gradient = hooks.GRAD_SAMPLERS[kind] if kind is nn.Linear else None
            samplers[kind] = per_image_norm_sampler(hooks.NORM_SAMPLERS[kind], draws, linear_gradient)
        else:
            samplers[kind] = norm_of_mean_gradient_sampler(hooks.GRAD_SAMPLERS[kind] if path == HOOK else ft_compute_per_sample_gradient, draws)
    return samplers


def per_image_norm_sampler(sampler, draws: int, grad_sampler=None):
    """An Opacus ghost norm sampler whose norms are per image. Each image's `draws` rows
    become one sequence ([n * draws, ..., d] to [n, draws x ..., d]; token ids [n, draws x ...]),
    on which a Linear's or Embedding's per-sample gradient is the sum of the rows' gradients;
    the norm of their mean is that norm / draws.

    Folding multiplies a Linear's sequence by `draws` and its Gram matrices by draws^2; with a
    `grad_sampler` (the Linear's), a layer whose Gram matrices would outweigh its gradient
    takes the norm of the per-image gradient that sampler sums over the folded sequence."""

    def fold(x: torch.Tensor) -> torch.Tensor:
        images = x.shape[0] // draws
        return x.reshape(images, -1, x.shape[-1]) if x.is_floating_point() else x.reshape(images, -1)

    def compute(module, activations, backprops):
        activations, backprops = [fold(a) for a in activations], fold(backprops)
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
