"""`python -m dpdit.inspect`: what a model costs before any GPU is rented.

For the configured model (`model=...`, `data.image_size=...`, `data.channels=...`, as in
training) it answers: how many parameters, of which types, in which components and block
parts; whether Opacus accepts the model; which way Opacus takes to each trainable layer's
per-sample gradient or norm in every clipping mode (and where ghost clipping would fail);
how much memory the per-sample gradients need at the physical batch `inspect.batch_size`
(with `privacy.noise_multiplicity` draws per image) in each mode, next to the weights,
gradients, Adam state and EMA copy; and the forward Gflops per image. For a pretrained
diffusers DiT it also shows the per-block copies of the conditioning embedders and what
each `model.finetune` choice trains. With `inspect.paper_sizes=true` it reproduces the size
table of Peebles & Xie (2023) from the model configs.

dpdit's own DiT is built on the meta device (shapes without storage), so inspecting
DiT-XL/2 costs neither memory nor initialisation time; a pretrained model is loaded. One
traced forward pass of one image records every trainable layer's input shape (the token
counts that ghost clipping's memory depends on) and counts the FLOPs.

Prints the report and writes it to the run directory as `inspect.txt`, and every number
as `inspect.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dpdit.cli import command
from dpdit.inspect.costs import clipping_layers, collapse_blocks, layer_row, per_sample_memory, traced_layers
from dpdit.inspect.counts import (
    backbone,
    block_parts,
    by_component,
    by_type,
    duplicated_embedders,
    finetune_choices,
    opacus_verdict,
    paper_model_config,
    paper_sizes,
    parameter_counts,
)
from dpdit.inspect.render import render
from dpdit.inspect.tracing import build_model, check_settings, example_inputs, opacus_layers, trace
from dpdit.memory import training_state_bytes
from dpdit.models import PretrainedDiT

__all__ = [
    "build_model",
    "clipping_layers",
    "duplicated_embedders",
    "finetune_choices",
    "inspect_model",
    "opacus_layers",
    "paper_model_config",
    "paper_sizes",
    "run_inspection",
    "trace",
]


def inspect_model(cfg: DictConfig) -> dict[str, Any]:
    """Every number of the report for the configured model."""
    check_settings(cfg)
    model = build_model(cfg.model)
    _, blocks = backbone(model)
    names = {module: name for name, module in model.named_modules()}
    layers = opacus_layers(model)
    calls, gflops = trace(model, layers, example_inputs(model))
    draws = cfg.privacy.noise_multiplicity
    traced = traced_layers(layers, calls, draws)
    report = {
        "model": {
            "class": type(model).__name__,
            "input": [model.in_channels, model.input_size, model.input_size],
            "patch_size": model.patch_size,
            "tokens": (model.input_size // model.patch_size) ** 2,
            "gflops_per_image": gflops,
        },
        "parameters": parameter_counts(model),
        "by_type": by_type(model),
        "by_component": by_component(model),
        "block": block_parts(model),
        "opacus_validator": opacus_verdict(model, cfg.privacy.clipping),
        "clipping": collapse_blocks([layer_row(layer) for layer in traced], names[blocks]),
        "memory": {
            **per_sample_memory(model, traced, cfg.inspect.batch_size, draws),
            "training_state": training_state_bytes(model),
        },
    }
    if isinstance(model, PretrainedDiT):
        report["pretrained"] = {"embedders": duplicated_embedders(model), "finetune": finetune_choices(model)}
    if cfg.inspect.paper_sizes:
        report["paper_sizes"] = paper_sizes()
    return report


def run_inspection(cfg: DictConfig) -> str:
    """Inspect, write `inspect.json` and `inspect.txt` to the run directory, return the text."""
    report = inspect_model(cfg)
    text = render(report)
    output = Path(cfg.paths.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "inspect.json").write_text(json.dumps(report, indent=2))
    (output / "inspect.txt").write_text(text)
    return text


@command("inspect")
def main(cfg: DictConfig) -> None:
    text = run_inspection(cfg)
    print(text, end="")


if __name__ == "__main__":
    main()
