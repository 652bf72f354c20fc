"""What `model.finetune` trains, for dpdit's DiT and for a pretrained diffusers DiT.

DP-SGD bounds each image's gradient by C whatever the number of trained weights d, but adds
noise N(0, sigma^2 C^2) to each of them: the noise grows as sqrt(d) against a fixed signal.
Training fewer weights is therefore what DP rewards (and per-sample gradients need less
memory). The choices:

- `full`: every weight;
- `attention`: the attention projections of every block (q, k, v and output);
- `adaln`: the adaLN-Zero modulation of every block and of the output layer, the layers
  that turn timestep and class into shifts, scales and gates;
- `lora`: low-rank adapters (LoRA, Hu et al. 2022) beside the attention and MLP projections,
  every base weight frozen; W x becomes W x + (alpha / rank) B A x with B started at zero,
  so the model starts as it was;
- `frozen_embedders` (diffusers' DiT only): all but the per-block timestep and class embedders.

Beside the chosen layers the class table trains (dpdit's DiT always, diffusers' DiT with
`labels=fresh`): moving the class conditioning is what fine-tuning onto new classes needs.

A LoRA model's weights are named like the plain model's with `.base_layer` inserted
(`blocks.0.attn.qkv.base_layer.weight`) beside the adapters (`...qkv.lora_A.default.weight`);
`weights_for` maps a plain model's weights onto those names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

# How peft names what it adds: the wrapped layer, and the adapters' weights.
BASE_LAYER = ".base_layer"
ADAPTER = re.compile(r"\.lora_[A-Za-z_]+\.")


@dataclass(frozen=True)
class FinetuneRules:
    """Where each choice's layers are in one kind of model: regular expressions matching
    whole module names (as `named_modules()` gives them); a rule covers the named modules
    and every weight under them."""

    choices: tuple[str, ...]
    attention: str
    adaln: str
    # the Linears that get LoRA adapters
    lora: str
    class_tables: str
    # frozen by `frozen_embedders` (None: the model has no such choice)
    embedders: str | None = None


DIT_RULES = FinetuneRules(
    choices=("full", "attention", "adaln", "lora"),
    attention=r"blocks\.\d+\.attn\.(qkv|proj)",
    adaln=r"(blocks\.\d+|final_layer)\.adaLN_modulation\.1",
    lora=r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))",
    class_tables=r"y_embedder\.embedding_table",
)

_BLOCK = r"transformer\.transformer_blocks\.\d+\."
PRETRAINED_RULES = FinetuneRules(
    choices=("full", "attention", "adaln", "lora", "frozen_embedders"),
    attention=_BLOCK + r"attn1\.(to_q|to_k|to_v|to_out\.0)",
    adaln=r"transformer\.(transformer_blocks\.\d+\.norm1\.linear|proj_out_1)",
    lora=_BLOCK + r"(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))",
    class_tables=_BLOCK + r"norm1\.emb\.class_embedder\.embedding_table",
    embedders=_BLOCK + r"norm1\.emb",
)


def is_adapter(name: str) -> bool:
    return ADAPTER.search(name) is not None


def plain_name(name: str) -> str:
    """A LoRA model's base weight named as in the plain model."""
    return name.replace(BASE_LAYER, "")


def under(rule: str, parameter_name: str) -> bool:
    """Whether a weight lies in a module that `rule` names (or below one)."""
    module = plain_name(parameter_name).rpartition(".")[0]
    return any(re.fullmatch(rule, prefix) for prefix in _prefixes(module))


def _prefixes(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts) + 1)]


def check_choice(rules: FinetuneRules, finetune: str, lora_rank: int) -> None:
    if finetune not in rules.choices:
        raise ValueError(f"model.finetune={finetune!r} is unknown: choose one of {', '.join(rules.choices)}")
    if finetune == "lora" and (not isinstance(lora_rank, int) or lora_rank < 1):
        raise ValueError(f"model.lora_rank={lora_rank} must be a whole number >= 1 (the adapters' rank, e.g. 4)")


def trains(rules: FinetuneRules, finetune: str, name: str, train_class_tables: bool) -> bool:
    """Whether `finetune` trains the weight called `name` (plain or LoRA naming)."""
    if train_class_tables and under(rules.class_tables, name):
        return True
    if finetune == "lora":
        return is_adapter(name)
    if finetune == "full":
        return True
    if finetune == "frozen_embedders":
        return not under(rules.embedders, name)
    return under(getattr(rules, finetune), name)


def apply_finetune(
    model: nn.Module,
    rules: FinetuneRules,
    finetune: str,
    lora_rank: int = 4,
    lora_alpha: float | None = None,
    train_class_tables: bool = True,
) -> None:
    """Make `model` train what `finetune` chooses: inject LoRA adapters for `lora`, then set
    `requires_grad` of every weight. `lora_alpha` None: the rank (a scale of 1)."""
    check_choice(rules, finetune, lora_rank)
    if finetune == "lora":
        inject_lora(model, rules.lora, lora_rank, lora_rank if lora_alpha is None else lora_alpha)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trains(rules, finetune, name, train_class_tables))
    model.finetune, model.lora_rank = finetune, lora_rank


def inject_lora(model: nn.Module, targets: str, rank: int, alpha: float) -> None:
    """Wrap every Linear named by `targets` in a peft LoRA layer, in place: the model keeps
    its class and attributes.

    The adapters are made at once on their base layer's device (not on the meta device for
    later materialisation): Opacus' hooks and the DP optimizer, made when training starts,
    must hold the very parameter objects the forward pass uses (see
    `dpdit.privacy.check_parameters_held`).
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    inject_adapter_in_model(config, model, low_cpu_mem_usage=False)


def lora_targets(model: nn.Module, rules: FinetuneRules) -> list[nn.Module]:
    """The layers `lora` adapts: plain Linears, or the LoRA layers wrapping them."""
    return [module for name, module in model.named_modules() if re.fullmatch(rules.lora, name)]


def trained_weight_count(
    model: nn.Module, rules: FinetuneRules, finetune: str, lora_rank: int, train_class_tables: bool
) -> int:
    """How many weights `finetune` would train in `model`, without changing the model."""
    base = sum(
        p.numel()
        for name, p in model.named_parameters()
        if not is_adapter(name) and trains(rules, finetune, name, train_class_tables)
    )
    if finetune != "lora":
        return base
    return base + sum(lora_rank * (layer.in_features + layer.out_features) for layer in lora_targets(model, rules))


def weights_for(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` (a state dict of `model`, or of its plain form) named as `model` names them.

    A plain model's weights go into a LoRA model's base layers and its adapters keep their
    current values: B is zero, so the LoRA model computes what the plain one did. Weights
    with adapters need a model with adapters (of the same rank)."""
    own = model.state_dict()
    model_has_adapters = any(is_adapter(name) for name in own)
    weights_have_adapters = any(is_adapter(name) for name in weights)
    if weights_have_adapters and not model_has_adapters:
        raise ValueError(
            "the weights hold LoRA adapters and this model has none: set model.finetune=lora and "
            "model.lora_rank as in the run that wrote them"
        )
    if weights_have_adapters or not model_has_adapters:
        return weights
    lora_name = {plain_name(name): name for name in own if not is_adapter(name)}
    mapped = {lora_name.get(name, name): value for name, value in weights.items()}
    return {**mapped, **{name: value for name, value in own.items() if is_adapter(name)}}
