"""Parameter counts: by type, component and block part; the pretrained DiT's per-block
embedders and fine-tuning choices; the paper's size table."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from omegaconf import DictConfig
from torch import nn

from dpdit.cli import compose_config
from dpdit.inspect.tracing import build_model, example_inputs, trace
from dpdit.models import PretrainedDiT
from dpdit.models.finetune import PRETRAINED_RULES, trained_weight_count
from dpdit.privacy import check_model_is_private

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
            rows.append(
                {"component": name, "parameters": count(params), "trainable": trainable, "share": count(params) / total}
            )
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
    """`model=<name>` composed with the paper's data and learned sigma."""
    data = [f"data.{key}={value}" for key, value in PAPER_DATA.items()]
    return compose_config("train", ["prior=none", f"model={name}", "model.learn_sigma=true", *data]).model


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
