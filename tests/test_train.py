"""The training entry point with the real configs: outputs, resume, and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException

from dpdit.cli import ConfigError
from dpdit.privacy import PrivacyConfig, epsilon_of
from dpdit.train import train

# the accountant a run uses unless told otherwise
ACCOUNTANT = PrivacyConfig.accountant

ROOT = Path(__file__).resolve().parents[1]
REPORT_KEYS = {
    "epsilon",
    "delta",
    "noise_multiplier",
    "max_grad_norm",
    "sample_rate",
    "steps",
    "accountant",
    "clipping",
    "noise_multiplicity",
    "dataset_size",
    "expected_batch_size",
}


def test_default_config_composes(make_config):
    cfg = make_config(fast=False)
    assert cfg.data.dataset == "digits"
    assert cfg.privacy.enabled and cfg.privacy.target_epsilon == 10.0 and cfg.privacy.delta == 1e-5
    assert cfg.model._target_ == "dpdit.models.create_dit" and not cfg.model.pretrained
    assert cfg.trainer.use_distributed_sampler is False


@pytest.mark.parametrize("clipping", ["ghost", "hooks", "bookkeeping"])
def test_short_run_writes_every_output(make_config, tmp_path, clipping):
    cfg = make_config(f"privacy.clipping={clipping}")
    train(cfg)
    out = tmp_path / "run"
    report = json.loads((out / "privacy_report.json").read_text())
    assert REPORT_KEYS <= report.keys()
    assert report["enabled"] and report["steps"] == 2 and report["clipping"] == clipping
    assert report["sample_rate"] == pytest.approx(64 / 1497)
    assert report["dataset_size"] == 1497 and report["expected_batch_size"] == pytest.approx(64)
    assert 0 < report["epsilon"] <= 10.0
    assert report["epsilon"] == pytest.approx(
        epsilon_of([(report["noise_multiplier"], 64 / 1497, 2)], 1e-5, ACCOUNTANT), rel=1e-9
    )

    samples = np.load(out / "samples.npz")
    assert samples["images"].dtype == np.uint8 and samples["images"].shape == (20, 1, 8, 8)
    assert samples["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    assert (out / "samples.png").stat().st_size > 0

    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["privacy"]["history"] == [(report["noise_multiplier"], 64 / 1497, 2)]
    assert any(key.startswith("ema.") for key in checkpoint["state_dict"])
    assert (out / "csv" / "version_0" / "metrics.csv").read_text().count("privacy/epsilon") == 1


def test_non_private_baseline_reports_no_guarantee(make_config, tmp_path):
    train(make_config("privacy=none"))
    report = json.loads((tmp_path / "run" / "privacy_report.json").read_text())
    assert report["enabled"] is False and report["epsilon"] is None


def test_resume_continues_training_and_accountant(make_config, tmp_path):
    fixed = "privacy.noise_multiplier=1.5"
    whole = train(make_config(fixed, "trainer.max_steps=4", name="whole"))
    train(make_config(fixed, "trainer.max_steps=2", name="first"))
    resumed = train(
        make_config(
            fixed, "trainer.max_steps=4", f"ckpt_path={tmp_path / 'first/checkpoints/last.ckpt'}", name="second"
        )
    )
    assert resumed["steps"] == whole["steps"] == 4
    assert resumed["epsilon"] == pytest.approx(whole["epsilon"], rel=1e-12)
    checkpoint = torch.load(tmp_path / "second/checkpoints/last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 4


def test_wandb_logs_offline(make_config, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    train(make_config("logger=default", "sample.num_per_class=1"))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


BAD_INPUTS = {
    "image size not divisible by the patch": (["data.image_size=9"], "divisible"),
    "data channels not matching the model": (["model.in_channels=3"], "in_channels"),
    "delta >= 1/N": (["privacy.delta=0.001"], "privacy.delta"),
    "unreachable target epsilon": (["privacy.target_epsilon=1e-6"], "unreachable"),
    "non-positive target epsilon": (["privacy.target_epsilon=0"], "privacy.target_epsilon"),
    "non-positive clip norm": (["privacy.max_grad_norm=0"], "privacy.max_grad_norm"),
    "physical batch larger than logical": (["data.physical_batch_size=128"], "data.physical_batch_size"),
    "logical batch larger than the dataset": (
        ["data.batch_size=5000", "data.physical_batch_size=64"],
        "data.batch_size",
    ),
    "unknown clipping mode": (["privacy.clipping=per_layer"], "privacy.clipping"),
    "unknown accountant": (["privacy.accountant=moments"], "privacy.accountant"),
    "unknown dataset": (["data.dataset=svhn"], "data.dataset"),
    "missing offline dataset": (["data=mnist", "data.root=/nonexistent"], "download=True"),
    "missing checkpoint": (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path"),
}


@pytest.mark.parametrize("overrides, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_fails_before_training(make_config, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(make_config(*overrides))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_model_opacus_cannot_train_is_refused():
    from dpdit.privacy import check_model_is_private

    with pytest.raises(ValueError, match="privacy.clipping=hooks"):
        check_model_is_private(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)), "hooks")


def test_unknown_config_keys_and_groups_are_refused(make_config):
    with pytest.raises(ConfigCompositionException):
        make_config("privacy.target_epislon=3")
    with pytest.raises(ConfigCompositionException):
        make_config("data=svhn")


def test_existing_checkpoint_is_never_overwritten(make_config, tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").write_bytes(b"earlier run")
    with pytest.raises(ConfigError, match="already exists"):
        train(make_config())
    assert (checkpoints / "last.ckpt").read_bytes() == b"earlier run"


def test_dp_resume_of_non_private_checkpoint_is_refused(make_config, tmp_path):
    train(make_config("privacy=none", name="public"))
    with pytest.raises(ValueError, match="without privacy"):
        train(make_config(f"ckpt_path={tmp_path / 'public/checkpoints/last.ckpt'}", name="private"))


def test_command_line_error_is_one_clear_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", f"hydra.run.dir={tmp_path}", "privacy.max_grad_norm=-1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "dpdit: privacy.max_grad_norm=-1" in result.stderr
    assert "Traceback" not in result.stderr
