import copy

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn

from dpdit.cli import CONFIG_DIR, compose_config
from dpdit.export import why_not_exportable
from dpdit.models import DiT, get_2d_sincos_pos_embed, patchify, unpatchify
from dpdit.models.dit import OutputConv

MODEL_CONFIGS = CONFIG_DIR / "model"

# (depth, hidden_size, num_heads, paper parameter count) from Peebles & Xie (2023), Table 1.
PAPER_SIZES = {
    "S": (12, 384, 6, 33e6),
    "B": (12, 768, 12, 130e6),
    "L": (24, 1024, 16, 458e6),
    "XL": (28, 1152, 16, 675e6),
}


def tiny_dit(**overrides) -> DiT:
    kwargs = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=4, num_classes=3)
    kwargs.update(overrides)
    return DiT(**kwargs)


def model_inputs(model: DiT, batch_size: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    shape = (batch_size, model.in_channels, model.input_size, model.input_size)
    x = torch.randn(shape, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (batch_size,), generator=g)
    y = torch.randint(0, model.num_classes + 1, (batch_size,), generator=g)
    return x, t, y


@pytest.mark.parametrize("c,h,w,p", [(1, 8, 8, 1), (3, 8, 12, 2), (4, 16, 16, 4), (1, 12, 8, 4), (3, 16, 16, 1)])
def test_patchify_unpatchify_roundtrip(c, h, w, p):
    x = torch.randn(2, c, h, w)
    tokens = patchify(x, p)
    assert tokens.shape == (2, (h // p) * (w // p), p * p * c)
    assert torch.equal(unpatchify(tokens, p, c, h, w), x)


def test_patchify_order():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    tokens = patchify(x, 2)
    # Second patch (row 0, column 1), flattened (p, p, C): pixel (0, 2) of both channels first.
    assert tokens[0, 1, :2].tolist() == [x[0, 0, 0, 2].item(), x[0, 1, 0, 2].item()]
    assert tokens[0, 2, :2].tolist() == [x[0, 0, 2, 0].item(), x[0, 1, 2, 0].item()]


def test_blocks_are_identity_and_model_outputs_zero_at_init():
    torch.manual_seed(0)
    model = tiny_dit(learn_sigma=True)
    x, c = torch.randn(3, 16, 32), torch.randn(3, 32)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)
    out = model(*model_inputs(model, 3))
    assert out.shape == (3, 2, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))


def test_block_is_not_identity_after_perturbing_adaln():
    torch.manual_seed(0)
    block = tiny_dit().blocks[0]
    x, c = torch.randn(3, 16, 32), torch.randn(3, 32)
    assert torch.equal(block(x, c), x)
    nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    assert not torch.allclose(block(x, c), x)


def mae_2d_sincos_pos_embed(embed_dim, grid_size):
    """Reference: get_2d_sincos_pos_embed from facebookresearch/mae (numpy)."""

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    coords = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(coords, coords))  # grid[0]: column, grid[1]: row
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def test_pos_embed_is_fixed_non_persistent_buffer():
    model = tiny_dit(input_size=16, patch_size=4)
    assert model.pos_embed.shape == (1, 16, 32)
    assert "pos_embed" in dict(model.named_buffers())
    assert "pos_embed" not in dict(model.named_parameters())
    assert not any("pos_embed" in k for k in model.state_dict())
    expected = torch.from_numpy(mae_2d_sincos_pos_embed(32, 4)).float()
    assert torch.allclose(get_2d_sincos_pos_embed(32, 4), expected, atol=1e-6)
    assert torch.equal(model.pos_embed[0], get_2d_sincos_pos_embed(32, 4))


@pytest.mark.parametrize("patch_size", [2, 4, 8])
@pytest.mark.parametrize("size", list(PAPER_SIZES))
def test_paper_parameter_counts(size, patch_size):
    depth, hidden, heads, paper_count = PAPER_SIZES[size]
    with torch.device("meta"):
        model = DiT(
            input_size=32,
            patch_size=patch_size,
            in_channels=4,
            hidden_size=hidden,
            depth=depth,
            num_heads=heads,
            num_classes=1000,
            learn_sigma=True,
        )
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - paper_count) / paper_count < 0.01, f"DiT-{size}/{patch_size}: {n:,} parameters"


@pytest.mark.parametrize("path", sorted(MODEL_CONFIGS.glob("dit_*.yaml")), ids=lambda p: p.stem)
def test_configs_instantiate(path):
    data = {"image_size": 32, "channels": 4, "num_classes": 10}
    cfg = compose_config("train", ["prior=none", f"model={path.stem}", *[f"data.{k}={v}" for k, v in data.items()]])
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert isinstance(model, DiT)
    assert (model.input_size, model.in_channels, model.num_classes) == (32, 4, 10)
    assert model.out_channels == 4 and not model.learn_sigma
    assert model.patch_size == cfg.model.patch_size and len(model.blocks) == cfg.model.depth


def test_config_files_present():
    names = {p.stem for p in MODEL_CONFIGS.glob("dit_*.yaml")}
    expected = {"dit_tiny"} | {f"dit_{s}_{p}" for s in ("s", "b", "l", "xl") for p in (2, 4, 8)}
    assert names == expected


def test_opacus_compatible_layers():
    model = tiny_dit()
    assert ModuleValidator.validate(model, strict=False) == []
    assert GradSampleModule.validate(model, strict=False) == []
    # Every trainable module has both a per-sample-gradient and a ghost-clipping norm sampler.
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert type(module) in (nn.Linear, nn.Embedding), name
            assert type(module) in GradSampleModule.GRAD_SAMPLERS, name
            assert type(module) in GradSampleModuleFastGradientClipping.NORM_SAMPLERS, name


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("size,patch", [(8, 2), (8, 4), (12, 2), (12, 4), (16, 2), (16, 4)])
def test_output_shapes(size, patch, channels, learn_sigma):
    model = tiny_dit(input_size=size, patch_size=patch, in_channels=channels, learn_sigma=learn_sigma, depth=1)
    out = model(*model_inputs(model, 2))
    expected_channels = 2 * channels if learn_sigma else channels
    assert model.out_channels == expected_channels
    assert out.shape == (2, expected_channels, size, size)


def test_forward_deterministic_in_train_mode_and_accepts_float_timesteps():
    torch.manual_seed(0)
    model = tiny_dit()
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    model.train()
    x, t, y = model_inputs(model, 4)
    out = model(x, t, y)
    assert torch.equal(out, model(x, t, y))
    assert torch.allclose(out, model(x, t.float(), y))
    assert torch.isfinite(model(x, torch.rand(4) * 999, y)).all()


def test_null_class_is_last_embedding_row():
    model = tiny_dit(num_classes=5)
    assert model.null_class == 5
    assert model.y_embedder.embedding_table.num_embeddings == 6


@pytest.mark.parametrize(
    "kwargs,setting",
    [
        (dict(input_size=30, patch_size=4), "patch_size"),
        (dict(input_size=10, patch_size=4), "image_size"),
        (dict(hidden_size=30, num_heads=4), "num_heads"),
        (dict(hidden_size=30, num_heads=4), "hidden_size"),
        (dict(hidden_size=30, num_heads=3), "hidden_size"),  # sin-cos embedding needs hidden_size % 4 == 0
        (dict(in_channels=0), "channels"),
    ],
)
def test_bad_settings_raise(kwargs, setting):
    with pytest.raises(ValueError, match=setting):
        tiny_dit(**kwargs)


def test_wrong_input_shape_raises():
    model = tiny_dit()
    with pytest.raises(ValueError, match="image_size"):
        model(torch.randn(2, 1, 16, 16), torch.zeros(2), torch.zeros(2, dtype=torch.long))


# --------------------------------------------------------------------------------------
# Opacus per-sample gradients vs. micro-batching
# --------------------------------------------------------------------------------------


def per_sample_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).flatten(1).sum(1)


@pytest.fixture(scope="module")
def dp_setup():
    torch.manual_seed(0)
    model = tiny_dit(depth=2, hidden_size=32, input_size=8, in_channels=1, num_classes=3).double()
    # Move away from adaLN-Zero so every parameter gets a non-zero gradient.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    model.train()
    batch = 4
    x, t, _ = model_inputs(model, batch, dtype=torch.float64)
    y = torch.tensor([0, 3, 0, 2])  # repeated label and the null class
    target = torch.randn_like(x)

    micro = {}
    for name, p in model.named_parameters():
        micro[name] = torch.zeros(batch, *p.shape, dtype=p.dtype)
    for i in range(batch):
        model.zero_grad()
        s = slice(i, i + 1)
        per_sample_loss(model(x[s], t[s], y[s]), target[s]).sum().backward()
        for name, p in model.named_parameters():
            micro[name][i] = p.grad
    model.zero_grad()
    for name, g in micro.items():
        assert g.abs().sum() > 0, f"{name} has a zero gradient; the comparison would be vacuous"
    return model, (x, t, y, target), micro


def test_opacus_hook_grad_samples_match_microbatching(dp_setup):
    model, (x, t, y, target), micro = dp_setup
    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    per_sample_loss(gsm(x, t, y), target).sum().backward()
    names = set()
    for name, p in gsm._module.named_parameters():
        assert p.grad_sample is not None, name
        torch.testing.assert_close(p.grad_sample, micro[name], rtol=1e-9, atol=1e-10, msg=name)
        names.add(name)
    assert names == set(micro)


def test_opacus_ghost_clipping_norms_match_microbatching(dp_setup):
    model, (x, t, y, target), micro = dp_setup
    gsm = GradSampleModuleFastGradientClipping(
        copy.deepcopy(model), max_grad_norm=1.0, use_ghost_clipping=True, loss_reduction="sum"
    )
    per_sample_loss(gsm(x, t, y), target).sum().backward()
    for name, p in gsm._module.named_parameters():
        expected = micro[name].flatten(1).norm(dim=1)
        torch.testing.assert_close(p._norm_sample, expected, rtol=1e-7, atol=1e-10, msg=name)
    expected_total = torch.stack([g.flatten(1).norm(dim=1) for g in micro.values()]).norm(dim=0)
    torch.testing.assert_close(gsm.get_norm_sample(), expected_total, rtol=1e-7, atol=1e-10)


def test_u_vit_additions_join_mirror_blocks_and_smooth_the_output():
    """Long skips feed block i's output into block depth-1-i; the output convolution starts as
    the identity and, once trained, mixes neighbouring pixels across patch seams."""
    torch.manual_seed(0)
    plain = tiny_dit(depth=4, hidden_size=32, input_size=8, in_channels=1, num_classes=3)
    model = tiny_dit(
        depth=4, hidden_size=32, input_size=8, in_channels=1, num_classes=3, long_skips=True, output_conv=True
    )
    assert len(model.skip_joins) == 2 and model.output_conv is not None
    x, t, y = model_inputs(model, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    joined = []
    hooks = [
        join.register_forward_hook(lambda module, inputs, output: joined.append(inputs[1])) for join in model.skip_joins
    ]
    block_outputs = []
    hooks += [
        block.register_forward_hook(lambda module, inputs, output: block_outputs.append(output))
        for block in model.blocks
    ]
    out = model(x, t, y)
    for hook in hooks:
        hook.remove()
    # block 3 is joined with block 0's output, block 2 with block 1's
    assert torch.equal(joined[0], block_outputs[1]) and torch.equal(joined[1], block_outputs[0])
    # a unit impulse in one pixel spreads to its 3x3 neighbourhood, across the 2x2 patches' seams
    impulse = torch.zeros(1, model.out_channels, 8, 8)
    impulse[0, 0, 3, 3] = 1.0
    with torch.no_grad():
        spread = model.output_conv(impulse) - impulse - model.output_conv.conv.bias.view(1, -1, 1, 1)
    assert (spread[0, :, 2:5, 2:5] != 0).all() and spread[0, :, 5:].abs().sum() == 0
    assert torch.equal(OutputConv(model.out_channels)(impulse), impulse)  # the identity at initialisation
    assert torch.isfinite(out).all()
    assert "model.long_skips=true" in why_not_exportable(model) and "model.output_conv=true" in why_not_exportable(
        model
    )
    assert "long_skips" not in why_not_exportable(plain) and "output_conv" not in why_not_exportable(plain)
