"""`python -m dpdit.profile`: the measurements, their files, the max-batch search and bad input."""

import json
import statistics

import pytest
import torch
from omegaconf import OmegaConf

from dpdit.cli import ConfigError
from dpdit.privacy import CLIPPING_MODES
from dpdit.profile import build, find_max_batch, largest_fitting, run_profile, run_steps
from helpers import compose_config

TINY = [
    "model.finetune=full",
    "model.hidden_size=32",
    "model.depth=2",
    "model.num_heads=2",
    "profile.warmup=1",
    "profile.num_iter=2",
]


@pytest.fixture
def profile_config(tmp_path):
    def make(*overrides: str):
        return compose_config("profile", *TINY, f"paths.output_dir={tmp_path}", *overrides)

    return make


@pytest.mark.slow
def test_tiny_profile_writes_records_table_and_chart(profile_config, tmp_path):
    results = run_profile(
        profile_config(
            "profile.modes=[vanilla,hooks,ghost]", "profile.batch_sizes=[4]", "profile.count_multiply_adds=true"
        )
    )

    written = json.loads((tmp_path / "profile.json").read_text())
    assert [r["mode"] for r in written["records"]] == ["vanilla", "hooks", "ghost"]
    for record in written["records"]:
        assert record["status"] == "ok" and record["batch_size"] == 4
        assert len(record["step_times_s"]) == 2 and all(t > 0 for t in record["step_times_s"])
        assert record["median_step_s"] == statistics.median(record["step_times_s"])
        assert record["images_per_s"] == pytest.approx(4 / record["median_step_s"])
        memory = record["memory"]
        assert memory["peak_kind"] == "rss_peak_minus_rss_before_model"
        assert 0 < memory["peak_bytes"] == memory["rss_peak_bytes"] - memory["rss_before_model_bytes"]
        assert record["device"]["type"] == "cpu"
        assert {"python", "torch", "opacus", "lightning", "diffusers", "dpdit"} <= set(record["versions"])
        assert record["config"]["model"]["hidden_size"] == 32 and record["config"]["profile"]["num_iter"] == 2
        ratio = record["vs_vanilla"]
        vanilla = written["records"][0]
        assert ratio["step_time"] == pytest.approx(record["median_step_s"] / vanilla["median_step_s"])
        assert ratio["peak_memory"] == pytest.approx(memory["peak_bytes"] / vanilla["memory"]["peak_bytes"])
        assert ratio["multiply_adds"] == pytest.approx(record["multiply_adds"] / vanilla["multiply_adds"])
        assert record["trained_parameters"] == record["parameters"] > 0
    assert written["records"][0]["vs_vanilla"] == {"step_time": 1.0, "peak_memory": 1.0, "multiply_adds": 1.0}
    # counted in one more, untimed step: hooks' per-sample gradients (an einsum per layer)
    # and ghost's second backward pass are matrix products beyond vanilla's
    vanilla, hooks, ghost = (r["multiply_adds"] for r in written["records"])
    assert 0 < vanilla < hooks and vanilla < ghost
    assert "mult-adds/vanilla" in results["table"]
    for mode in ("vanilla", "hooks", "ghost"):
        assert mode in results["table"]
    chart = (tmp_path / "profile.png").read_bytes()
    assert chart[:8] == b"\x89PNG\r\n\x1a\n" and len(chart) > 10_000


def one_step_update(cfg, mode):
    """The weight change of one SGD(lr=1) step of `mode` from the same perturbed weights."""
    torch.manual_seed(0)
    module, batch = build(cfg, mode, batch_size=4)
    with torch.no_grad():
        # away from adaLN-Zero's zeros, so that every layer has a gradient
        for parameter in module.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    before = [p.detach().clone() for p in module.model.parameters()]
    run_steps(cfg, module, batch, steps=1, callbacks=[])
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(module.model.parameters(), before)])


@pytest.mark.parametrize("bound", [1e-3, 1e6])
def test_every_mode_takes_the_same_step_on_the_same_batch(profile_config, bound):
    """Without noise, every clipping mode clips the same per-sample gradients; with a bound
    nothing reaches they equal the non-private step."""
    cfg = profile_config(
        "optimizer._target_=torch.optim.SGD",
        "optimizer.lr=1.0",
        "privacy.noise_multiplier=0",
        f"privacy.max_grad_norm={bound}",
    )
    updates = {mode: one_step_update(cfg, mode) for mode in CLIPPING_MODES}
    reference = updates["hooks"]
    assert (reference != 0).float().mean() > 0.5
    for mode, update in updates.items():
        torch.testing.assert_close(update, reference, rtol=1e-4, atol=1e-7, msg=f"{mode} differs from hooks")
    vanilla = one_step_update(cfg, "vanilla")
    if bound < 1:
        # every image is clipped to norm 1e-3: the mean update is at most that long
        assert reference.norm() <= bound * (1 + 1e-5) < vanilla.norm()
    else:
        torch.testing.assert_close(vanilla, reference, rtol=1e-4, atol=1e-7)


def dict_of(cfg):
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("threshold", [0, 1, 2, 5, 37, 64, 100])
def test_max_batch_search_finds_the_threshold_in_few_tries(threshold):
    tried = []

    def fits(batch_size):
        tried.append(batch_size)
        return batch_size <= threshold

    assert largest_fitting(fits, upper=64) == min(threshold, 64)
    assert len(tried) == len(set(tried)) <= 2 * 7
    # doubling from a first guess above or below the threshold finds it too
    for first in (16, 64):
        tried.clear()
        assert largest_fitting(fits, upper=64, first=first) == min(threshold, 64)
        assert tried[0] == first and len(tried) == len(set(tried)) <= 2 * 7


@pytest.mark.slow
def test_max_batch_tries_run_in_fresh_processes_against_the_memory_limit(profile_config):
    roomy = find_max_batch(dict_of(profile_config("profile.memory_limit_gib=1000", "profile.max_batch=2")), "ghost")
    assert roomy["batch_size"] == 2
    assert [t["batch_size"] for t in roomy["tries"]] == [1, 2]
    assert all(t["fits"] and t["peak_bytes"] > 0 for t in roomy["tries"])
    # a limit below the first try's own peak: nothing fits
    cramped = find_max_batch(dict_of(profile_config("profile.memory_limit_gib=1e-6", "profile.max_batch=8")), "ghost")
    assert cramped["batch_size"] == 0
    assert [t["fits"] for t in cramped["tries"]] == [False]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["profile.modes=[vanilla,ghosts]"], "profile.modes=.*choose among vanilla, hooks, ghost, functorch"),
        (["profile.batch_sizes=[0]"], "profile.batch_sizes"),
        (["profile.num_iter=0"], "profile.num_iter=0"),
        (
            ["profile.find_max_batch=true"],
            "profile.find_max_batch=true on a machine without a GPU.*profile.memory_limit_gib",
        ),
        (
            ["profile.find_max_batch=true", "profile.batch_multiple=0"],
            "profile.batch_multiple=0.*1 <= batch_multiple <= max_batch",
        ),
        (["profile.find_max_batch=true", "profile.first_batch=0"], "profile.first_batch=0 must be at least 1"),
        (["trainer.precision=bf16-mixed"], "profile.modes has ghost: trainer.precision=bf16-mixed"),
        (["data.image_size=9", "profile.modes=[vanilla]"], "not divisible by patch size 2.*data.image_size"),
    ],
)
def test_bad_settings_fail_with_the_setting_named_before_writing(profile_config, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run_profile(profile_config("profile.batch_sizes=[2]", *overrides))
    assert not (tmp_path / "profile.json").exists()
