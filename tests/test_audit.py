"""The one-run privacy audit: its statistics, and that it tells a broken DP-SGD from a sound one."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from dpdit.audit import audit_scores, epsilon_lower_bound, p_value, run_audit
from dpdit.cli import ConfigError
from helpers import CONFIGS, FAST, compose_config


def test_p_value_without_delta_is_the_randomized_response_tail():
    for epsilon in (0.0, 0.5, 2.0):
        accuracy = math.exp(epsilon) / (1 + math.exp(epsilon))
        assert p_value(1000, 100, 70, epsilon, 0.0) == pytest.approx(stats.binom.sf(69, 100, accuracy))


def test_delta_only_weakens_the_bound():
    assert p_value(1000, 100, 70, 1.0, 1e-5) > p_value(1000, 100, 70, 1.0, 0.0)
    assert epsilon_lower_bound(1000, 100, 90, 1e-5, 0.05) < epsilon_lower_bound(1000, 100, 90, 0.0, 0.05)


def test_all_correct_guesses_give_the_closed_form_bound():
    """r correct guesses of r reject epsilon while accuracy^r < significance."""
    r, significance = 100, 0.05
    accuracy = significance ** (1 / r)
    expected = math.log(accuracy / (1 - accuracy))
    assert epsilon_lower_bound(1000, r, r, 0.0, significance) == pytest.approx(expected, abs=1e-5)


def test_chance_guessing_bounds_nothing():
    assert epsilon_lower_bound(1000, 100, 50, 1e-5, 0.05) == 0.0


def test_bound_holds_at_the_confidence_for_randomized_response():
    """Guesses as good as epsilon-DP randomized response exceed epsilon in at most 5% of audits."""
    rng = np.random.default_rng(0)
    epsilon, m, r, trials = 1.0, 1000, 200, 200
    accuracy = math.exp(epsilon) / (1 + math.exp(epsilon))
    correct = rng.binomial(r, accuracy, size=trials)
    exceeded = sum(epsilon_lower_bound(m, r, int(v), 0.0, 0.05) > epsilon for v in correct)
    assert exceeded / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)


def test_scores_that_separate_perfectly_reach_the_canary_limit():
    included = np.arange(200) % 2 == 0
    result = audit_scores({"perfect": included.astype(float)}, included, 0.0, 0.95, [100])
    assert result["best"]["correct"] == 100 and result["auc"]["perfect"] == 1.0
    assert result["epsilon_lower_bound"] == pytest.approx(epsilon_lower_bound(200, 100, 100, 0.0, 0.05))
    # a second score halves the significance of each test (Bonferroni): a smaller bound
    both = audit_scores({"perfect": included.astype(float), "other": np.zeros(200)}, included, 0.0, 0.95, [100])
    assert both["epsilon_lower_bound"] < result["epsilon_lower_bound"]


# A small audit: 400 canaries beside 64 random images, every image in every step.
AUDIT = [
    "data=fake",
    "data.size=64",
    "audit.canaries=400",
    "data.batch_size=264",
    "data.physical_batch_size=264",
    "trainer.max_steps=30",
    "audit.guesses=[50,100,200]",
    "audit.draws=4",
]


def audit(tmp_path, *overrides):
    cfg = compose_config("audit", *FAST, *AUDIT, f"paths.output_dir={tmp_path}", *overrides)
    report = run_audit(cfg)
    assert (
        json.loads((tmp_path / "audit_report.json").read_text())["epsilon_lower_bound"] == report["epsilon_lower_bound"]
    )
    return report


def test_audit_catches_training_that_adds_no_noise(tmp_path, monkeypatch):
    """A broken DP-SGD: the accountant claims epsilon 0.5, but no noise is added and the
    clipping bound is huge. The audit's lower bound lies far above the claim."""
    from dpdit.randomness import PrivateRandomness

    monkeypatch.setattr(PrivateRandomness, "add_gaussian_noise", lambda self, step, tensors, std, purpose="noise": None)
    report = audit(tmp_path, "privacy.target_epsilon=0.5", "privacy.max_grad_norm=1e6")
    assert report["claimed_epsilon"] <= 0.5
    assert report["epsilon_lower_bound"] > 3.0
    assert report["auc"]["embedding"] > 0.99


def test_audit_of_sound_dp_sgd_stays_below_the_claim(tmp_path):
    report = audit(tmp_path, "privacy.target_epsilon=0.5", "privacy.max_grad_norm=1e6")
    assert report["epsilon_lower_bound"] <= report["claimed_epsilon"] <= 0.5
    assert report["canaries"] == 400 and report["dataset_size"] == 64 + report["canaries_included"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("audit.guesses=[5000]", "audit.guesses"),
        ("audit.scores=[gradient]", "audit.scores"),
        ("audit.weights=best", "audit.weights"),
        ("ckpt_path=/x.ckpt", "ckpt_path"),
        ("trainer=fsdp", "use trainer=ddp or one device"),
    ],
)
def test_bad_audit_settings_are_refused_before_training(tmp_path, override, message):
    cfg = compose_config("audit", *FAST, f"paths.output_dir={tmp_path}", override)
    with pytest.raises(ConfigError, match=message):
        run_audit(cfg)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_audit_command_line_writes_its_report(tmp_path):
    overrides = [*FAST, "audit.canaries=20", "audit.guesses=[10,20]", "audit.draws=2", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(
        [sys.executable, "-m", "dpdit.audit", *overrides],
        cwd=Path(CONFIGS).parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "audit: epsilon >= " in result.stdout
    report = json.loads((tmp_path / "audit_report.json").read_text())
    assert report["canaries"] == 20 and 0 <= report["epsilon_lower_bound"] <= report["claimed_epsilon"]
    assert (tmp_path / "privacy_report.json").is_file()
