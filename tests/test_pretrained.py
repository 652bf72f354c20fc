"""The pretrained path on tiny random diffusers models saved to disk: loading, Opacus
compatibility checked by numbers, what to train, labels, the latent cache and the export."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiTPipeline
from omegaconf import OmegaConf

from dpdit.build import setup
from dpdit.cli import ConfigError
from dpdit.data import build_dataset
from dpdit.export import ema_state, export_run
from dpdit.export import main as export_main
from dpdit.models import FrozenVAE, PretrainedDiT
from dpdit.models.pretrained import load_vae
from dpdit.sample import run_sampling
from dpdit.train import train
from helpers import BATCH, EpsilonLoss, dp, latent_batch, norm, pretrained, run_step, save_tiny_pipeline


def test_forward_is_diffusers_forward(tiny_pipeline):
    model = pretrained(tiny_pipeline).double().eval()
    x, y = latent_batch()
    t = torch.tensor([0, 10, 500, 999, 3, 250])
    imagenet_ids = torch.tensor([3, 7, 1, 1000, 7, 3])
    with torch.no_grad():
        ours = model(x, t, y)
        theirs = model.transformer(x, t, imagenet_ids).sample
    assert ours.shape == (BATCH, 8, 8, 8)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def file_mappings() -> list[tuple[int, int, str]]:
    """(start, end, file) of this process's memory mapped from files (Linux)."""
    mappings = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith("/"):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            mappings.append((start, end, fields[5]))
    return mappings


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux' /proc")
def test_loaded_weights_are_process_memory_not_a_mapped_file(tiny_pipeline):
    # diffusers maps safetensors files: their pages look reclaimable and turn into process
    # memory only when training writes them
    model = PretrainedDiT.from_pretrained(str(tiny_pipeline), num_classes=3)
    vae = load_vae(str(tiny_pipeline)).autoencoder
    mapped = [m for m in file_mappings() if m[2].endswith(".safetensors")]
    for tensor in [*model.parameters(), *model.buffers(), *vae.parameters()]:
        address = tensor.data_ptr()
        assert not any(start <= address < end for start, end, _ in mapped)


def test_labels_map_onto_class_table_rows(tiny_pipeline):
    x, _ = latent_batch()
    t = torch.full((BATCH,), 100)
    fresh = pretrained(tiny_pipeline, labels="fresh", class_ids=None).double().eval()
    none = pretrained(tiny_pipeline, labels="none", class_ids=None).double().eval()
    with torch.no_grad():
        null = fresh.transformer(x, t, torch.full((BATCH,), 1000)).sample
        # fresh classes start as the unconditional model, at rows 0..2 (DiTPipeline's ids)
        torch.testing.assert_close(fresh(x, t, torch.tensor([0, 1, 2, 0, 1, 2])), null)
        torch.testing.assert_close(none(x, t, torch.tensor([0, 1, 2, 0, 1, 2])), null)
    assert fresh.pipeline_class_ids() == [0, 1, 2] and fresh.null_class == 3
    assert pretrained(tiny_pipeline).pipeline_class_ids() == [3, 7, 1]
    assert none.num_classes == 1


def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_finetune_chooses_the_trained_parameters(tiny_pipeline):
    full = pretrained(tiny_pipeline)
    attention = pretrained(tiny_pipeline, finetune="attention")
    frozen = pretrained(tiny_pipeline, finetune="frozen_embedders")
    assert trainable(full) == {name for name, _ in full.named_parameters()}
    assert attention_names(attention) == trainable(attention) and len(trainable(attention)) == 2 * 4 * 2
    assert not any(".norm1.emb." in name for name in trainable(frozen))
    assert trainable(frozen) == trainable(full) - {n for n in trainable(full) if ".norm1.emb." in n}
    # fresh classes must learn their rows, whatever else is frozen
    fresh = pretrained(tiny_pipeline, finetune="attention", labels="fresh", class_ids=None)
    assert trainable(fresh) == trainable(attention) | {
        f"transformer.transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight" for i in range(2)
    }


def attention_names(model):
    return {
        name
        for name, _ in model.named_parameters()
        if any(f".attn1.{layer}." in name for layer in ("to_q", "to_k", "to_v", "to_out.0"))
    }


@pytest.mark.parametrize("clipping", ["hooks", "ghost", "bookkeeping"])
@pytest.mark.parametrize("finetune", ["full", "attention", "frozen_embedders"])
def test_per_sample_gradients_match_micro_batching(tiny_pipeline, clipping, finetune):
    base = pretrained(tiny_pipeline, finetune=finetune).double()
    x, y = latent_batch()
    names = [name for name, _ in base.named_parameters()]
    per_sample = []
    for i in range(BATCH):
        reference = copy.deepcopy(base)
        EpsilonLoss().training_losses(reference, x[i : i + 1], y[i : i + 1]).sum().backward()
        per_sample.append([p.grad if p.grad is not None else torch.zeros_like(p) for p in reference.parameters()])
    norms = torch.stack([norm(g) for g in per_sample])
    bound = float(norms.median())
    assert (norms > bound).any() and (norms < bound).any()
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    expected = [sum(f * g[k] for f, g in zip(factors, per_sample)) / BATCH for k in range(len(names))]

    _, update = run_step(
        dp(clipping, max_grad_norm=bound), 4, loss=EpsilonLoss(), data=(x, y), model=copy.deepcopy(base)
    )
    for name, got, want in zip(names, update, expected):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10, msg=name)
    frozen = [u for (name, p), u in zip(base.named_parameters(), update) if not p.requires_grad]
    assert all((u == 0).all() for u in frozen) and (finetune == "full") == (not frozen)


def run_overrides(hub, cache, *extra):
    return [
        "model=pretrained",
        f"model.name_or_path={hub}",
        f"model.vae_name_or_path={hub}",
        "data=fake",
        "data.size=24",
        "data.image_size=16",
        "data.num_classes=3",
        "data.batch_size=8",
        "data.physical_batch_size=4",
        f"data.latent_cache_dir={cache}",
        "trainer.max_steps=2",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "logger=csv",
        "sample.num_per_class=2",
        "sample.steps=2",
        *extra,
    ]


@pytest.mark.parametrize("clipping", ["hooks", "ghost", "bookkeeping"])
def test_train_fine_tunes_and_exports_a_dit_pipeline(make_config, tiny_pipeline, tmp_path, clipping):
    extra = [f"privacy.clipping={clipping}", "model.finetune=attention", "privacy.noise_multiplicity=2"]
    report = train(make_config(*run_overrides(tiny_pipeline, tmp_path / "latents", *extra), fast=False))
    run = tmp_path / "run"
    assert report["steps"] == 2 and report["clipping"] == clipping and report["noise_multiplicity"] == 2
    written = json.loads((run / "privacy_report.json").read_text())
    assert 0 < written["trainable_parameters"] < written["total_parameters"]
    samples = np.load(run / "samples.npz")
    assert samples["images"].shape == (6, 3, 16, 16) and samples["images"].dtype == np.uint8

    pipeline = DiTPipeline.from_pretrained(run / "pipeline")
    assert pipeline.get_label_ids(["0", "2"]) == [0, 2]
    generator = torch.Generator().manual_seed(0)
    images = pipeline(
        class_labels=[0, 2], guidance_scale=4.0, num_inference_steps=2, generator=generator, output_type="np"
    ).images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    # the pipeline holds the EMA weights of the checkpoint
    ema = ema_state(run / "checkpoints" / "last.ckpt")
    for name, tensor in pipeline.transformer.state_dict().items():
        torch.testing.assert_close(tensor, ema[f"transformer.{name}"])

    # the sampling command rebuilds the fine-tuned model from the checkpoint alone
    sampled = run_sampling(
        make_config(
            f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
            "sample.num_images=3",
            "sample.steps=2",
            name="sampled",
            config_name="sample",
        )
    )
    assert sampled["images"].shape == (3, 3, 16, 16) and sampled["labels"].tolist() == [0, 1, 2]


@pytest.mark.slow
def test_latent_cache_is_written_once_and_reused(make_config, tiny_pipeline, tmp_path, monkeypatch):
    cache = tmp_path / "latents"
    train(make_config(*run_overrides(tiny_pipeline, cache), name="first", fast=False))
    assert len(list(cache.glob("*.pt"))) == 1

    def no_encoder(self, images):
        raise AssertionError("the VAE encoder ran although the cache holds the latents")

    monkeypatch.setattr(FrozenVAE, "encode", no_encoder)
    train(make_config(*run_overrides(tiny_pipeline, cache), name="second", fast=False))
    monkeypatch.undo()

    other_vae = save_tiny_pipeline(tmp_path / "other", seed=1)
    setup(
        make_config(
            *run_overrides(tiny_pipeline, cache, f"model.vae_name_or_path={other_vae}"), name="third", fast=False
        )
    )
    assert len(list(cache.glob("*.pt"))) == 2
    _, _, datamodule = setup(
        make_config(*run_overrides(tiny_pipeline, cache, "data.hflip=true"), name="fourth", fast=False)
    )
    assert len(list(cache.glob("*.pt"))) == 3
    # both flips are encoded: view 1 is the latent of the mirrored image
    dataset = datamodule.train_dataset
    assert dataset.latents.shape == (24, 2, 4, 8, 8)
    image, _ = build_dataset("fake", None, 16, 3, 3, size=24)[5]
    vae = datamodule.vae
    torch.testing.assert_close(dataset.latents[5, 1], vae.encode(image.flip(-1)[None])[0])
    torch.testing.assert_close(dataset.latents[5, 0], vae.encode(image[None])[0])


def test_export_from_a_checkpoint(make_config, tiny_pipeline, tmp_path):
    cfg = make_config(*run_overrides(tiny_pipeline, tmp_path / "latents", "model.labels=none"), fast=False)
    train(cfg)
    run = tmp_path / "run"
    # Hydra writes the run's config; the test composes it, so write it the same way
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    exported = export_run(run, output=tmp_path / "exported")
    pipeline = DiTPipeline.from_pretrained(exported)
    images = pipeline(class_labels=[1000], guidance_scale=1.0, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3)
    with pytest.raises(SystemExit, match="not empty"):
        export_main([str(run), "--output", str(exported)])
    with pytest.raises(SystemExit, match="last.ckpt not found: pass the directory of a training run"):
        export_main([str(tmp_path)])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.vae_name_or_path=null"], "set model.vae_name_or_path"),
        (["data.image_size=32"], "set data.image_size=16"),
        (["model.labels=imagenet"], "model.class_ids"),
        (["model.finetune=bitfit"], "model.finetune='bitfit' is unknown"),
        (["data.channels=1"], "data.channels=1"),
        (["model.name_or_path=/no/such/dir"], "is not a directory"),
        (
            ["model.name_or_path=facebook/DiT-XL-2-256", "model.local_files_only=true"],
            "hf download facebook/DiT-XL-2-256",
        ),
    ],
)
def test_clear_errors_before_training(make_config, tiny_pipeline, tmp_path, overrides, message):
    cfg = make_config(
        *run_overrides(tiny_pipeline, tmp_path / "latents", f"model.cache_dir={tmp_path / 'hub'}", *overrides),
        fast=False,
    )
    with pytest.raises(ConfigError, match=message):
        setup(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_image_folder_latents_follow_the_files(make_config, tiny_pipeline, tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    for index, name in enumerate(["benign", "malignant", "normal"] * 3):
        (root / name).mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(index).integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name / f"{index}.png")
    overrides = [
        o for o in run_overrides(tiny_pipeline, "unused") if not o.startswith(("data.latent_cache_dir", "data.size"))
    ]
    overrides = [*overrides, "data=imagefolder", f"data.root={root}", "data.hflip=false"]
    _, _, datamodule = setup(make_config(*overrides, name="a", fast=False))
    assert datamodule.class_names == ["benign", "malignant", "normal"]
    assert datamodule.dataset_size == 9
    cache = tmp_path / "images.latents"  # beside the data, not inside its class folders
    assert len(list(cache.glob("*.pt"))) == 1
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(root / "normal" / "2.png")
    setup(make_config(*overrides, name="b", fast=False))
    assert len(list(cache.glob("*.pt"))) == 2
