"""Every GPU experiment file composes and trains: 2 steps of its own model, loss, privacy and
sampler on fake data of its image shape (public stages at test size)."""

from pathlib import Path

import pytest
from PIL import Image
from test_prior import PUBLIC_OVERRIDES

from dpdit.train import train

# Fake data of the experiment's shape, few images, 2 steps, 2 noise draws per image; the model and
# the other settings are the experiment's.
SMALL = [
    "privacy.noise_multiplicity=2",
    "data.dataset=fake",
    "++data.size=64",
    "data.batch_size=32",
    "data.physical_batch_size=4",
    "trainer.max_steps=2",
    "trainer.enable_progress_bar=false",
    "sample.num_per_class=1",
    "sample.steps=2",
]


def public_stage(*extra: str, sized: bool = True) -> str:
    """The public stage at test size (`sized`: its data has a size setting, unlike an image folder)."""
    overrides = [o for o in PUBLIC_OVERRIDES if sized or not o.startswith("data.size=")]
    return "prior.overrides=[" + ",".join(f'"{o}"' for o in [*overrides, *extra]) + "]"


def image_folder(root, classes: int = 10, per_class: int = 4):
    for label in range(classes):
        (root / str(label)).mkdir(parents=True)
        for index in range(per_class):
            Image.new("RGB", (32, 32), (25 * label, 10 * index, 128)).save(root / str(label) / f"{index}.png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["dpdm_mnist", "dpdm_mnist_eps1", "dpdm_cifar10", "dpdm_cifar10_eps1"])
def test_a_from_scratch_experiment_trains(experiment, make_config):
    result = train(make_config(f"experiment={experiment}", *SMALL, fast=False))
    assert result["steps"] == 2 and result["epsilon"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["dpdm_mnist_font_prior", "dpdm_mnist_font_prior_eps1", "mnist_cpu"])
def test_a_font_prior_experiment_trains_its_public_stage_then_fine_tunes(experiment, make_config):
    # fake data in place of MNIST: the prior is allowed for it here
    result = train(
        make_config(
            f"experiment={experiment}",
            "data.root=unused",
            *SMALL,
            public_stage(),
            "prior.datasets=[mnist,fake]",
            fast=False,
        )
    )
    assert result["steps"] == 2 and result["init_checkpoint"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["dpdm_mnist_font_prior", "mnist_cpu"])
def test_a_font_prior_experiment_trains_from_scratch_with_prior_none(experiment, make_config):
    """prior=none leaves the experiment's public-stage overrides unused: no public stage runs."""
    cfg = make_config(
        f"experiment={experiment}", "prior=none", "model.finetune=full", "data.root=unused", *SMALL, fast=False
    )
    result = train(cfg)
    assert result["steps"] == 2 and result["init_checkpoint"] is None
    assert not (Path(cfg.paths.cache_dir) / "priors").exists()


@pytest.mark.slow
def test_the_public_image_folder_experiment_trains(make_config, tmp_path):
    root = image_folder(tmp_path / "public")
    result = train(
        make_config(
            "experiment=dpdm_cifar10_public_prior",
            f"prior.root={root}",
            *SMALL,
            public_stage(f"data.root={root}", sized=False),
            "prior.datasets=[cifar10,fake]",
            fast=False,
        )
    )
    assert result["steps"] == 2 and result["init_checkpoint"] is not None


@pytest.mark.slow
def test_the_dit_xl_experiment_trains_on_a_pipeline_of_its_layout(make_config, tiny_pipeline, tmp_path):
    result = train(
        make_config(
            "experiment=dpdm_cifar10_dit_xl",
            *SMALL,
            "data.image_size=16",
            f"model.name_or_path={tiny_pipeline}",
            f"model.vae_name_or_path={tiny_pipeline}",
            f"data.latent_cache_dir={tmp_path / 'latents'}",
            fast=False,
        )
    )
    assert result["steps"] == 2
