"""The memory training holds at least, counted from the parameters before any step, so that
a run that cannot fit is refused before work with its reason instead of being killed in
its first step (on 24 GiB, hooks' per-sample gradients of DiT-XL/2's 750M weights).

The count is a lower bound: the training state (weights, the EMA copy, gradients and the
optimizer's state), in `hooks` and `functorch` mode the per-sample gradients of every
trained weight and their clipped sum; activations and the libraries' own memory come on
top, and are not counted.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dpdit.privacy.clipping import clipping_mode
from dpdit.privacy.clipping.base import trained_bytes
from dpdit.units import size

# values of optimizer state per trained weight, by the optimizer's class
OPTIMIZER_STATE = {"torch.optim.Adam": 2, "torch.optim.AdamW": 2, "torch.optim.SGD": 0}
LABELS = {"adam": "optimizer state", "ema": "EMA copy"}


class DoesNotFit(ValueError):
    """A run whose lower bound on memory exceeds what its device has."""


def training_state_bytes(model: nn.Module, optimizer_state: int = 2) -> dict[str, int]:
    """Bytes of the state training holds in every mode: weights, gradients of the trained
    ones, `optimizer_state` values per trained weight (Adam: 2) and the EMA copy."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    gradients = trained_bytes(model)
    return {"weights": weights, "gradients": gradients, "adam": optimizer_state * gradients, "ema": weights}


def per_sample_bytes(model: nn.Module, clipping: str | None, images: int, draws: int) -> dict[str, int]:
    """What clipping mode `clipping` (None: no DP) holds at least for `images` per physical
    batch of `draws` rows each, by part: hooks and functorch a gradient of every trained
    weight per row and the clipped sum."""
    return {} if clipping is None else clipping_mode(clipping).minimum_bytes(model, images, draws)


def available_bytes(device: torch.device) -> int | None:
    """Memory free for this process on `device`: the GPU's free memory, or the system's
    `MemAvailable` (None where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory_fits(
    model: nn.Module,
    clipping: str | None,
    physical_batch_size: int,
    draws: int,
    device: torch.device,
    optimizer_target: str,
    shards: int = 1,
) -> None:
    """Raise `DoesNotFit` when the training's lower bound exceeds the memory free on `device`.
    The module is built and on the CPU: there its weights and EMA copy are already held.
    Under FSDP each of `shards` ranks holds its share of the weights, EMA, gradients and
    optimizer state."""
    available = available_bytes(device)
    if available is None:
        return
    state = training_state_bytes(model, OPTIMIZER_STATE.get(optimizer_target, 0))
    state = {key: n // shards for key, n in state.items()}
    if device.type != "cuda":
        state = {key: n for key, n in state.items() if key not in ("weights", "ema")}
    extra = per_sample_bytes(model, clipping, physical_batch_size, draws)
    needed = sum(state.values()) + sum(extra.values())
    if needed <= available:
        return
    parts = ", ".join(f"{LABELS.get(name, name)} {size(n)}" for name, n in {**extra, **state}.items() if n)
    fixes = (
        "use privacy.clipping=bookkeeping (no per-sample gradients), a smaller data.physical_batch_size, "
        "or fewer trained weights (model.finetune)"
        if extra
        else "train fewer weights (model.finetune), or use a device with more memory"
    )
    mode = f"privacy.clipping={clipping} at data.physical_batch_size={physical_batch_size}" if clipping else "training"
    raise DoesNotFit(
        f"{mode} needs at least {size(needed)} more on {device.type} ({parts}) but {size(available)} is free: {fixes}"
    )
