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
import math
import re
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from opacus.grad_sample import GradSampleHooks
from opacus.grad_sample.linear import compute_linear_norm_sample
from opacus.grad_sample.utils import get_hooks_class
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dpdit.cli import ConfigError, command, settings_checked
from dpdit.memory import per_sample_bytes, size, training_state_bytes
from dpdit.models import PretrainedDiT
from dpdit.models.finetune import PRETRAINED_RULES, trained_weight_count
from dpdit.privacy import CLIPPING_MODES, check_model_is_private, check_noise_multiplicity
from dpdit.privacy.per_sample import GHOST_NORM, clipping_path, gram_matrices_outweigh_gradient
from dpdit.profile import VANILLA
from dpdit.randomness import NOISE_WORKSPACE_BYTES

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# A block's parts by the names of its submodules: dpdit's DiT, then diffusers' DiT.
BLOCK_EMBEDDERS = "norm1.emb"
BLOCK_ROLES = {
    "attention": ("attn", "attn1"),
    "MLP": ("mlp", "ff"),
    "adaLN-Zero modulation": ("adaLN_modulation", "norm1.linear"),
    "embedders": (BLOCK_EMBEDDERS,),
}

# Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023 (arXiv:2212.09748):
# parameters of each model size, and forward Gflops per 256x256 image (32x32x4 latents) for
# patch sizes 2, 4 and 8.
PUBLISHED = {
    "S": (33e6, {2: 6.06, 4: 1.41, 8: 0.36}),
    "B": (130e6, {2: 23.01, 4: 5.56, 8: 1.42}),
    "L": (458e6, {2: 80.71, 4: 19.70, 8: 5.01}),
    "XL": (675e6, {2: 118.64, 4: 29.05, 8: 7.39}),
}
# The paper's setting: ImageNet at 256 px as VAE latents, with the learned variance.
PAPER_DATA = {"image_size": 32, "channels": 4, "num_classes": 1000}


#################################################################################
#                       Building and tracing the model                         #
#################################################################################


def check_settings(cfg: DictConfig) -> None:
    """Refuse, before any work, settings the inspection cannot use."""
    batch_size = cfg.inspect.batch_size
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(
            f"inspect.batch_size={batch_size} must be a whole number of at least 1: the physical "
            "batch (images per backward pass) the memory estimate is for"
        )
    with settings_checked():
        check_noise_multiplicity(cfg.privacy.noise_multiplicity)


def build_model(model_config: DictConfig) -> nn.Module:
    """dpdit's DiT on the meta device; a pretrained model loaded as training loads it."""
    with settings_checked():
        if model_config.get("pretrained", False):
            return instantiate(model_config)
        with torch.device("meta"):
            return instantiate(model_config)


def opacus_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules Opacus hooks, found by Opacus' own walk: every module with trainable
    parameters of its own; below one it has no hook sampler for, functorch takes the whole
    subtree. (An instance made without __init__ lends the walk without attaching hooks.)"""
    names = {module: name for name, module in model.named_modules()}
    walker = GradSampleHooks.__new__(GradSampleHooks)
    return [(names[module] or "(model)", module) for module in walker.iterate_submodules(model)]


@dataclass
class Call:
    """What one traced forward pass of one image saw of a layer."""

    input_shape: list[int]
    output_shape: list[int]
    count: int = 1


def first_tensor(values) -> torch.Tensor:
    return values if isinstance(values, torch.Tensor) else next(v for v in values if isinstance(v, torch.Tensor))


def example_inputs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image (or latent) of the model's input shape, a timestep and a label, on the
    model's device (meta for dpdit's DiT: shapes only)."""
    device = next(model.parameters()).device
    x = torch.zeros(1, model.in_channels, model.input_size, model.input_size, device=device)
    return x, torch.zeros(1, device=device), torch.zeros(1, dtype=torch.long, device=device)


def trace(
    model: nn.Module, layers: list[tuple[str, nn.Module]], inputs: tuple[torch.Tensor, ...]
) -> tuple[dict[str, Call], float]:
    """One forward pass of `inputs` (one image): each layer's input and output shapes and how
    often it ran, and the forward Gflops in the paper's convention (a multiply-add counts once)."""
    calls: dict[str, Call] = {}

    def record(name):
        def hook(module, inputs, output):
            if name in calls:
                calls[name].count += 1
            else:
                calls[name] = Call(list(first_tensor(inputs).shape), list(first_tensor(output).shape))

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in layers]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as flops:
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls, flops.get_total_flops() / 2 / 1e9


#################################################################################
#                               Parameter counts                               #
#################################################################################


def count(parameters) -> int:
    return sum(p.numel() for p in parameters)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    return {"total": count(model.parameters()), "trainable": count(p for p in model.parameters() if p.requires_grad)}


def by_type(model: nn.Module) -> list[dict[str, Any]]:
    """Each module type's own parameters (not its children's), largest first."""
    totals: dict[str, int] = defaultdict(int)
    for module in model.modules():
        totals[type(module).__name__] += count(module.parameters(recurse=False))
    total = count(model.parameters())
    rows = [{"type": name, "parameters": n, "share": n / total} for name, n in totals.items() if n]
    return sorted(rows, key=lambda row: -row["parameters"])


def backbone(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The module whose children are the model's components, and its list of blocks."""
    if isinstance(model, PretrainedDiT):
        return model.transformer, model.transformer.transformer_blocks
    return model, model.blocks


def by_component(model: nn.Module) -> list[dict[str, Any]]:
    """Parameters of each top-level component, in the order of the forward pass."""
    root, _ = backbone(model)
    total = count(model.parameters())
    parts = [("(own)", list(root.parameters(recurse=False)))]
    parts += [(name, list(child.parameters())) for name, child in root.named_children()]
    rows = []
    for name, params in parts:
        if params:
            trainable = count(p for p in params if p.requires_grad)
            rows.append({"component": name, "parameters": count(params), "trainable": trainable, "share": count(params) / total})
    return rows


def role_of(name: str) -> str:
    for role, prefixes in BLOCK_ROLES.items():
        if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes):
            return role
    return "other"


def block_parts(model: nn.Module) -> dict[str, Any]:
    """Block 0's parameterised submodules and their subtotals by role (all blocks are alike)."""
    _, blocks = backbone(model)
    block = blocks[0]
    total = count(block.parameters())
    layers = [
        {"name": name, "type": type(module).__name__, "parameters": own, "role": role_of(name)}
        for name, module in block.named_modules()
        if (own := count(module.parameters(recurse=False)))
    ]
    roles: dict[str, int] = defaultdict(int)
    for layer in layers:
        roles[layer["role"]] += layer["parameters"]
    return {
        "blocks": len(blocks),
        "parameters": total,
        "all_blocks": total * len(blocks),
        "layers": layers,
        "roles": [{"role": role, "parameters": n, "share": n / total} for role, n in roles.items()],
    }


def opacus_verdict(model: nn.Module, clipping: str) -> dict[str, Any]:
    try:
        check_model_is_private(model, clipping)
    except ValueError as error:
        return {"ok": False, "errors": str(error)}
    return {"ok": True, "errors": None}


#################################################################################
#                      Clipping paths and per-sample memory                    #
#################################################################################


def layer_problems(module: nn.Module, call: Call | None, ghost_path: str) -> list[str]:
    """Why Opacus would fail on this layer: in every mode, or with privacy.clipping=ghost."""
    if call is None:
        return ["not called by the forward pass: Opacus finds no per-sample gradient for it in any mode; freeze it"]
    problems = []
    if ghost_path == GHOST_NORM and call.count > 1:
        problems.append(
            f"called {call.count} times per forward pass: ghost clipping refuses parameter reuse, "
            "so privacy.clipping=ghost fails here; use hooks or functorch"
        )
    sampler = get_hooks_class("ghost").NORM_SAMPLERS.get(type(module))
    if sampler is compute_linear_norm_sample and len(call.input_shape) >= 4:
        problems.append(
            f"{len(call.input_shape)}-D input: Opacus' Linear norm sampler takes 2-D or 3-D inputs only, "
            "so privacy.clipping=ghost fails here; use hooks or functorch"
        )
    return problems


def ghost_bytes_per_image(
    module: nn.Module, call: Call | None, path: str, parameters: int, value_bytes: int, draws: int
) -> int:
    """The transient memory ghost clipping needs for this layer per image, freed after its norm,
    with `draws` rows per image (privacy.noise_multiplicity).

    A Linear's norm sampler forms g g^T and a a^T over the T tokens of each image (T^2 values
    each) for the weight and another g g^T for the bias; with a 2-D input T is 1. With K draws
    an image's rows are one sequence of K T tokens, unless forming the per-image gradient is
    smaller, which the training then does. Other norm samplers (the embedding's) sum the
    output gradient per row they touched, at most its size. A layer without a norm sampler
    holds its full per-row gradients.
    """
    if call is None:
        return 0
    if path != GHOST_NORM:
        return draws * parameters * value_bytes
    if get_hooks_class("ghost").NORM_SAMPLERS[type(module)] is compute_linear_norm_sample:
        tokens = draws * math.prod(call.input_shape[1:-1])
        if draws > 1 and gram_matrices_outweigh_gradient(module, tokens):
            return parameters * value_bytes
        matrices = 2 * module.weight.requires_grad + (module.bias is not None and module.bias.requires_grad)
        return matrices * tokens**2 * value_bytes
    return draws * math.prod(call.output_shape[1:]) * value_bytes


def bookkeeping_bytes_per_image(call: Call | None, path: str, parameters: int, value_bytes: int, draws: int) -> int:
    """What book-keeping clipping keeps for this layer per image until its clipped sum: the
    output gradients of the `draws` rows, and the per-image gradient where that is the
    layer's path (its Gram matrices are transient, like ghost clipping's)."""
    if call is None:
        return 0
    gradient = 0 if path == GHOST_NORM else parameters * value_bytes
    return call.count * draws * math.prod(call.output_shape[1:]) * value_bytes + gradient


@dataclass
class Layer:
    """One layer (or functorch subtree) that Opacus gives per-sample gradients or norms."""

    name: str
    type: str
    parameters: int
    tensors: int
    value_bytes: int
    input_shape: list[int] | None
    calls: int
    paths: dict[str, str]
    problems: list[str]
    ghost_bytes_per_image: int
    bookkeeping_bytes_per_image: int


def clipping_layers(layers: list[tuple[str, nn.Module]], calls: dict[str, Call], draws: int = 1) -> list[Layer]:
    result = []
    for name, module in layers:
        trainable = [p for p in module.parameters() if p.requires_grad]
        call = calls.get(name)
        tokens = draws * math.prod(call.input_shape[1:-1]) if call else draws
        paths = {mode: clipping_path(module, mode, tokens) for mode in CLIPPING_MODES}
        value_bytes = max(p.element_size() for p in trainable)
        result.append(
            Layer(
                name=name,
                type=type(module).__name__,
                parameters=count(trainable),
                tensors=len(trainable),
                value_bytes=value_bytes,
                input_shape=call.input_shape[1:] if call else None,
                calls=call.count if call else 0,
                paths=paths,
                problems=layer_problems(module, call, paths["ghost"]),
                ghost_bytes_per_image=ghost_bytes_per_image(module, call, paths["ghost"], count(trainable), value_bytes, draws),
                bookkeeping_bytes_per_image=bookkeeping_bytes_per_image(call, paths["bookkeeping"], count(trainable), value_bytes, draws),
            )
        )
    return result


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


def per_sample_memory(model: nn.Module, layers: list[Layer], batch_size: int, draws: int) -> dict[str, Any]:
    """Bytes each mode holds beyond non-private training at `batch_size` images of `draws`
    rows each.

    hooks and functorch keep every layer's per-row gradient until the backward pass ends
    (then the per-image means, which the optimizer clips) and the clipped sum beside the
    gradients; ghost keeps one norm per image and parameter tensor, plus the largest
    per-layer transient, freed after that layer's norm; book-keeping keeps every layer's
    output gradients (and per-image gradients where it forms them) from its one backward
    pass until the clipped sums, which are the gradients themselves. Every DP mode draws
    its noise in place, one chunk at a time.
    """
    per_sample = per_sample_bytes(model, "hooks", batch_size, draws)
    norms = batch_size * sum(layer.tensors * layer.value_bytes for layer in layers)
    peak = max(layers, key=lambda layer: layer.ghost_bytes_per_image)
    by_mode = {
        VANILLA: 0,
        "hooks": sum(per_sample.values()),
        "ghost": norms + batch_size * peak.ghost_bytes_per_image,
        "functorch": sum(per_sample.values()),
        "bookkeeping": norms + batch_size * sum(layer.bookkeeping_bytes_per_image for layer in layers),
    }
    return {
        "batch_size": batch_size,
        "noise_multiplicity": draws,
        "bytes": {mode: n + (NOISE_WORKSPACE_BYTES if mode != VANILLA else 0) for mode, n in by_mode.items()},
        "per_sample_gradient_bytes": per_sample["per-sample gradients"],
        "clipped_sum_bytes": per_sample["clipped sum"],
        "kept_output_gradient_bytes": batch_size * sum(layer.bookkeeping_bytes_per_image for layer in layers),
        "ghost_norm_bytes": norms,
        "ghost_peak_bytes": batch_size * peak.ghost_bytes_per_image,
        "ghost_peak_layer": peak.name,
        "ghost_peak_layers": sum(layer.ghost_bytes_per_image == peak.ghost_bytes_per_image for layer in layers),
        "noise_workspace_bytes": NOISE_WORKSPACE_BYTES,
    }


#################################################################################
#                               Pretrained models                              #
#################################################################################


def duplicated_embedders(model: PretrainedDiT) -> dict[str, Any]:
    """Every diffusers block has its own timestep and class embedders, converted from the one
    shared embedder of the original DiT: how much they weigh and whether they still agree."""
    _, blocks = backbone(model)
    embedders = [block.get_submodule(BLOCK_EMBEDDERS) for block in blocks]
    per_copy = count(embedders[0].parameters())
    difference = max(
        (
            (a - b).abs().max().item()
            for other in embedders[1:]
            for a, b in zip(embedders[0].parameters(), other.parameters())
        ),
        default=0.0,
    )
    total = count(model.parameters())
    return {
        "copies": len(embedders),
        "parameters_per_copy": per_copy,
        "parameters": per_copy * len(embedders),
        "share": per_copy * len(embedders) / total,
        "max_abs_difference": difference,
        "identical": difference == 0.0,
    }


def finetune_choices(model: PretrainedDiT) -> list[dict[str, Any]]:
    """What each model.finetune choice trains (LoRA at the model's rank), by the selection
    the model itself uses, without changing the model."""
    total = count(model.parameters())
    fresh = model.labels == "fresh"
    rows = []
    for choice in PRETRAINED_RULES.choices:
        trainable = trained_weight_count(model, PRETRAINED_RULES, choice, model.lora_rank, train_class_tables=fresh)
        configured = choice == model.finetune
        rows.append({"finetune": choice, "trainable": trainable, "share": trainable / total, "configured": configured})
    return rows


#################################################################################
#                                Paper sizes                                   #
#################################################################################


def paper_model_config(name: str) -> DictConfig:
    """configs/model/<name>.yaml composed with the paper's data and learned sigma."""
    root = OmegaConf.create({"data": PAPER_DATA, "model": OmegaConf.load(CONFIGS / "model" / f"{name}.yaml")})
    root.model.learn_sigma = True
    return root.model


def paper_sizes() -> list[dict[str, Any]]:
    rows = []
    for model_size, (published_parameters, published_gflops) in PUBLISHED.items():
        for patch, gflops in published_gflops.items():
            name = f"dit_{model_size.lower()}_{patch}"
            model = build_model(paper_model_config(name))
            _, measured = trace(model, [], example_inputs(model))
            rows.append(
                {
                    "model": f"DiT-{model_size}/{patch}",
                    "config": name,
                    "parameters": count(model.parameters()),
                    "published_parameters": published_parameters,
                    "gflops": measured,
                    "published_gflops": gflops,
                }
            )
    return rows


#################################################################################
#                                  The report                                  #
#################################################################################


def inspect_model(cfg: DictConfig) -> dict[str, Any]:
    """Every number of the report for the configured model."""
    check_settings(cfg)
    model = build_model(cfg.model)
    _, blocks = backbone(model)
    names = {module: name for name, module in model.named_modules()}
    layers = opacus_layers(model)
    calls, gflops = trace(model, layers, example_inputs(model))
    draws = cfg.privacy.noise_multiplicity
    clipping = clipping_layers(layers, calls, draws)
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
        "clipping": collapse_blocks(clipping, names[blocks]),
        "memory": {
            **per_sample_memory(model, clipping, cfg.inspect.batch_size, draws),
            "training_state": training_state_bytes(model),
        },
    }
    if isinstance(model, PretrainedDiT):
        report["pretrained"] = {"embedders": duplicated_embedders(model), "finetune": finetune_choices(model)}
    if cfg.inspect.paper_sizes:
        report["paper_sizes"] = paper_sizes()
    return report


def millions(n: float) -> str:
    return f"{n / 1e6:,.2f}M"


def shape(dims: list[int] | None) -> str:
    """A per-image input shape such as 256x1152; a label per image is a scalar."""
    if dims is None:
        return "not called"
    return "x".join(map(str, dims)) or "scalar"


def table(header: list[str], rows: list[list[Any]], align: str) -> list[str]:
    """Text columns; `align` has one '<' (left) or '>' (right) per column."""
    cells = [header, *[[str(cell) for cell in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) if a == "<" else cell.rjust(w) for cell, w, a in zip(row, widths, align)).rstrip()
        for row in cells
    ]


def render(report: dict[str, Any]) -> str:
    """The printed report: every section from the numbers of `report`."""
    lines = [*render_parameters(report), *render_block(report["block"])]
    verdict = report["opacus_validator"]
    lines += [f"Opacus validator: {'ok' if verdict['ok'] else 'ERRORS: ' + verdict['errors']}", ""]
    lines += render_clipping(report["clipping"])
    lines += render_memory(report["memory"])
    if "pretrained" in report:
        lines += render_pretrained(report["pretrained"])
    if "paper_sizes" in report:
        lines += render_paper_sizes(report["paper_sizes"])
    return "\n".join(lines).rstrip() + "\n"


def render_parameters(report: dict[str, Any]) -> list[str]:
    model, parameters = report["model"], report["parameters"]
    channels, height, width = model["input"]
    total, trainable = parameters["total"], parameters["trainable"]
    lines = [
        f"{model['class']} on {channels}x{height}x{width} inputs, patch {model['patch_size']} "
        f"({model['tokens']} tokens), {report['block']['blocks']} blocks: "
        f"{model['gflops_per_image']:.4g} Gflops per image (forward)",
        f"parameters: {total:,} ({millions(total)}), trainable: {trainable:,} ({trainable / total:.1%})",
        "",
        "Parameters by module type (each module's own parameters)",
    ]
    lines += table(
        ["type", "parameters", "share"],
        [[r["type"], f"{r['parameters']:,}", f"{r['share']:.1%}"] for r in report["by_type"]],
        "<>>",
    )
    lines += ["", "Parameters by component"]
    lines += table(
        ["component", "parameters", "trainable", "share"],
        [
            [r["component"], f"{r['parameters']:,}", f"{r['trainable']:,}", f"{r['share']:.1%}"]
            for r in report["by_component"]
        ],
        "<>>>",
    )
    return [*lines, ""]


def render_block(block: dict[str, Any]) -> list[str]:
    lines = [f"One block (of {block['blocks']}): {block['parameters']:,} parameters, {block['all_blocks']:,} in all blocks"]
    lines += table(
        ["layer", "type", "parameters", "role"],
        [[r["name"], r["type"], f"{r['parameters']:,}", r["role"]] for r in block["layers"]],
        "<<><",
    )
    lines += table(
        ["role", "parameters", "share"],
        [[r["role"], f"{r['parameters']:,}", f"{r['share']:.1%}"] for r in block["roles"]],
        "<>>",
    )
    return [*lines, ""]


def render_clipping(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["Clipping path of each trainable layer, per privacy.clipping mode"]
    lines += table(
        ["layer", "", "type", "parameters", "input", *CLIPPING_MODES],
        [
            [r["name"], f"x{r['layers']}", r["type"], f"{r['parameters']:,}", shape(r["input_shape"])]
            + [r["paths"][mode] for mode in CLIPPING_MODES]
            for r in rows
        ],
        "<><><" + "<" * len(CLIPPING_MODES),
    )
    problems = [f"WARNING {r['name']}: {problem}" for r in rows for problem in r["problems"]]
    return [*lines, *problems, ""]


def render_memory(memory: dict[str, Any]) -> list[str]:
    state = memory["training_state"]
    draws = f", {memory['noise_multiplicity']} noise draws per image" if memory["noise_multiplicity"] > 1 else ""
    lines = [f"Memory the DP step adds at physical batch {memory['batch_size']}{draws} (beyond non-private training)"]
    lines += table(["mode", "memory"], [[mode, size(n)] for mode, n in memory["bytes"].items()], "<>")
    lines += [
        f"hooks, functorch: {size(memory['per_sample_gradient_bytes'])} of per-sample gradients and their clipped sum, "
        f"{size(memory['clipped_sum_bytes'])}, beside the gradients",
        f"ghost: {size(memory['ghost_norm_bytes'])} of stored norms plus the largest transient, "
        f"{size(memory['ghost_peak_bytes'])} at {memory['ghost_peak_layer']}"
        + (f" (and {memory['ghost_peak_layers'] - 1} more layers alike)" if memory["ghost_peak_layers"] > 1 else ""),
        f"bookkeeping: {size(memory['kept_output_gradient_bytes'])} of output gradients (and per-image gradients where "
        "formed) kept from its one backward pass until the clipped sums, which are the gradients themselves",
        f"every DP mode: {size(memory['noise_workspace_bytes'])} to draw the noise in place, a chunk at a time; "
        "no other copy of the gradients (gradients are freed after each step, not zeroed)",
        f"for context, in every mode: weights {size(state['weights'])}, gradients {size(state['gradients'])}, "
        f"Adam state {size(state['adam'])}, EMA copy {size(state['ema'])} (activations not included)",
        "",
    ]
    return lines


def render_pretrained(pretrained: dict[str, Any]) -> list[str]:
    embedders = pretrained["embedders"]
    difference = embedders["max_abs_difference"]
    agreement = "identical" if embedders["identical"] else f"differ (max abs difference {difference:.3g})"
    lines = [
        f"Per-block embedders ({BLOCK_EMBEDDERS}): {embedders['copies']} copies of "
        f"{embedders['parameters_per_copy']:,} parameters, {embedders['parameters']:,} in all "
        f"({embedders['share']:.1%} of the model); the copies {agreement}",
        "",
        "What each model.finetune choice trains",
    ]
    lines += table(
        ["finetune", "trainable", "share", ""],
        [
            [r["finetune"], f"{r['trainable']:,}", f"{r['share']:.1%}", "(configured)" if r["configured"] else ""]
            for r in pretrained["finetune"]
        ],
        "<>><",
    )
    return [*lines, ""]


def render_paper_sizes(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["Paper sizes (Peebles & Xie 2023) at 256 px (32x32x4 latents), 1000 classes, learned sigma"]
    lines += table(
        ["model", "config", "parameters", "published", "Gflops", "published"],
        [
            [r["model"], f"model={r['config']}", millions(r["parameters"]), millions(r["published_parameters"])]
            + [f"{r['gflops']:.2f}", f"{r['published_gflops']:.2f}"]
            for r in rows
        ],
        "<<>>>>",
    )
    return [*lines, ""]


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
