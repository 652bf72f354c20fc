"""dpdit's own DiT exported as a diffusers DiTPipeline: the exported transformer computes
what the DiT computes, the pipeline samples what dpdit samples, pixel-space folders load
without a VAE, LoRA adapters are merged, and models without an exact form are refused."""

import copy
import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DiTPipeline, DiTTransformer2DModel
from diffusers.models.embeddings import get_timestep_embedding
from hydra.utils import instantiate
from omegaconf import OmegaConf
from peft import LoraConfig, inject_adapter_in_model

from dpdit.callbacks import ExportPipeline
from dpdit.diffusion import GaussianDiffusion
from dpdit.export import diffusers_transformer, ema_state, export_pipeline, export_run, exportable, plain_state_dict
from dpdit.models import DiT, create_dit
from dpdit.models.pretrained import load_component
from dpdit.train import train

CLASSES = ["zero", "one", "two"]
NULL = len(CLASSES)


def tiny_dit(channels=1, size=8, learn_sigma=False, **kwargs):
    """A 2-block DiT with every weight moved off its initial value: adaLN-Zero starts many
    at zero, which would hide a wrongly mapped weight."""
    settings = {
        "patch_size": 2,
        "hidden_size": 32,
        "depth": 2,
        "num_heads": 2,
        "num_classes": NULL,
        "timestep_convention": "diffusers",
        **kwargs,
    }
    torch.manual_seed(0)
    model = DiT(input_size=size, in_channels=channels, learn_sigma=learn_sigma, **settings)
    return perturbed(model)


@torch.no_grad()
def perturbed(model):
    for parameter in model.parameters():
        parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def inputs(model, dtype=torch.float64):
    """A batch with conditional and null labels, and the labels' DiTPipeline class ids."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, model.in_channels, model.input_size, model.input_size, generator=generator, dtype=dtype)
    t = torch.tensor([0, 10, 500, 999, 3, 250])
    null = model.null_class
    labels = torch.tensor([0, 1, 2, null, 1, null])
    return x, t, labels, torch.where(labels == null, 1000, labels)


@pytest.mark.parametrize(
    "channels, size, learn_sigma",
    [(1, 8, False), (1, 8, True), (3, 16, False), (3, 16, True), (4, 8, True)],
    ids=["gray", "gray-sigma", "rgb", "rgb-sigma", "latent-sigma"],
)
def test_exported_transformer_computes_the_dit_forward(channels, size, learn_sigma):
    model = tiny_dit(channels, size, learn_sigma).double()
    transformer = diffusers_transformer(model)
    assert transformer.dtype == torch.float64 and transformer.out_channels == model.out_channels
    torch.testing.assert_close(transformer.pos_embed.pos_embed, model.pos_embed.double())
    x, t, labels, ids = inputs(model)
    with torch.no_grad():
        ours = model(x, t, labels)
        theirs = transformer(x, t, ids).sample
        # the class ids no data class has are the null class
        unused = transformer(x, t, torch.full_like(ids, 500)).sample
    assert ours.shape == (6, model.out_channels, size, size)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-9)
    torch.testing.assert_close(unused, model(x, t, torch.full_like(labels, NULL)), rtol=0, atol=1e-9)


def test_latent_dit_pipeline_samples_what_dpdit_samples(tiny_pipeline, tmp_path):
    # the tiny pipeline's VAE: 16x16 RGB images <-> 8x8x4 latents
    torch.manual_seed(0)
    model = create_dit(
        in_channels=3,
        image_size=16,
        vae_name_or_path=str(tiny_pipeline),
        patch_size=2,
        hidden_size=32,
        depth=2,
        num_heads=2,
        num_classes=NULL,
        learn_sigma=True,
        timestep_convention="diffusers",
    )
    perturbed(model)
    diffusion = GaussianDiffusion()
    pipeline = DiTPipeline.from_pretrained(export_pipeline(model, diffusion, tmp_path / "pipeline", CLASSES))
    assert sorted(path.name for path in (tmp_path / "pipeline").iterdir()) == [
        "model_index.json",
        "scheduler",
        "transformer",
        "vae",
    ]
    assert pipeline.get_label_ids(["two", "zero"]) == [2, 0]
    assert pipeline.scheduler.config.clip_sample is False

    settings = {"guidance_scale": 3.0, "num_inference_steps": 4}
    images = pipeline([2, 0], generator=torch.Generator().manual_seed(0), output_type="pt", **settings).images
    latents = diffusion.sample(
        model,
        torch.tensor([2, 0]),
        settings["guidance_scale"],
        settings["num_inference_steps"],
        "ddim",
        torch.Generator().manual_seed(0),
        progress=False,
    )
    torch.testing.assert_close(images, (model.vae.decode(latents) + 1) / 2, rtol=0, atol=1e-5)


def test_pixel_dit_exports_without_a_vae(tmp_path):
    model = tiny_dit(channels=1, size=8)
    diffusion = GaussianDiffusion(beta_end=0.005)
    directory = export_pipeline(model, diffusion, tmp_path / "pipeline", CLASSES)
    assert sorted(path.name for path in directory.iterdir()) == ["model_index.json", "scheduler", "transformer"]
    assert json.loads((directory / "model_index.json").read_text())["vae"] == [None, None]

    # DiTPipeline has no optional components: a missing VAE must be named
    pipeline = DiTPipeline.from_pretrained(directory, vae=None)
    assert pipeline.vae is None and pipeline.get_label_ids(["one"]) == [1]
    assert pipeline.scheduler.config.clip_sample is True  # as dpdit samples pixels

    # sampling with the pipeline's transformer and scheduler (the export module's recipe)
    labels, guidance, steps = torch.tensor([2, 0, 1]), 2.0, 4
    expected = diffusion.sample(
        model, labels, guidance, steps, "ddim", torch.Generator().manual_seed(0), progress=False
    )
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    pipeline.scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in pipeline.scheduler.timesteps:
            eps = pipeline.transformer(
                torch.cat([x, x]), t.expand(6), torch.cat([labels, torch.full_like(labels, 1000)])
            ).sample
            cond, uncond = eps.chunk(2)
            x = pipeline.scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)


def test_pixel_pipeline_loads_as_a_pretrained_model(tmp_path):
    model = tiny_dit(channels=1, size=8, learn_sigma=True)
    directory = export_pipeline(model, GaussianDiffusion(), tmp_path / "pipeline", CLASSES)
    transformer = load_component(DiTTransformer2DModel, str(directory), "transformer", "model.name_or_path")
    # model=pretrained model.name_or_path=<dir> model.vae_name_or_path=null, classes kept
    pretrained = create_dit(
        pretrained=True,
        name_or_path=str(directory),
        vae_name_or_path=None,
        in_channels=1,
        image_size=8,
        num_classes=NULL,
        labels="imagenet",
        class_ids=[0, 1, 2],
    ).eval()
    x, t, labels, ids = inputs(model, torch.float32)
    with torch.no_grad():
        expected = model(x, t, labels)
        torch.testing.assert_close(transformer(x, t, ids).sample, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(pretrained(x, t, labels), expected, rtol=0, atol=1e-5)


def lora_dit():
    model = tiny_dit(channels=1, size=8)
    adapted = copy.deepcopy(model)
    config = LoraConfig(r=2, target_modules=["qkv", "proj", "fc1", "fc2"], init_lora_weights=False)
    return model, inject_adapter_in_model(config, adapted)


def test_plain_state_dict_merges_lora_adapters():
    model, adapted = lora_dit()
    assert plain_state_dict(model).keys() == model.state_dict().keys()
    base_before = adapted.blocks[0].attn.qkv.base_layer.weight.clone()
    plain_weights = plain_state_dict(adapted)
    assert plain_weights.keys() == model.state_dict().keys()
    # computed beside the model: its base weights and adapters stay as they were
    torch.testing.assert_close(adapted.blocks[0].attn.qkv.base_layer.weight, base_before, rtol=0, atol=0)
    plain = copy.deepcopy(model)
    plain.load_state_dict(plain_weights)
    x, t, labels, ids = inputs(model, torch.float32)
    with torch.no_grad():
        expected = adapted(x, t, labels)
        assert not torch.allclose(expected, model(x, t, labels), atol=1e-3)  # the adapters matter
        torch.testing.assert_close(plain(x, t, labels), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(diffusers_transformer(adapted)(x, t, ids).sample, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "settings, messages",
    [
        ({"mlp_ratio": 2.0}, ["model.mlp_ratio=2 ", "model.mlp_ratio=4.0"]),
        ({"timestep_convention": "dit"}, ["model.timestep_convention=dit ", "model.timestep_convention=diffusers"]),
        ({"num_classes": 1001}, ["model.num_classes=1001"]),
    ],
)
def test_models_without_an_exact_pipeline_form_are_refused(settings, messages, tmp_path):
    model = tiny_dit(**settings)
    assert not exportable(model)
    with pytest.raises(ValueError) as error:
        export_pipeline(model, GaussianDiffusion(), tmp_path / "pipeline", CLASSES)
    assert all(message in str(error.value) for message in messages)
    assert not (tmp_path / "pipeline").exists()


def test_export_callback_skips_an_unexportable_model_with_one_info_line(tmp_path, caplog):
    model = tiny_dit(mlp_ratio=2.0)
    trainer = SimpleNamespace(is_global_zero=True, datamodule=SimpleNamespace(class_names=CLASSES))
    module = SimpleNamespace(sampling_model=lambda: model, diffusion=GaussianDiffusion())
    with caplog.at_level(logging.INFO, logger="dpdit.callbacks"):
        ExportPipeline(str(tmp_path)).on_train_end(trainer, module)
    assert not (tmp_path / "pipeline").exists()
    [record] = [record for record in caplog.records if record.name == "dpdit.callbacks"]
    assert record.levelno == logging.INFO and "model.mlp_ratio=2" in record.getMessage()


def test_timestep_convention_must_be_known():
    with pytest.raises(ValueError, match="model.timestep_convention='ddpm' is unknown: choose dit .* or diffusers"):
        DiT(
            input_size=8, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3, timestep_convention="ddpm"
        )


@pytest.mark.parametrize("convention", [None, "dit", "diffusers"])
def test_timestep_conventions_match_their_references(convention):
    settings = {} if convention is None else {"timestep_convention": convention}
    embedder = DiT(
        input_size=8, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3, **settings
    ).t_embedder
    t = torch.tensor([0, 1, 37, 999])
    ours = embedder.timestep_embedding(t, 256, frequency_shift=embedder.frequency_shift)
    if convention == "diffusers":
        expected = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    else:  # the official DiT's, also for configs saved before the setting existed
        args = t[:, None] * torch.exp(-math.log(10000) * torch.arange(128) / 128)
        expected = torch.cat([args.cos(), args.sin()], dim=1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_custom_dit_run_exports_its_ema_and_export_command_rebuilds_it(make_config, tmp_path):
    cfg = make_config()
    train(cfg)
    run = tmp_path / "run"
    model = instantiate(cfg.model)
    model.load_state_dict(ema_state(run / "checkpoints" / "last.ckpt"))
    x, t, labels, ids = inputs(model.eval(), torch.float32)

    def assert_computes_the_ema(directory):
        pipeline = DiTPipeline.from_pretrained(directory, vae=None)
        assert pipeline.get_label_ids(["0", "9"]) == [0, 9]
        with torch.no_grad():
            torch.testing.assert_close(pipeline.transformer(x, t, ids).sample, model(x, t, labels), rtol=0, atol=1e-5)

    assert_computes_the_ema(run / "pipeline")
    # Hydra writes the run's config; the test composes it, so write it the same way
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    assert_computes_the_ema(export_run(run, output=tmp_path / "exported"))
