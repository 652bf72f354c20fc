"""Building the inspected model and tracing one forward pass of one image."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from opacus.grad_sample import GradSampleHooks
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dpdit.cli import ConfigError, settings_checked
from dpdit.privacy import check_dp_node, check_noise_multiplicity
from dpdit.privacy.clipping import Call


def check_settings(cfg: DictConfig) -> None:
    """Refuse, before any work, settings the inspection cannot use."""
    batch_size = cfg.inspect.batch_size
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(
            f"inspect.batch_size={batch_size} must be a whole number of at least 1: the physical "
            "batch (images per backward pass) the memory estimate is for"
        )
    with settings_checked():
        check_dp_node(cfg.privacy, "python -m dpdit.inspect")
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
