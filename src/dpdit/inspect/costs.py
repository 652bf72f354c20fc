"""Each trainable layer's clipping path in every mode, and the memory each mode adds: read
from the clipping modes' registry, so a new mode shows here once it is registered."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from dpdit.privacy import CLIPPING, VANILLA
from dpdit.privacy.clipping import Call, TracedLayer
from dpdit.randomness import NOISE_WORKSPACE_BYTES


def traced_layers(layers: list[tuple[str, nn.Module]], calls: dict[str, Call], draws: int = 1) -> list[TracedLayer]:
    """The layers a clipping mode clips, with what one traced image saw of each."""
    result = []
    for name, module in layers:
        trainable = [p for p in module.parameters() if p.requires_grad]
        result.append(
            TracedLayer(
                name=name,
                module=module,
                call=calls.get(name),
                parameters=sum(p.numel() for p in trainable),
                tensors=len(trainable),
                value_bytes=max(p.element_size() for p in trainable),
                draws=draws,
            )
        )
    return result


@dataclass
class Layer:
    """A row of the clipping table: one layer (or functorch subtree) and its path and
    problems in every clipping mode."""

    name: str
    type: str
    parameters: int
    tensors: int
    value_bytes: int
    input_shape: list[int] | None
    calls: int
    paths: dict[str, str]
    problems: list[str]


def layer_row(layer: TracedLayer) -> Layer:
    call = layer.call
    problems = (
        []
        if call
        else ["not called by the forward pass: Opacus finds no per-sample gradient for it in any mode; freeze it"]
    )
    return Layer(
        name=layer.name,
        type=type(layer.module).__name__,
        parameters=layer.parameters,
        tensors=layer.tensors,
        value_bytes=layer.value_bytes,
        input_shape=call.input_shape[1:] if call else None,
        calls=call.count if call else 0,
        paths={name: mode.path(layer.module, layer.tokens) for name, mode in CLIPPING.items()},
        problems=problems + [problem for mode in CLIPPING.values() for problem in mode.layer_problems(layer)],
    )


def clipping_layers(layers: list[tuple[str, nn.Module]], calls: dict[str, Call], draws: int = 1) -> list[Layer]:
    return [layer_row(layer) for layer in traced_layers(layers, calls, draws)]


def collapse_blocks(layers: list[Layer], blocks_prefix: str) -> list[dict[str, Any]]:
    """One row per layer pattern: `blocks.*.attn.qkv  x28` stands for the same layer in
    every block (rows split where blocks differ in anything but their index)."""
    index = re.compile(rf"^{re.escape(blocks_prefix)}\.\d+(?=\.|$)")
    rows: dict[str, dict[str, Any]] = {}
    for layer in layers:
        row = asdict(layer)
        row["name"] = index.sub(f"{blocks_prefix}.*", layer.name)
        key = json.dumps(row, sort_keys=True)
        if key in rows:
            rows[key]["layers"] += 1
        else:
            rows[key] = {**row, "layers": 1}
    return list(rows.values())


def per_sample_memory(model: nn.Module, layers: list[TracedLayer], batch_size: int, draws: int) -> dict[str, Any]:
    """Bytes each mode holds beyond non-private training at `batch_size` images of `draws`
    rows each, as each mode counts them, with the parts each names. Every DP mode draws its
    noise in place, one chunk at a time."""
    by_mode = {VANILLA: {"bytes": 0}}
    by_mode.update({name: mode.memory(model, layers, batch_size, draws) for name, mode in CLIPPING.items()})
    parts = {key: value for memory in by_mode.values() for key, value in memory.items() if key != "bytes"}
    return {
        "batch_size": batch_size,
        "noise_multiplicity": draws,
        "bytes": {
            mode: memory["bytes"] + (NOISE_WORKSPACE_BYTES if mode != VANILLA else 0)
            for mode, memory in by_mode.items()
        },
        **parts,
        "noise_workspace_bytes": NOISE_WORKSPACE_BYTES,
    }
