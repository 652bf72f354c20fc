"""The clipping modes: one module per mode, each a `ClippingMode` registered by name.

A new mode is one module with a `@register_clipping_mode` class, and its name in the import
below; `privacy.clipping`, the DP step, the settings' checks, the memory refusal and
`dpdit.inspect` then know it.
"""

from dpdit.privacy.clipping import bookkeeping, functorch, ghost, hooks  # noqa: E402,F401  registers them, in this order
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
from dpdit.privacy.clipping.registry import (
    CLIPPING,
    CLIPPING_MODES,
    clipping_mode,
    clipping_path,
    register_clipping_mode,
)

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
