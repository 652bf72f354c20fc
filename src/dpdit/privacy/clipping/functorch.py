"""`privacy.clipping=functorch`: `hooks` with every layer's per-sample gradient from
functorch's vmap, Opacus' samplers set aside."""

from __future__ import annotations

from dpdit.privacy.clipping.hooks import Hooks


class Functorch(Hooks):
    name = "functorch"
    functorch_only = True
    bf16_refusal = "functorch recomputes each layer per sample outside autocast, from bfloat16 inputs"
