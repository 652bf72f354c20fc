"""The dashboard's statistics under privacy.statistics: released with their own Gaussian noise
and counted in the accountant's history (private, the default), exact and uncounted
(nonprivate), or absent (off); nothing exact from the private data reaches the run's files
in private mode."""

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch
from dp_accounting import dp_event, pld
from scipy import stats

from dpdit.privacy import DPSGD, PrivacyConfig, calibrate_noise_multiplier, epsilon_of
from dpdit.train import train
from helpers import BATCH, ZeroLoss, batch, run_step

SIGMA, RATIO = 2.0, 3.0


def dp_sgd(statistics, sigma=SIGMA, **settings):
    config = PrivacyConfig(noise_multiplier=sigma, statistics=statistics, statistics_noise=RATIO, **settings)
    return DPSGD(config, sample_rate=0.5, dataset_size=2 * BATCH, noise_multiplier=sigma)


def test_the_history_is_one_gaussian_mechanism_of_sigma_eff():
    """Gradients (sensitivity C, noise sigma C), loss sum (B, r sigma B) and count (1, r sigma),
    each divided by its noise, are one vector of sensitivity sqrt(sigma^-2 + 2 (r sigma)^-2)
    with unit noise: the Gaussian mechanism of sigma_eff."""
    privacy = dp_sgd("private")
    for _ in range(7):
        privacy.account()
    sigma_eff = (SIGMA**-2 + 2 * (RATIO * SIGMA) ** -2) ** -0.5
    assert privacy.ledger.history == [(pytest.approx(sigma_eff, rel=1e-12), 0.5, 7)]
    accountant = pld.PLDAccountant(value_discretization_interval=1e-3)
    accountant.compose(dp_event.PoissonSampledDpEvent(0.5, dp_event.GaussianDpEvent(sigma_eff)), 7)
    assert privacy.epsilon == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    # the same gradients' noise without the statistics spends less
    assert privacy.statistics_report()["epsilon_without_statistics"] < privacy.epsilon
    for statistics in ("off", "nonprivate"):
        other = dp_sgd(statistics)
        other.account()
        assert other.ledger.history == [(SIGMA, 0.5, 1)]


def test_calibration_solves_for_the_gradients_sigma_given_the_statistics():
    config = PrivacyConfig(statistics="private", statistics_noise=RATIO)
    effective = calibrate_noise_multiplier(10.0, 1e-5, 0.5, 100, "pld")
    sigma = config.gradient_noise_multiplier(effective)
    assert sigma > effective and config.effective_noise_multiplier(sigma) >= effective
    assert epsilon_of([(config.effective_noise_multiplier(sigma), 0.5, 100)], 1e-5, "pld") <= 10.0


def test_released_statistics_have_the_stated_noise():
    """Zero losses and gradients: what is released is the noise alone, from its own stream,
    N(0, (r sigma B)^2) on the loss sum and N(0, (r sigma)^2) on the count."""
    privacy = dp_sgd("private", loss_bound=0.5)
    draws = []
    for _ in range(400):
        privacy.account()
        draws.append(privacy.statistics_noise(torch.device("cpu")))
    loss, count = torch.stack(draws).T.numpy()
    std = RATIO * SIGMA
    assert stats.kstest(loss, "norm", args=(0, std * 0.5)).pvalue > 1e-3
    assert stats.kstest(count, "norm", args=(0, std)).pvalue > 1e-3
    # independent of each other and of the gradients' noise stream
    assert abs(stats.pearsonr(loss, count)[0]) < 5 / math.sqrt(len(loss))


def test_a_step_logs_the_noisy_statistics_per_expected_image():
    privacy = dp_sgd("private")
    module, _ = run_step(privacy, physical_batch_size=BATCH, loss=ZeroLoss())
    metrics = module.trainer.callback_metrics
    noise = privacy.randomness.gaussian_noise(0, [torch.zeros(2, dtype=torch.float64)], 1.0, purpose="statistics")[0]
    expected = noise * torch.tensor([RATIO * SIGMA * 1.0, RATIO * SIGMA]) / privacy.expected_batch_size
    assert float(metrics["private/loss"]) == pytest.approx(float(expected[0]), rel=1e-5)
    assert float(metrics["private/clipped_fraction"]) == pytest.approx(float(expected[1]), rel=1e-5)
    assert "train/loss" not in metrics and not any(name.startswith("nonprivate/") for name in metrics)


def test_statistics_off_spends_what_the_gradients_alone_spend(make_config, tmp_path):
    train(make_config("privacy.statistics=off", name="off"))
    report = json.loads((tmp_path / "off" / "privacy_report.json").read_text())
    q, steps = report["sample_rate"], report["steps"]
    assert report["noise_multiplier"] == calibrate_noise_multiplier(10.0, 1e-5, q, steps, "pld")
    assert report["epsilon"] == epsilon_of([(report["noise_multiplier"], q, steps)], 1e-5, "pld")
    assert report["statistics"]["mode"] == "off"


def run_files(directory):
    return [path for path in directory.rglob("*") if path.is_file()]


def test_nothing_exact_from_the_private_data_reaches_the_files_in_private_mode(make_config, tmp_path):
    """Two runs with the same batches, noise and weights (seeded, fixed sigma; the statistics'
    noise has its own stream): the exact values the nonprivate one logs appear nowhere in the
    private one's files, W&B's included."""
    same = ["privacy.secure_mode=false", "privacy.noise_multiplier=1.0", "logger=default", "trainer.max_steps=3"]
    train(make_config(*same, "privacy.statistics=nonprivate", name="exact"))
    train(make_config(*same, name="private"))
    with open(tmp_path / "exact" / "csv" / "version_0" / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("train/loss")]
    exact = {row[key] for row in rows for key in ("train/loss", "nonprivate/grad_norm_mean") if row.get(key)}
    assert len(exact) >= 6
    with open(tmp_path / "private" / "csv" / "version_0" / "metrics.csv") as file:
        private_rows = list(csv.DictReader(file))
    assert sum(1 for row in private_rows if row.get("private/loss")) == 3
    for path in run_files(tmp_path / "private"):
        content = path.read_bytes()
        for name in (b"train/loss", b"train/batch_size", b"nonprivate/", b"class_consistency"):
            assert name not in content, (path, name)
        for value in exact:
            assert value.encode() not in content, (path, value)
    assert (tmp_path / "exact" / "sample_metrics.json").is_file()
    assert not (tmp_path / "private" / "sample_metrics.json").exists()


def test_adaptive_clipping_converges_to_the_target_quantile():
    """Per-image norms log-normal with median 2 (their 0.8-quantile about 4.6): fed the
    released, noisy clipped count of each step, the bound settles at the target quantile."""
    generator = torch.Generator().manual_seed(0)
    for quantile, expected in ((0.5, 2.0), (0.8, 2.0 * math.exp(0.842))):
        config = PrivacyConfig(
            noise_multiplier=1.0, adaptive_clipping=True, target_quantile=quantile, max_grad_norm=0.1
        )
        privacy = DPSGD(config, sample_rate=0.5, dataset_size=512, noise_multiplier=1.0)
        privacy.optimizer, privacy.clipper = SimpleNamespace(max_grad_norm=0.1), SimpleNamespace(set_max_grad_norm=id)
        bounds = []
        for _ in range(600):
            norms = 2.0 * torch.exp(torch.randn(256, generator=generator))
            noise = config.statistics_noise * torch.randn((), generator=generator)
            privacy.observe({"private_clipped": (norms > privacy.max_grad_norm).sum() + noise})
            bounds.append(privacy.max_grad_norm)
        settled = sum(bounds[-200:]) / 200
        assert settled == pytest.approx(expected, rel=0.1), quantile
        assert privacy.optimizer.max_grad_norm == privacy.max_grad_norm
    report = privacy.adaptive_clipping_report()
    assert report["initial"] == 0.1 and report["min"] == 0.1 and report["max"] >= report["final"]


def test_adaptive_clipping_runs_in_every_mode_and_resumes_where_the_bound_went(make_config, tmp_path):
    settings = ["privacy.adaptive_clipping=true", "privacy.max_grad_norm=1e-3", "privacy.secure_mode=false"]
    settings.append("privacy.noise_multiplier=1.0")  # the same sigma for 2 and 4 steps
    train(make_config(*settings, "trainer.max_steps=4", name="whole"))
    train(make_config(*settings, "trainer.max_steps=2", name="part"))
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    train(make_config(*settings, "trainer.max_steps=4", f"ckpt_path={last}", name="part"))
    whole, resumed = (json.loads((tmp_path / name / "privacy_report.json").read_text()) for name in ("whole", "part"))
    # every gradient is clipped at 1e-3: the bound grows, the same way resumed or not
    assert whole["adaptive_clipping"]["final"] > 1e-3 and whole["max_grad_norm"] == whole["adaptive_clipping"]["final"]
    assert resumed["adaptive_clipping"] == whole["adaptive_clipping"]


@pytest.mark.parametrize("clipping", ["hooks", "ghost", "functorch", "bookkeeping"])
def test_the_adapted_bound_is_the_one_each_mode_clips_to(clipping):
    privacy = dp_sgd("private", sigma=0.0, clipping=clipping, adaptive_clipping=True, max_grad_norm=1e-3)
    run_step(privacy, physical_batch_size=BATCH // 2)
    bound = privacy.max_grad_norm
    assert bound != 1e-3
    # the next step clips to the new bound: one image, clipped, moves the weights by bound / E
    _, update = run_step(privacy, physical_batch_size=1, data=batch(size=1))
    assert float(torch.sqrt(sum((u**2).sum() for u in update))) == pytest.approx(
        bound / privacy.expected_batch_size, rel=1e-6
    )
