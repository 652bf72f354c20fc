"""`privacy.clipping=functorch`: `hooks` with every layer's per-sample gradient from
functorch's vmap, Opacus' samplers set aside."""

from __future__ import annotations

from dpdit.privacy.clipping.hooks import Hooks
from dpdit.privacy.clipping.registry import register_clipping_mode


@register_clipping_mode
class Functorch(Hooks):
    name = "functorch"
    functorch_only = True
    bf16_refusal = "functorch recomputes each layer per sample outside autocast, from bfloat16 inputs"
