"""The clipping modes: one module per mode, each a `ClippingMode` registered by name.

A new mode is one module with its `ClippingMode` class, and one line below that registers
it; `privacy.clipping`, the DP step, the settings' checks, the memory refusal and
`dpdit.inspect` then know it. The order here is the order of every table and choice list.
"""

from dpdit.privacy.clipping.base import (
    FUNCTORCH,
    GHOST_NORM,
    HOOK,
    OWN_GRADIENT,
    Call,
    Clipper,
    ClippingMode,
    TracedLayer,
)
from dpdit.privacy.clipping.bookkeeping import BookKeepingMode
from dpdit.privacy.clipping.functorch import Functorch
from dpdit.privacy.clipping.ghost import Ghost
from dpdit.privacy.clipping.hooks import Hooks
from dpdit.privacy.clipping.registry import (
    CLIPPING,
    CLIPPING_MODES,
    clipping_mode,
    clipping_path,
    register_clipping_mode,
)

register_clipping_mode(Hooks)
register_clipping_mode(Ghost)
register_clipping_mode(Functorch)
register_clipping_mode(BookKeepingMode)

__all__ = [
    "CLIPPING",
    "CLIPPING_MODES",
    "FUNCTORCH",
    "GHOST_NORM",
    "HOOK",
    "OWN_GRADIENT",
    "Call",
    "Clipper",
    "ClippingMode",
    "TracedLayer",
    "clipping_mode",
    "clipping_path",
    "register_clipping_mode",
]
