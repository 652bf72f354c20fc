"""`model.finetune` for dpdit's DiT and the pretrained diffusers DiT: what each choice trains,
LoRA's per-sample gradients against micro-batching, one DP step through `train()` that moves
every trained weight and no frozen one, and LoRA checkpoints in and out."""

import copy
import json

import lightning as L
import pytest
import torch
from diffusers import DiTTransformer2DModel
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dpdit.checkpoints import initialise_from, weights_under
from dpdit.models import DiT, PretrainedDiT, create_dit
from dpdit.privacy import check_parameters_held
from dpdit.sample import load_checkpoint_model
from dpdit.train import train
from helpers import EpsilonLoss, FixedLoss, batch, dp, latent_batch, norm, run_step

BLOCKS = range(2)
WEIGHT_AND_BIAS = ("weight", "bias")
LORA = tuple(f"lora_{matrix}.default.weight" for matrix in "AB")


def dit(finetune="full", seed=0, **kwargs):
    torch.manual_seed(seed)
    return create_dit(
        in_channels=1,
        image_size=8,
        patch_size=2,
        hidden_size=32,
        depth=2,
        num_heads=2,
        num_classes=3,
        learn_sigma=False,
        finetune=finetune,
        **kwargs,
    )


def pretrained(hub, finetune="full", labels="fresh", **kwargs):
    class_ids = [3, 7, 1] if labels == "imagenet" else None
    return PretrainedDiT.from_pretrained(
        str(hub), num_classes=3, labels=labels, class_ids=class_ids, finetune=finetune, **kwargs
    )


def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def names(prefixes, leaves):
    return {f"{prefix}.{leaf}" for prefix in prefixes for leaf in leaves}


def dit_layers(*layers):
    return [f"blocks.{i}.{layer}" for i in BLOCKS for layer in layers]


def pretrained_layers(*layers):
    return [f"transformer.transformer_blocks.{i}.{layer}" for i in BLOCKS for layer in layers]


DIT_TRAINED = {
    "attention": names(dit_layers("attn.qkv", "attn.proj"), WEIGHT_AND_BIAS),
    "adaln": names([*dit_layers("adaLN_modulation.1"), "final_layer.adaLN_modulation.1"], WEIGHT_AND_BIAS),
    "lora": names(dit_layers("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"), LORA),
}
PRETRAINED_TRAINED = {
    "attention": names(pretrained_layers("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"), WEIGHT_AND_BIAS),
    "adaln": names([*pretrained_layers("norm1.linear"), "transformer.proj_out_1"], WEIGHT_AND_BIAS),
    "lora": names(
        pretrained_layers("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"), LORA
    ),
}
PRETRAINED_CLASS_TABLES = names(pretrained_layers("norm1.emb.class_embedder"), ["embedding_table.weight"])


def test_choices_train_their_layers_and_the_class_table_in_dits_own_model():
    plain = dit()
    assert trainable(plain) == {name for name, _ in plain.named_parameters()}
    for choice, layers in DIT_TRAINED.items():
        model = dit(choice)
        assert trainable(model) == layers | {"y_embedder.embedding_table.weight"}, choice
        assert model.finetune == choice
    lora = dit("lora")
    # LoRA keeps the model's class and attributes; only the adapted layers' names change
    assert type(lora) is DiT and (lora.in_channels, lora.null_class, lora.vae) == (1, 3, None)
    base = {name.replace(".base_layer", "") for name in set(lora.state_dict()) - DIT_TRAINED["lora"]}
    assert base == set(plain.state_dict())


@pytest.mark.parametrize("labels", ["fresh", "imagenet"])
def test_choices_train_their_layers_in_the_pretrained_dit(tiny_pipeline, labels):
    # diffusers' class tables train with labels=fresh only: their new rows must learn
    tables = PRETRAINED_CLASS_TABLES if labels == "fresh" else set()
    full = trainable(pretrained(tiny_pipeline, "full", labels))
    for choice, layers in PRETRAINED_TRAINED.items():
        model = pretrained(tiny_pipeline, choice, labels)
        assert trainable(model) == layers | tables, choice
    frozen = trainable(pretrained(tiny_pipeline, "frozen_embedders", labels))
    assert frozen == {name for name in full if ".norm1.emb." not in name} | tables


@pytest.mark.parametrize(
    "build, choice, message",
    [
        (
            "dit",
            "frozen_embedders",
            "model.finetune='frozen_embedders' is unknown: choose one of full, attention, adaln, lora$",
        ),
        (
            "pretrained",
            "bitfit",
            "model.finetune='bitfit' is unknown: choose one of full, attention, adaln, lora, frozen_embedders$",
        ),
    ],
)
def test_unknown_choice_names_the_setting_and_the_choices(tiny_pipeline, build, choice, message):
    with pytest.raises(ValueError, match=message):
        dit(choice) if build == "dit" else pretrained(tiny_pipeline, choice)
    with pytest.raises(ValueError, match="model.lora_rank=0 must be a whole number >= 1"):
        dit("lora", lora_rank=0) if build == "dit" else pretrained(tiny_pipeline, "lora", lora_rank=0)


def perturbed(model):
    """Every weight moved off its start (adaLN-Zero's zeros, LoRA's zero B) in float64, so
    that every trained weight has a non-zero gradient."""
    model = model.double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("clipping", ["hooks", "ghost", "bookkeeping"])
@pytest.mark.parametrize("build", ["dit", "pretrained"])
def test_lora_per_sample_gradients_match_micro_batching(tiny_pipeline, build, clipping):
    torch.manual_seed(0)
    if build == "dit":
        base, loss, (x, y) = perturbed(dit("lora")), FixedLoss(), batch()
    else:
        base, loss, (x, y) = perturbed(pretrained(tiny_pipeline, "lora")), EpsilonLoss(), latent_batch()
    per_sample = []
    for i in range(x.shape[0]):
        reference = copy.deepcopy(base)
        loss.training_losses(reference, x[i : i + 1], y[i : i + 1]).sum().backward()
        per_sample.append([p.grad if p.grad is not None else torch.zeros_like(p) for p in reference.parameters()])
    norms = torch.stack([norm(g) for g in per_sample])
    bound = float(norms.median())  # half of the images are clipped
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    expected = [sum(f * g[k] for f, g in zip(factors, per_sample)) / x.shape[0] for k in range(len(per_sample[0]))]

    _, update = run_step(dp(clipping, max_grad_norm=bound), 4, loss=loss, data=(x, y), model=copy.deepcopy(base))
    for (name, parameter), got, want in zip(base.named_parameters(), update, expected):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10, msg=name)
        # adapters and class tables learn; base weights stay exactly where they were
        assert (got != 0).any() if parameter.requires_grad else (got == 0).all(), name


def pretrained_run(hub, tmp_path, *extra):
    return [
        "prior=none",
        "model=pretrained",
        f"model.name_or_path={hub}",
        f"model.vae_name_or_path={hub}",
        "data=fake",
        "data.size=16",
        "data.image_size=16",
        "data.num_classes=3",
        "data.batch_size=8",
        "data.physical_batch_size=4",
        f"data.latent_cache_dir={tmp_path / 'latents'}",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "logger=csv",
        "sample.num_per_class=1",
        "sample.steps=2",
        *extra,
    ]


def one_dp_step(make_config, tiny_pipeline, tmp_path, build, choice):
    """One DP step through `train()`; returns the config. The noise (sigma 1, no target)
    moves LoRA's A too, whose gradient is zero while B is."""
    step = [
        "trainer.max_steps=1",
        "privacy.noise_multiplier=1.0",
        "privacy.target_epsilon=null",
        f"model.finetune={choice}",
    ]
    if build == "dit":
        cfg = make_config(*step, "data.batch_size=16", "data.physical_batch_size=8", "sample.num_per_class=1")
    else:
        cfg = make_config(*pretrained_run(tiny_pipeline, tmp_path, *step), fast=False)
    train(cfg)
    return cfg


def initial_model(cfg):
    """The model a run starts from: `train()` seeds, then builds it."""
    L.seed_everything(cfg.seed)
    return instantiate(cfg.model)


@pytest.mark.parametrize("choice", ["attention", "adaln", "lora"])
@pytest.mark.parametrize("build", ["dit", "pretrained"])
def test_one_dp_step_moves_every_trained_weight_and_no_frozen_one(make_config, tiny_pipeline, tmp_path, build, choice):
    cfg = one_dp_step(make_config, tiny_pipeline, tmp_path, build, choice)
    start = initial_model(cfg)
    report = json.loads((tmp_path / "run" / "privacy_report.json").read_text())
    assert report["trainable_parameters"] == sum(p.numel() for p in start.parameters() if p.requires_grad)
    assert report["total_parameters"] == sum(p.numel() for p in start.parameters())
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    for name, before in start.named_parameters():
        after = checkpoint["state_dict"][f"model.{name}"]
        assert (after != before).all() if before.requires_grad else torch.equal(after, before), name
    if choice == "lora":
        check_lora_run_rebuilds_and_exports(tmp_path / "run", build)


def check_lora_run_rebuilds_and_exports(run, build):
    """`dpdit.sample` rebuilds the LoRA model from the checkpoint alone; the exported
    DiTPipeline of a diffusers DiT computes what the LoRA model does, without LoRA layers."""
    path = run / "checkpoints" / "last.ckpt"
    model, _, config = load_checkpoint_model(str(path))
    ema = weights_under(torch.load(path, weights_only=False), "ema.module.")
    assert config.model.finetune == "lora" and any(".lora_B." in name for name in model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ema[name]), name
    if build == "pretrained":
        exported = DiTTransformer2DModel.from_pretrained(run / "pipeline", subfolder="transformer").eval()
        x, t, ids = torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.tensor([0, 1000])
        with torch.no_grad():
            torch.testing.assert_close(exported(x, t, ids).sample, model.eval().transformer(x, t, ids).sample)


def as_checkpoint(model):
    return {"state_dict": {f"ema.module.{name}": tensor for name, tensor in model.state_dict().items()}}


@pytest.mark.parametrize("build", ["dit", "pretrained"])
def test_plain_weights_load_into_a_lora_model_which_computes_the_same(tiny_pipeline, build):
    if build == "dit":
        plain, lora, (x, y) = perturbed(dit(seed=1)), dit("lora", seed=2).double(), batch()
    else:
        plain, lora, (x, y) = (
            perturbed(pretrained(tiny_pipeline)),
            pretrained(tiny_pipeline, "lora").double(),
            latent_batch(),
        )
    t = torch.arange(x.shape[0]) * 100
    initialise_from(lora, as_checkpoint(plain), "plain.ckpt")
    with torch.no_grad():
        # LoRA's B starts at zero: the adapted model is the plain one
        assert torch.equal(lora.eval()(x, t, y), plain.eval()(x, t, y))
    perturbed(lora)
    rebuilt = dit("lora", seed=3).double() if build == "dit" else pretrained(tiny_pipeline, "lora").double()
    initialise_from(rebuilt, as_checkpoint(lora), "lora.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), lora.state_dict().values()))
    with pytest.raises(ValueError, match="init_ckpt_path=lora.ckpt does not fit.*set model.finetune=lora"):
        initialise_from(plain, as_checkpoint(lora), "lora.ckpt")


def test_parameters_held_by_optimizer_and_hooks_are_the_models_after_a_move():
    model = dit("lora")
    trainable_before = [p for p in model.parameters() if p.requires_grad]
    # Module.to keeps the parameter objects (it swaps their data), as a move to a GPU does
    model.to(torch.float64)
    assert all(a is b for a, b in zip(trainable_before, (p for p in model.parameters() if p.requires_grad)))
    privacy = dp("ghost")
    optimizer = privacy.attach(model, torch.optim.SGD(trainable_before, lr=1.0), losses=None, backward=None)
    check_parameters_held(model, optimizer, privacy.clipper)

    # New parameter objects after the optimizer and the hooks were made (opacus#820's trap)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.to(torch.float32)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    with pytest.raises(
        RuntimeError, match=r"the optimizer does not hold the model's trainable parameters \(blocks.0.attn"
    ):
        check_parameters_held(model, optimizer, privacy.clipper)
    remade = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    with pytest.raises(RuntimeError, match="Opacus' ghost clipping hook list does not hold"):
        check_parameters_held(model, remade, privacy.clipper)


def test_a_checkpoint_naming_the_former_model_target_still_rebuilds(make_config, tmp_path):
    """Runs written before `model` went through `create_dit` stored `dpdit.models.DiT`."""
    config = OmegaConf.to_container(make_config(), resolve=True)
    sizes = (
        "patch_size",
        "in_channels",
        "hidden_size",
        "depth",
        "num_heads",
        "mlp_ratio",
        "num_classes",
        "learn_sigma",
    )
    config["model"] = {
        "_target_": "dpdit.models.DiT",
        "input_size": config["model"]["image_size"],
        **{key: config["model"][key] for key in sizes},
    }
    written = instantiate(config["model"])
    path = tmp_path / "former.ckpt"
    torch.save({**as_checkpoint(written), "config": config}, path)
    model, _, _ = load_checkpoint_model(str(path))
    assert type(model) is DiT and all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), written.state_dict().values())
    )
