"""The hard privacy budget, the history across resumes and fine-tuning, and the dashboard."""

import csv
import json

import pytest
import torch

from dpdit.cli import ConfigError
from dpdit.privacy import PrivacyConfig, epsilon_by_accountant, epsilon_of, steps_within_budget
from dpdit.train import train

# the accountant a run uses unless told otherwise
ACCOUNTANT = PrivacyConfig.accountant

Q = 64 / 1497
# sigma 0.6 at q = 64/1497 spends 3.6 in one step, 4.2 in 3, 4.5 in 5 (PLD, delta 1e-5)
SIGMA = "privacy.noise_multiplier=0.6"


def budget_for(steps: int) -> float:
    """A target between the epsilon of `steps` and of `steps + 1` steps at sigma 0.6."""
    return (epsilon_of([(0.6, Q, steps)], 1e-5, ACCOUNTANT) + epsilon_of([(0.6, Q, steps + 1)], 1e-5, ACCOUNTANT)) / 2


def read(path):
    return json.loads(path.read_text())


def checkpoint(path):
    return torch.load(path / "checkpoints" / "last.ckpt", weights_only=False)


def test_steps_within_budget_is_the_largest_count_that_fits():
    history = [(2.0, 0.1, 50)]  # epsilon 1.84
    for target in (2.0, 3.0, 5.0):
        allowed = steps_within_budget(target, 1e-5, 2.0, 0.1, 10_000, ACCOUNTANT, history)
        assert epsilon_of([*history, (2.0, 0.1, allowed)], 1e-5, ACCOUNTANT) <= target
        assert epsilon_of([*history, (2.0, 0.1, allowed + 1)], 1e-5, ACCOUNTANT) > target
    assert steps_within_budget(100.0, 1e-5, 2.0, 0.1, 30, ACCOUNTANT, history) == 30
    assert steps_within_budget(1.5, 1e-5, 2.0, 0.1, 30, ACCOUNTANT, history) == 0


def test_training_stops_before_the_step_that_would_exceed_the_budget(make_config, tmp_path):
    target = budget_for(3)
    report = train(make_config(SIGMA, f"privacy.target_epsilon={target}", "trainer.max_steps=6"))
    written = read(tmp_path / "run" / "privacy_report.json")
    assert report["steps"] == written["steps"] == written["global_step"] == 3
    assert written["epsilon"] <= target < epsilon_of([(0.6, Q, 4)], 1e-5, ACCOUNTANT)
    assert written["stopped"].startswith("privacy budget") and f"{target:g}" in written["stopped"]
    assert checkpoint(tmp_path / "run")["privacy"]["history"] == [(0.6, Q, 3)]


@pytest.mark.slow
def test_raising_max_steps_on_resume_stops_at_the_budget(make_config, tmp_path):
    """The resumed run keeps its calibrated sigma; the two extra steps would overspend."""
    first = train(make_config("trainer.max_steps=3", name="first"))
    resumed = train(
        make_config("trainer.max_steps=5", f"ckpt_path={tmp_path / 'first/checkpoints/last.ckpt'}", name="second")
    )
    assert resumed["noise_multiplier"] == first["noise_multiplier"]
    assert resumed["steps"] == 3 and resumed["epsilon"] == first["epsilon"] <= 10.0
    assert read(tmp_path / "second" / "privacy_report.json")["stopped"].startswith("privacy budget")
    assert checkpoint(tmp_path / "second")["privacy"]["history"] == [(first["noise_multiplier"], Q, 3)]


def test_larger_batch_on_resume_stops_earlier(make_config, tmp_path):
    target = budget_for(7)  # 7 steps at batch 64; after 2 of them, 1 more at batch 128
    train(make_config(SIGMA, f"privacy.target_epsilon={target}", "trainer.max_steps=2", name="first"))
    resumed = train(
        make_config(
            SIGMA,
            f"privacy.target_epsilon={target}",
            "trainer.max_steps=8",
            "data.batch_size=128",
            f"ckpt_path={tmp_path / 'first/checkpoints/last.ckpt'}",
            name="second",
        )
    )
    assert resumed["history"] == [[0.6, Q, 2], [0.6, 128 / 1497, 1]]
    history = [tuple(h) for h in resumed["history"]]
    assert resumed["epsilon"] <= target < epsilon_of([*history, (0.6, 128 / 1497, 1)], 1e-5, ACCOUNTANT)


def test_budget_stop_resumed_equals_uninterrupted(make_config, tmp_path, fixed_secret):
    target = budget_for(3)
    budget = [SIGMA, f"privacy.target_epsilon={target}", "trainer.max_steps=6"]
    train(make_config(*budget, name="whole"))
    train(make_config(SIGMA, f"privacy.target_epsilon={target}", "trainer.max_steps=2", name="first"))
    train(make_config(*budget, f"ckpt_path={tmp_path / 'first/checkpoints/last.ckpt'}", name="second"))
    whole, second = checkpoint(tmp_path / "whole"), checkpoint(tmp_path / "second")
    assert whole["global_step"] == second["global_step"] == 3
    assert whole["privacy"]["history"] == second["privacy"]["history"] == [(0.6, Q, 3)]
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, second["state_dict"][key]), key


def test_spent_budget_takes_no_step_and_loses_nothing(make_config, tmp_path):
    target = budget_for(2)
    train(make_config(SIGMA, f"privacy.target_epsilon={target}", "trainer.max_steps=5", name="first"))
    before = checkpoint(tmp_path / "first")
    resumed = train(
        make_config(
            SIGMA,
            f"privacy.target_epsilon={target}",
            "trainer.max_steps=9",
            f"ckpt_path={tmp_path / 'first/checkpoints/last.ckpt'}",
            name="second",
        )
    )
    after = checkpoint(tmp_path / "second")
    assert resumed["steps"] == 2 and after["privacy"]["history"] == before["privacy"]["history"]
    for key, value in before["state_dict"].items():
        assert torch.equal(value, after["state_dict"][key]), key


@pytest.mark.slow
def test_fine_tuning_on_the_same_data_counts_the_earlier_spend(make_config, tmp_path):
    earlier = train(make_config("privacy.target_epsilon=5", "trainer.max_steps=3", name="earlier"))
    init = f"init_ckpt_path={tmp_path / 'earlier/checkpoints/last.ckpt'}"
    fresh = train(make_config("privacy.target_epsilon=8", "trainer.max_steps=3", name="fresh"))
    same = train(make_config("privacy.target_epsilon=8", "trainer.max_steps=3", init, name="same"))
    disjoint = train(
        make_config(
            "privacy.target_epsilon=8", "trainer.max_steps=3", init, "privacy.init_data=disjoint", name="disjoint"
        )
    )

    assert same["history"][0] == [earlier["noise_multiplier"], Q, 3] and same["steps"] == 6
    assert same["epsilon"] == pytest.approx(epsilon_of([tuple(h) for h in same["history"]], 1e-5, ACCOUNTANT))
    assert earlier["epsilon"] < same["epsilon"] <= 8.0
    assert same["noise_multiplier"] > fresh["noise_multiplier"] == disjoint["noise_multiplier"]
    assert same["init_checkpoint"]["steps_counted"] == 3 and disjoint["init_checkpoint"]["steps_counted"] == 0
    assert disjoint["steps"] == 3 and disjoint["epsilon"] == pytest.approx(fresh["epsilon"])
    # the new run starts from the earlier run's EMA weights, at step 0
    assert checkpoint(tmp_path / "same")["global_step"] == 3


def test_fine_tuning_from_weights_without_privacy_history_needs_disjoint_data(make_config, tmp_path):
    train(make_config("privacy=none", name="public"))
    init = f"init_ckpt_path={tmp_path / 'public/checkpoints/last.ckpt'}"
    with pytest.raises(ConfigError, match="privacy.init_data=disjoint"):
        train(make_config(init, name="private"))
    assert not (tmp_path / "private" / "checkpoints").exists()
    report = train(make_config(init, "privacy.init_data=disjoint", name="private"))
    assert report["steps"] == 2 and report["init_checkpoint"]["data"] == "disjoint"


def test_fine_tuning_starts_from_the_earlier_ema_weights(make_config, tmp_path):
    from dpdit.build import setup

    train(make_config(name="earlier"))
    earlier = checkpoint(tmp_path / "earlier")["state_dict"]
    _, module, _ = setup(make_config(f"init_ckpt_path={tmp_path / 'earlier/checkpoints/last.ckpt'}", name="next"))
    for name, value in module.model.state_dict().items():
        assert torch.equal(value, earlier[f"ema.module.{name}"]), name


INIT_ERRORS = {
    "both checkpoints": (["ckpt_path={ckpt}", "init_ckpt_path={ckpt}"], "give one"),
    "another model": (["init_ckpt_path={ckpt}", "model.hidden_size=64"], "does not fit this model"),
    "missing file": (["init_ckpt_path=/nonexistent.ckpt"], "init_ckpt_path"),
    "unknown init_data": (["init_ckpt_path={ckpt}", "privacy.init_data=public"], "privacy.init_data"),
}


@pytest.mark.parametrize("overrides, message", INIT_ERRORS.values(), ids=INIT_ERRORS.keys())
@pytest.mark.slow
def test_bad_fine_tuning_start_is_refused_before_training(make_config, tmp_path, overrides, message):
    train(make_config(name="earlier"))
    ckpt = tmp_path / "earlier" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=message):
        train(make_config(*[o.format(ckpt=ckpt) for o in overrides], name="next"))
    assert not (tmp_path / "next" / "checkpoints").exists()


@pytest.mark.slow
def test_dashboard_logs_the_mechanism_and_clipping_diagnostics(make_config, tmp_path):
    exact = "privacy.statistics=nonprivate"  # the diagnostics this test reads
    train(make_config("trainer.max_steps=3", "privacy.max_grad_norm=1e-6", exact, name="tight"))
    train(make_config("trainer.max_steps=3", "privacy.max_grad_norm=1e6", exact, name="loose"))
    rows = {}
    for name in ("tight", "loose"):
        with open(tmp_path / name / "csv" / "version_0" / "metrics.csv") as f:
            rows[name] = [row for row in csv.DictReader(f) if row.get("privacy/epsilon")]
    report = read(tmp_path / "tight" / "privacy_report.json")
    assert len(rows["tight"]) == 3
    for step, row in enumerate(rows["tight"], start=1):
        assert float(row["privacy/epsilon"]) == pytest.approx(
            epsilon_of([(report["noise_multiplier"], Q, step)], 1e-5, ACCOUNTANT)
        )
        assert float(row["privacy/noise_multiplier"]) == pytest.approx(report["noise_multiplier"])
        assert float(row["privacy/sample_rate"]) == pytest.approx(Q)
        assert float(row["privacy/max_grad_norm"]) == pytest.approx(1e-6)
        assert float(row["nonprivate/clipped_fraction"]) == 1.0
        assert float(row["nonprivate/grad_norm_mean"]) > 1e-3
    assert all(float(row["nonprivate/clipped_fraction"]) == 0.0 for row in rows["loose"])


@pytest.mark.slow
def test_report_compares_the_accountants(make_config, tmp_path):
    report = train(make_config("privacy.accountant=prv"))
    history = [tuple(h) for h in report["history"]]
    assert report["epsilon_by_accountant"] == pytest.approx(epsilon_by_accountant(history, 1e-5))
    assert report["epsilon"] == pytest.approx(report["epsilon_by_accountant"]["prv"]) and report["epsilon"] <= 10.0
    assert read(tmp_path / "run" / "privacy_report.json")["stopped"] == "trainer.max_steps=2 reached"


@pytest.mark.slow
def test_wandb_run_carries_the_report_and_resolved_config(make_config, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    train(make_config("logger=default", "sample.num_per_class=1"))
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/files"))[0]
    assert read(files / "privacy_report.json") == read(tmp_path / "run" / "privacy_report.json")
    assert (
        "${" not in (files / "config_resolved.yaml").read_text()
        and "target_epsilon: 10.0" in (files / "config_resolved.yaml").read_text()
    )


@pytest.mark.slow
def test_public_font_prior_then_dp_fine_tuning_counts_only_the_private_steps(make_config, tmp_path):
    prior = train(make_config("experiment=font_digits_pretrain", "data.size=64", name="prior"))
    assert prior["enabled"] is False
    report = train(
        make_config(
            "privacy.init_data=disjoint",
            f"init_ckpt_path={tmp_path / 'prior/checkpoints/last.ckpt'}",
            "trainer.max_steps=2",
            name="private",
        )
    )
    assert report["init_checkpoint"]["data"] == "disjoint" and report["init_checkpoint"]["steps_counted"] == 0
    assert report["steps"] == 2 and report["epsilon"] <= 10.0
