"""The clipping modes by name, as Opacus keeps its grad samplers by layer type."""

from __future__ import annotations

from dpdit.privacy.clipping.base import ClippingMode

CLIPPING: dict[str, ClippingMode] = {}
# the names `privacy.clipping` accepts, in the order they were registered
CLIPPING_MODES = CLIPPING.keys()


def register_clipping_mode(mode: type[ClippingMode]) -> type[ClippingMode]:
    """`privacy.clipping=<mode.name>` selects an instance of `mode` from now on."""
    CLIPPING[mode.name] = mode()
    return mode


def clipping_mode(name: str) -> ClippingMode:
    """The mode `privacy.clipping=name` selects."""
    if name not in CLIPPING:
        raise ValueError(f"privacy.clipping={name!r} is unknown: choose one of {', '.join(CLIPPING)}")
    return CLIPPING[name]


def clipping_path(layer, mode: str, tokens: int = 1) -> str:
    """How `layer`'s per-image norm is found in clipping `mode`, with `tokens` rows of its
    input per image."""
    return clipping_mode(mode).path(layer, tokens)
