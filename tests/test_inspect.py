"""`python -m dpdit.inspect`: counts that add up, the paper's size table, Opacus' clipping
paths and the per-sample-gradient memory checked against Opacus itself, the pretrained
model's embedders and finetune choices, the written report and the refused settings."""

import json
import re

import pytest
import torch
from hydra.utils import instantiate
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn

from dpdit.cli import ConfigError
from dpdit.inspect import (
    build_model,
    clipping_layers,
    duplicated_embedders,
    finetune_choices,
    inspect_model,
    opacus_layers,
    paper_model_config,
    paper_sizes,
    run_inspection,
    trace,
)
from dpdit.models import PretrainedDiT
from dpdit.models.finetune import PRETRAINED_RULES
from dpdit.privacy.clipping import FUNCTORCH, GHOST_NORM, HOOK, OWN_GRADIENT, clipping_path
from dpdit.randomness import NOISE_WORKSPACE_BYTES
from helpers import FAST, Scale, compose_config


@pytest.fixture
def make_inspect_config(tmp_path):
    """Compose the real inspect config with the suite's tiny-model overrides."""

    def make(*overrides: str, fast: bool = True):
        base = [*(FAST if fast else []), f"paths.output_dir={tmp_path / 'inspect'}", "inspect.paper_sizes=false"]
        return compose_config("inspect", *base, *overrides)

    return make


def numel(parameters):
    return sum(p.numel() for p in parameters)


def test_counts_add_up(make_inspect_config):
    cfg = make_inspect_config("model.depth=3", "model.learn_sigma=true")
    report = inspect_model(cfg)
    model = instantiate(cfg.model)
    total = numel(model.parameters())
    assert report["parameters"] == {"total": total, "trainable": total}
    assert sum(row["parameters"] for row in report["by_type"]) == total
    assert {row["type"] for row in report["by_type"]} == {"Linear", "Embedding"}
    assert [row["component"] for row in report["by_component"]] == [
        "x_embedder",
        "t_embedder",
        "y_embedder",
        "blocks",
        "final_layer",
    ]
    assert sum(row["parameters"] for row in report["by_component"]) == total

    block = report["block"]
    assert block["blocks"] == 3 and block["parameters"] == numel(model.blocks[0].parameters())
    assert sum(layer["parameters"] for layer in block["layers"]) == block["parameters"]
    roles = {row["role"]: row["parameters"] for row in block["roles"]}
    assert roles == {
        "attention": numel(model.blocks[0].attn.parameters()),
        "MLP": numel(model.blocks[0].mlp.parameters()),
        "adaLN-Zero modulation": numel(model.blocks[0].adaLN_modulation.parameters()),
    }

    # every trainable parameter is in exactly one clipping row; blocks collapse into one row each
    rows = {row["name"]: row for row in report["clipping"]}
    assert sum(row["parameters"] * row["layers"] for row in rows.values()) == total
    assert rows["blocks.*.attn.qkv"]["layers"] == 3 and rows["final_layer.linear"]["layers"] == 1
    assert rows["blocks.*.attn.qkv"]["input_shape"] == [16, 32]  # 8x8 digits, patch 2: 16 tokens
    assert rows["blocks.*.adaLN_modulation.1"]["input_shape"] == [32]
    assert report["opacus_validator"]["ok"]
    assert report["model"]["gflops_per_image"] > 0


def test_paper_size_table_matches_the_published_numbers():
    rows = paper_sizes()
    xl_2 = build_model(paper_model_config("dit_xl_2"))
    assert (xl_2.in_channels, xl_2.input_size, xl_2.out_channels, xl_2.num_classes) == (4, 32, 8, 1000)
    # The official DiT-XL/2 counts 675,129,632 parameters, of which its frozen position
    # embedding (a buffer here) holds 256 x 1152.
    assert rows[9]["model"] == "DiT-XL/2" and rows[9]["parameters"] == 675_129_632 - 256 * 1152
    assert [row["model"] for row in rows] == [f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]
    for row in rows:
        assert row["parameters"] == pytest.approx(row["published_parameters"], rel=0.01), row["model"]
        assert row["gflops"] == pytest.approx(row["published_gflops"], rel=0.02), row["model"]


def test_every_dit_layer_takes_the_expected_path_in_every_mode(make_inspect_config):
    report = inspect_model(make_inspect_config())
    opacus_paths = {"hooks": HOOK, "ghost": GHOST_NORM, "functorch": FUNCTORCH}
    for row in report["clipping"]:
        assert {mode: row["paths"][mode] for mode in opacus_paths} == opacus_paths, row["name"]
        # book-keeping forms the per-image gradient where two 16 x 16 Gram matrices hold more
        # values than the weight (the patch embedding's 4 x 32, the final layer's 32 x 4)
        small = row["name"] in ("x_embedder.proj", "final_layer.linear")
        assert row["paths"]["bookkeeping"] == (OWN_GRADIENT if small else GHOST_NORM), row["name"]
        assert row["problems"] == [], row["name"]


def ghost_backward(model, x):
    """One ghost-clipping backward pass through Opacus, as dpdit's privacy runs it."""
    settings = {"max_grad_norm": 1.0, "loss_reduction": "mean"}
    hooks = prepare_module(model, "ghost", wrap_model=False, batch_first=True, use_ghost_clipping=True, **settings)
    optimizer_class = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode="ghost")
    optimizer = optimizer_class(
        torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, expected_batch_size=x.shape[0], **settings
    )
    DPTensorFastGradientClipping(hooks, optimizer, model(x).flatten(1).pow(2).mean(1), "mean").backward()


@pytest.mark.parametrize("dims", [3, 4])
def test_layers_without_a_sampler_and_linears_ghost_cannot_take(dims):
    model = nn.Sequential(nn.Linear(4, 4), Scale(4))
    x = torch.randn(3, *[2] * (dims - 2), 4)
    layers = opacus_layers(model)
    calls, _ = trace(model, layers, (x[:1],))
    linear, scale = clipping_layers(layers, calls)
    assert scale.paths == {"hooks": FUNCTORCH, "ghost": FUNCTORCH, "functorch": FUNCTORCH, "bookkeeping": FUNCTORCH}
    # book-keeping's own Linear rule takes any input: 2 (3-D) or 4 (4-D) tokens per image,
    # and the per-image gradient once two T x T Gram matrices outweigh the 4 x 4 weight
    bookkeeping = GHOST_NORM if dims == 3 else OWN_GRADIENT
    assert linear.paths == {"hooks": HOOK, "ghost": GHOST_NORM, "functorch": FUNCTORCH, "bookkeeping": bookkeeping}
    assert linear.input_shape == [2] * (dims - 2) + [4]
    if dims == 3:
        assert linear.problems == []
        ghost_backward(model, x)
    else:
        assert len(linear.problems) == 1 and "4-D input" in linear.problems[0]
        with pytest.raises(AttributeError, match="_norm_sample"):
            ghost_backward(model, x)


class Reused(nn.Module):
    """One Linear called twice (shared weights), another never called."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.used(self.used(x))


def test_reused_and_unused_layers_are_flagged():
    model = Reused()
    layers = opacus_layers(model)
    used, unused = clipping_layers(layers, trace(model, layers, (torch.randn(1, 4),))[0])
    assert used.calls == 2 and "ghost clipping refuses parameter reuse" in used.problems[0]
    assert unused.calls == 0 and unused.input_shape is None and "not called" in unused.problems[0]
    with pytest.raises(NotImplementedError, match="Parameter tying"):
        ghost_backward(model, torch.randn(3, 4))


@pytest.mark.parametrize("draws", [1, 3])
def test_hooks_memory_is_what_opacus_holds(make_inspect_config, draws):
    batch = 5
    cfg = make_inspect_config(f"inspect.batch_size={batch}", f"privacy.noise_multiplicity={draws}")
    memory = inspect_model(cfg)["memory"]
    model = instantiate(cfg.model)
    prepare_module(model, "hooks", wrap_model=False, batch_first=True, loss_reduction="mean")
    rows = batch * draws
    x = torch.randn(rows, model.in_channels, model.input_size, model.input_size)
    t, y = torch.randint(0, 1000, (rows,)), torch.randint(0, model.num_classes, (rows,))
    model(x, t, y).pow(2).flatten(1).mean(1).mean().backward()
    held = sum(p.grad_sample.numel() * p.grad_sample.element_size() for p in model.parameters())
    assert memory["batch_size"] == batch and memory["noise_multiplicity"] == draws
    assert memory["per_sample_gradient_bytes"] == held
    # the optimizer's clipped sum beside them, and the noise's workspace
    clipped_sum = sum(p.numel() * p.element_size() for p in model.parameters())
    assert memory["bytes"]["hooks"] == memory["bytes"]["functorch"] == held + clipped_sum + NOISE_WORKSPACE_BYTES
    # one norm per image and parameter tensor, whatever the draws
    assert memory["ghost_norm_bytes"] == batch * len(list(model.parameters())) * 4
    if draws == 1:
        # at its largest, a token Linear's g g^T, a a^T and bias g g^T over the 16 tokens of
        # an 8x8 image in 2x2 patches
        ghost_peak = 3 * 16**2 * 4
    else:
        # over 3 x 16 tokens, two Gram matrices (2 x 48^2 values) outweigh mlp.fc1's 32 x 128
        # weight, so its per-image gradient (weight and bias), the largest, is formed instead
        ghost_peak = (32 * 128 + 128) * 4
        assert memory["ghost_peak_layer"].endswith("mlp.fc1")
    assert memory["bytes"]["ghost"] == memory["ghost_norm_bytes"] + batch * ghost_peak + NOISE_WORKSPACE_BYTES
    assert memory["ghost_norm_bytes"] + batch * ghost_peak < held
    assert memory["bytes"]["vanilla"] == 0


def pretrained_overrides(hub, *extra):
    return [
        "model=pretrained",
        f"model.name_or_path={hub}",
        f"model.vae_name_or_path={hub}",
        "data=fake",
        "data.image_size=16",
        "data.num_classes=3",
        *extra,
    ]


def trainable(model):
    return numel(p for p in model.parameters() if p.requires_grad)


def test_pretrained_embedders_and_finetune_choices(make_inspect_config, tiny_pipeline):
    cfg = make_inspect_config(*pretrained_overrides(tiny_pipeline, "model.finetune=attention"), fast=False)
    report = inspect_model(cfg)
    model = PretrainedDiT.from_pretrained(str(tiny_pipeline), num_classes=3)
    blocks = model.transformer.transformer_blocks
    embedders = report["pretrained"]["embedders"]
    assert embedders["copies"] == len(blocks) == report["block"]["blocks"] == 2
    assert embedders["parameters_per_copy"] == numel(blocks[0].norm1.emb.parameters())
    assert embedders["parameters"] == sum(numel(block.norm1.emb.parameters()) for block in blocks)
    assert not embedders["identical"] and embedders["max_abs_difference"] > 0

    finetune = {row["finetune"]: row for row in report["pretrained"]["finetune"]}
    assert list(finetune) == list(PRETRAINED_RULES.choices) and finetune["attention"]["configured"]
    for choice in PRETRAINED_RULES.choices:
        built = PretrainedDiT.from_pretrained(str(tiny_pipeline), num_classes=3, finetune=choice)
        assert finetune[choice]["trainable"] == trainable(built), choice
    assert report["parameters"]["trainable"] == finetune["attention"]["trainable"] < report["parameters"]["total"]

    # frozen layers have no clipping path; with labels=fresh the class tables always train
    blocks_prefix = "transformer.transformer_blocks.*."
    trained = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "norm1.emb.class_embedder.embedding_table"]
    assert sorted(row["name"] for row in report["clipping"]) == sorted(blocks_prefix + name for name in trained)
    # no norm sampler for the patch embedding's Conv2d: ghost computes its per-sample gradient
    assert clipping_path(model.transformer.pos_embed.proj, "ghost") == HOOK


def test_identical_embedder_copies_are_recognised_and_finetune_is_restored(tiny_pipeline):
    model = PretrainedDiT.from_pretrained(str(tiny_pipeline), num_classes=3, finetune="attention")
    blocks = model.transformer.transformer_blocks
    blocks[1].norm1.emb.load_state_dict(blocks[0].norm1.emb.state_dict())
    assert duplicated_embedders(model)["identical"]
    before = {name for name, p in model.named_parameters() if p.requires_grad}
    finetune_choices(model)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == before


def test_entry_writes_the_report(make_inspect_config, tmp_path):
    cfg = make_inspect_config()
    text = run_inspection(cfg)
    written = json.loads((tmp_path / "inspect" / "inspect.json").read_text())
    assert (tmp_path / "inspect" / "inspect.txt").read_text() == text
    total = numel(instantiate(cfg.model).parameters())
    assert written["parameters"]["total"] == total and f"parameters: {total:,}" in text
    assert written["memory"]["batch_size"] == cfg.data.physical_batch_size
    assert re.search(r"\nblocks\.\*\.attn\.qkv +x2 +Linear", text) and "paper_sizes" not in written


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.image_size=9", "not divisible by patch size 2: choose data.image_size divisible by model.patch_size"),
        ("inspect.batch_size=0", "inspect.batch_size=0 must be"),
        ("privacy.noise_multiplicity=0", "privacy.noise_multiplicity=0 must be a whole number >= 1"),
    ],
)
def test_bad_settings_fail_with_the_setting_named(make_inspect_config, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run_inspection(make_inspect_config(override))
    assert not (tmp_path / "inspect").exists()
