"""What the modes that run on Opacus' hooks share (`hooks`, `functorch`, `ghost`): attaching
the hooks in float32, and per-image results with several noise draws.

Noise multiplicity (DPDM, Dockhorn et al. 2023): with K noise draws
(`privacy.noise_multiplicity`), each image enters the forward pass as K consecutive rows,
each with its own timestep and noise, and its loss is the mean over its rows. Opacus sees K
rows per image, so its per-row results are gathered into one per image before clipping: in
`hooks` and `functorch` mode the per-row gradients are averaged over each image's rows after
the backward pass; in `ghost` mode the norm samplers fold each image's rows into one
sequence, whose gradient is the sum over the rows (`ghost.per_image_norm_samplers`). Either
way the mean gradient over the K draws is clipped once, and the sensitivity, and with it the
accounting, is that of K=1.
"""

from __future__ import annotations

from opacus.grad_sample.utils import get_hooks_class
from torch import nn

from dpdit.privacy.clipping.base import full_precision, widened


def attach_opacus_hooks(model: nn.Module, kind: str, **options):
    """Opacus' hooks of `kind` ("hooks" or "ghost") on `model` (not wrapped), their
    per-sample gradients computed in float32 under bf16 autocast."""
    hooks = get_hooks_class(kind)(model, batch_first=True, loss_reduction="mean", strict=True, **options)
    hooks.GRAD_SAMPLERS = {layer: in_float32(f) for layer, f in hooks.GRAD_SAMPLERS.items()}
    return hooks


def in_float32(sampler):
    """A per-sample gradient function that computes in float32 when autocast
    gave it bfloat16 activations or gradients: the norms that clipping compares with C,
    and the clipped vectors that are summed, then carry no bfloat16 rounding."""

    def compute(module, activations, backprops, *args, **kwargs):
        with full_precision(backprops.device):
            return sampler(module, [widened(a) for a in activations], widened(backprops), *args, **kwargs)

    return compute
