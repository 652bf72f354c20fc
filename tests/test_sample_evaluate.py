"""The sampling and evaluation commands, end to end on a tiny digits model."""

import urllib.error

import numpy as np
import pytest
import torch

from dpdit.cli import ConfigError
from dpdit.data import build_dataset
from dpdit.evaluate import dataset_arrays, frechet_distance, precision_recall, run_evaluation
from dpdit.sample import run_sampling
from dpdit.train import train
from helpers import FAST, compose_config


def fast_config(name, *overrides):
    return compose_config(name, *FAST, *overrides)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(fast_config("train", f"paths.output_dir={run}", "privacy.noise_multiplicity=2"))
    return run / "checkpoints" / "last.ckpt"


def sample(checkpoint, out, *overrides):
    return run_sampling(
        fast_config("sample", f"ckpt_path={checkpoint}", f"paths.output_dir={out}", "sample.steps=2", *overrides)
    )


def test_sample_writes_pngs_and_npz_for_the_asked_labels(checkpoint, tmp_path):
    sample(checkpoint, tmp_path, "sample.num_images=7", "sample.class_labels=[1,3]", "sample.batch_size=3")
    with np.load(tmp_path / "samples.npz") as arrays:
        images, labels = arrays["images"], arrays["labels"]
    assert images.shape == (7, 1, 8, 8) and images.dtype == np.uint8
    assert labels.tolist() == [1, 3, 1, 3, 1, 3, 1]
    assert sorted(p.relative_to(tmp_path / "images").as_posix() for p in (tmp_path / "images").rglob("*.png")) == [
        f"{label}/{index:06d}.png" for index, label in sorted(enumerate(labels.tolist()), key=lambda x: (x[1], x[0]))
    ]
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "sample_config.yaml").is_file()


@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "ddpm"])
def test_samples_depend_on_the_seed_not_on_the_batch_size(checkpoint, tmp_path, scheduler):
    def images(name, *overrides):
        return sample(
            checkpoint,
            tmp_path / name,
            "sample.num_images=5",
            f"sample.scheduler={scheduler}",
            "sample.png=false",
            *overrides,
        )["images"]

    whole = images("whole", "sample.batch_size=5")
    assert np.array_equal(whole, images("split", "sample.batch_size=2"))
    assert not np.array_equal(whole, images("other", "sample.batch_size=5", "sample.seed=1"))
    # more images extend the set
    assert np.array_equal(whole, images("more", "sample.num_images=8")[:5])


@pytest.mark.parametrize(
    "override, message",
    [
        ("sample.class_labels=[2,10]", r"sample.class_labels holds \[10\], outside the model's classes 0..9"),
        ("sample.scheduler=euler", "sample.scheduler='euler' is unknown"),
        ("sample.num_images=0", "sample.num_images=0 must be at least 1"),
        ("sample.device=tpu", "sample.device='tpu' is unknown"),
    ],
)
def test_bad_sample_settings_are_refused_before_writing(checkpoint, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        sample(checkpoint, tmp_path / "out", override)
    assert not (tmp_path / "out").exists()


def test_sample_needs_a_checkpoint_written_by_train(tmp_path):
    with pytest.raises(ConfigError, match="ckpt_path=.*missing.ckpt does not exist"):
        sample(tmp_path / "missing.ckpt", tmp_path / "out")


def evaluate(out, *overrides):
    return run_evaluation(fast_config("evaluate", f"paths.output_dir={out}", *overrides))


def test_evaluate_samples_from_a_checkpoint_with_downstream_accuracy_on_held_out_digits(checkpoint, tmp_path):
    results = evaluate(
        tmp_path,
        f"ckpt_path={checkpoint}",
        "sample.num_images=60",
        "sample.steps=2",
        "evaluate.metrics=[downstream]",
        "evaluate.downstream.epochs=2",
    )
    downstream = results["downstream"]
    assert results["samples"] == 60 and (tmp_path / "samples.npz").is_file()
    assert (
        downstream["test_images"] == 300 and downstream["validation_images"] == 6 and downstream["train_images"] == 54
    )
    assert 0.0 <= downstream["accuracy"] <= 1.0 and downstream["epoch"] in (1, 2)
    assert (tmp_path / "evaluation.json").is_file() and list((tmp_path / "csv").rglob("metrics.csv"))


def test_downstream_accuracy_tells_real_images_from_noise(tmp_path):
    """Real training digits as 'samples' teach the held-out test digits; shuffled labels do not."""
    images, labels = dataset_arrays(build_dataset("digits", None, 8, 1, 10))
    shuffled = np.random.default_rng(0).permutation(labels)
    scores = {}
    for name, y in (("real", labels), ("shuffled", shuffled)):
        np.savez(tmp_path / f"{name}.npz", images=images, labels=y)
        scores[name] = evaluate(
            tmp_path / name,
            f"evaluate.samples={tmp_path / name}.npz",
            "evaluate.metrics=[downstream]",
            "evaluate.downstream.epochs=15",
        )["downstream"]["accuracy"]
    assert scores["real"] > 0.85 and scores["shuffled"] < 0.3


def test_fid_without_the_inception_weights_says_how_to_get_them(tmp_path, monkeypatch):
    offline(monkeypatch, tmp_path)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(
        ConfigError,
        match=rf"(?s)Inception weights.*download\n.*weights-inception-2015-12-05-6726825d.pth"
        rf"\nand put the file at {expected}",
    ):
        evaluate(tmp_path / "out", f"evaluate.samples={tmp_path}", "evaluate.metrics=[fid]")
    with pytest.raises(
        ConfigError, match="evaluate.inception_weights=/nowhere/w.pth does not exist: download https://"
    ):
        evaluate(tmp_path / "out", f"evaluate.samples={tmp_path}", "evaluate.inception_weights=/nowhere/w.pth")


def offline(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


@pytest.mark.slow
def test_the_default_evaluation_runs_offline_and_ranks_real_noisy_and_random_digits(tmp_path, monkeypatch):
    """Without the Inception weights `evaluate.metrics=auto` leaves FID out and measures in the
    reference classifier's features: real digits score best, the same digits under noise
    worse, random images worst, by every metric."""
    offline(monkeypatch, tmp_path)
    images, labels = dataset_arrays(build_dataset("digits", None, 8, 1, 10))
    rng = np.random.default_rng(0)
    noisy = np.clip(images.astype(float) + rng.normal(0, 60, images.shape), 0, 255).astype(np.uint8)
    sets = {"real": images, "noisy": noisy, "random": rng.integers(0, 256, images.shape, dtype=np.uint8)}
    results = {}
    for name, x in sets.items():
        np.savez(tmp_path / f"{name}.npz", images=x, labels=labels)
        results[name] = evaluate(
            tmp_path / name,
            f"evaluate.samples={tmp_path / name}.npz",
            "evaluate.reference_classifier.epochs=8",
            "evaluate.downstream.epochs=4",
        )
    real, noisy, random = results["real"], results["noisy"], results["random"]
    assert real["metrics"] == ["classifier_fd", "classifier_precision_recall", "class_consistency", "downstream"]
    assert "fid" not in real and real["reference_classifier"]["test_accuracy"] > 0.9
    assert real["classifier_fd"] < noisy["classifier_fd"] < random["classifier_fd"]
    assert real["class_consistency"] > 0.9 > noisy["class_consistency"] > random["class_consistency"]
    assert real["classifier_precision"] > noisy["classifier_precision"] >= random["classifier_precision"]
    assert real["downstream"]["accuracy"] > random["downstream"]["accuracy"]


def test_frechet_distance_and_precision_recall_on_known_features():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(2000, 8, generator=generator, dtype=torch.float64)
    shift = torch.tensor([3.0, 0, 0, 0, 0, 0, 0, 4.0], dtype=torch.float64)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    # same covariance, means 5 apart: FID = 25
    assert frechet_distance(real + shift, real) == pytest.approx(25.0, rel=1e-6)
    same = precision_recall(real[:500], real[:500])
    assert same == {"precision": 1.0, "recall": 1.0}
    far = precision_recall(real[:500] + 100.0, real[:500])
    assert far == {"precision": 0.0, "recall": 0.0}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["evaluate.metrics=[is]"],
            r"evaluate.metrics=\['is'\]: choose auto or a list from fid, precision_recall, classifier_fd",
        ),
        ([], "give either evaluate.samples"),
    ],
)
def test_bad_evaluate_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        evaluate(tmp_path, "evaluate.metrics=[downstream]", *overrides)
