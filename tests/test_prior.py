"""The public prior: a cached, non-private public stage that DP fine-tuning starts from."""

import json

import pytest
import torch

from dpdit.checkpoints import weights_under
from dpdit.cli import ConfigError
from dpdit.train import train

# The public stage at test size: 64 font digits, 2 steps.
PUBLIC_OVERRIDES = [
    "data.size=64",
    "data.batch_size=32",
    "data.physical_batch_size=32",
    "trainer.max_steps=2",
    "logger=csv",
    "sample.num_per_class=1",
    "sample.steps=2",
    "trainer.enable_progress_bar=false",
]
PUBLIC = ("prior=font_digits", "prior.overrides=[" + ",".join(f'"{o}"' for o in PUBLIC_OVERRIDES) + "]")
PRIVATE = ("trainer.max_steps=2",)


def prior_folders(tmp_path):
    return sorted(p for p in (tmp_path / "cache" / "priors").iterdir() if p.is_dir())


@pytest.mark.slow
def test_a_new_run_fine_tunes_from_the_public_prior_trained_once(make_config, tmp_path):
    first = train(make_config(*PUBLIC, *PRIVATE, name="first"))
    [folder] = prior_folders(tmp_path)
    record = json.loads((folder / "prior.json").read_text())
    assert record["data"] == "font_digits" and record["steps"] == 2
    # judged on public data only: the public test split, a classifier of the public training split
    quality = record["sample_quality"]
    assert quality["samples"] == 10 and quality["chance"] == 0.1 and 0.0 <= quality["class_consistency"] <= 1.0
    assert quality["reference_classifier"]["train_images"] == 64
    public_report = json.loads((folder / "privacy_report.json").read_text())
    assert public_report["enabled"] is False

    # The report names the public checkpoint and counts none of its steps.
    start = first["init_checkpoint"]
    assert start["path"] == str(folder / "checkpoints" / "last.ckpt")
    assert start["data"] == "disjoint" and start["steps_counted"] == 0
    assert start["public_prior"]["directory"] == str(folder)
    assert first["steps"] == 2 and [entry[2] for entry in first["history"]] == [2]

    # The run started from the prior's EMA weights.
    run_config = torch.load(tmp_path / "first/checkpoints/last.ckpt", weights_only=False)["config"]
    assert run_config["init_ckpt_path"] == start["path"] and run_config["privacy"]["init_data"] == "disjoint"

    # A second run reuses it: the public stage is not trained again.
    stamp = (folder / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    second = train(make_config(*PUBLIC, *PRIVATE, "trainer.enable_model_summary=true", name="second"))
    assert prior_folders(tmp_path) == [folder]
    assert (folder / "checkpoints" / "last.ckpt").stat().st_mtime_ns == stamp
    assert second["init_checkpoint"]["path"] == start["path"]


@pytest.mark.slow
def test_the_prior_is_cached_by_the_settings_that_shape_its_weights(make_config, tmp_path):
    train(make_config(*PUBLIC, *PRIVATE, name="a"))
    # another number of public steps is another prior
    longer = PUBLIC[1].replace("trainer.max_steps=2", "trainer.max_steps=3")
    train(make_config(PUBLIC[0], longer, *PRIVATE, name="b"))
    assert len(prior_folders(tmp_path)) == 2
    # this run's privacy settings do not change the public stage
    train(make_config(*PUBLIC, *PRIVATE, "privacy.target_epsilon=5", name="c"))
    assert len(prior_folders(tmp_path)) == 2


@pytest.mark.slow
def test_an_interrupted_public_stage_is_resumed_not_reused(make_config, tmp_path):
    train(make_config(*PUBLIC, *PRIVATE, name="a"))
    [folder] = prior_folders(tmp_path)
    (folder / "prior.json").unlink()
    before = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)
    train(make_config(*PUBLIC, *PRIVATE, name="b"))
    assert (folder / "prior.json").is_file()
    after = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)
    # resumed at its last step: nothing retrained, the same weights
    assert after["global_step"] == before["global_step"] == 2
    for key, value in weights_under(before, "ema.module.").items():
        assert torch.equal(value, weights_under(after, "ema.module.")[key])


@pytest.mark.slow
def test_training_from_scratch_is_one_override_away(make_config):
    report = train(make_config("prior=none"))
    assert report["init_checkpoint"] is None


@pytest.mark.parametrize(
    "overrides, named",
    [
        (("data=fake",), "prior=none"),
        (("privacy.init_data=same",), "privacy.init_data=disjoint"),
        # this run's own settings, checked before the public stage trains
        (("privacy.max_grad_norm=-1",), "privacy.max_grad_norm"),
        (("data.batch_size=5000",), "data.batch_size"),
    ],
)
def test_a_prior_that_cannot_serve_the_run_is_refused_before_any_training(make_config, tmp_path, overrides, named):
    with pytest.raises(ConfigError, match=named):
        train(make_config(*PUBLIC, *overrides))
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_the_diffusers_path_fine_tunes_the_public_stage_exported_as_a_dit_pipeline(make_config, tmp_path):
    small = (
        "data.batch_size=64",
        "data.physical_batch_size=32",
        "logger=csv",
        "sample.num_per_class=1",
        "sample.steps=2",
        "trainer.enable_progress_bar=false",
    )
    report = train(
        make_config(
            "experiment=digits_pretrained_from_font_prior",
            PUBLIC[1],
            "model.finetune=lora",
            *PRIVATE,
            *small,
            fast=False,
        )
    )
    [folder] = prior_folders(tmp_path)
    assert report["init_checkpoint"]["path"] == str(folder / "pipeline")
    assert (folder / "pipeline" / "transformer" / "config.json").is_file()
    run_config = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=False)["config"]
    assert run_config["model"]["name_or_path"] == str(folder / "pipeline")
    # the run's own export: the fine-tuned diffusers DiT with its LoRA adapters merged
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()


def test_a_prior_whose_samples_are_noise_is_flagged_before_fine_tuning(make_config, tmp_path, caplog):
    """A public stage whose weights never left their initialisation (learning rate 0: as if
    trained for 0 steps) samples noise: prior.json says so and the private run warns before
    it spends any budget."""
    untrained = (
        PUBLIC[1]
        .replace("trainer.max_steps=2", 'trainer.max_steps=2","optimizer.lr=0.0')
        .replace("sample.num_per_class=1", "sample.num_per_class=20")
    )
    with caplog.at_level("WARNING", logger="dpdit.prior"):
        train(make_config(PUBLIC[0], untrained, *PRIVATE))
    [folder] = prior_folders(tmp_path)
    quality = json.loads((folder / "prior.json").read_text())["sample_quality"]
    assert quality["recognisable"] is False and quality["class_consistency"] < 0.2
    assert "not recognisable as their classes" in caplog.text


def test_the_prior_check_recognises_real_digits(make_config, tmp_path):
    """The same check passes images that are what they claim: the public test digits themselves."""
    import numpy as np

    from dpdit.data import build_dataset
    from dpdit.evaluate import dataset_arrays
    from dpdit.prior import public_stage_config, sample_quality

    cfg = make_config(*PUBLIC)
    images, labels = dataset_arrays(build_dataset("font_digits", None, 8, 1, 10, size=200, split="test"))
    np.savez(tmp_path / "samples.npz", images=images, labels=labels)
    quality = sample_quality(cfg, public_stage_config(cfg).data, tmp_path)
    assert quality["recognisable"] is True and quality["class_consistency"] > 0.3
