"""The config tree: the paper sizes as a few lines over one DiT config, the noise schedule on
the diffusion node, privacy=none as its own node, and a prior's settings named."""

import logging

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dpdit.cli import CONFIG_DIR, ConfigError, compose_config
from dpdit.models import DiT
from dpdit.prior import settings_line
from dpdit.privacy import NonPrivateConfig, PrivacyConfig
from dpdit.train import train


def leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


@pytest.mark.parametrize("path", sorted((CONFIG_DIR / "model").glob("dit_*.yaml")), ids=lambda p: p.stem)
def test_each_size_overrides_a_few_lines_of_the_dit_config(path):
    settings = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    assert settings[:3] == ["defaults:", "  - dit", "  - _self_"] and len(settings) <= 10
    composed = compose_config("train", ["prior=none", f"model={path.stem}"]).model
    # the base holds every DiT argument, at DiT's own default unless a size says otherwise
    base = OmegaConf.load(CONFIG_DIR / "model" / "dit.yaml")
    assert set(composed) == set(base)


def test_the_base_config_is_dits_defaults_but_learn_sigma():
    base = compose_config("train", ["prior=none", "model=dit", "data.image_size=32", "data.channels=4"]).model
    defaults = DiT.__init__.__defaults__
    names = DiT.__init__.__code__.co_varnames[1 : 1 + len(defaults)]
    for name, default in zip(names, defaults):
        given = ("input_size", "in_channels", "num_classes", "learn_sigma", "timestep_convention")
        if name in base and name not in given:
            assert base[name] == default, name


@pytest.mark.parametrize(
    "overrides, beta_end",
    [
        ([], 0.005),
        (["data=mnist"], 0.02),
        (["data=font_digits"], 0.005),
        (["diffusion=ddpm"], 0.02),
        (["data=fake"], 0.02),
    ],
)
def test_the_noise_schedule_is_a_diffusion_setting_each_dataset_may_choose(overrides, beta_end):
    cfg = compose_config("train", overrides)
    assert cfg.diffusion.beta_end == beta_end and "noise_schedule_end" not in cfg.data


def test_privacy_none_is_its_own_node(make_config):
    settings = instantiate(compose_config("train", ["privacy=none"]).privacy)
    assert isinstance(settings, NonPrivateConfig) and not settings.poisson_sampling and settings.clipping is None
    assert set(compose_config("train", ["privacy=none", "prior=none"]).privacy) == {"_target_", "enabled"}
    assert isinstance(instantiate(compose_config("train", []).privacy), PrivacyConfig)
    # a prior's DP settings act on nothing without privacy; a name DP-SGD does not know is refused
    instantiate(compose_config("train", ["privacy=none"]).privacy).validate(dataset_size=100)
    with pytest.raises(ConfigError, match="privacy.max_grad_nrom is not a setting"):
        train(make_config("privacy=none", "+privacy.max_grad_nrom=1"))


@pytest.mark.parametrize("overrides", [["privacy.enabled=false"], ["privacy=none", "privacy.enabled=true"]])
def test_a_flag_that_contradicts_the_node_is_refused(make_config, overrides):
    with pytest.raises(ConfigError, match="contradicts the privacy node: choose privacy="):
        train(make_config(*overrides))


@pytest.mark.parametrize("prior", ["font_digits", "imagefolder", "none"])
def test_a_prior_names_every_setting_it_sets(prior):
    node = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "prior" / f"{prior}.yaml"))
    root = ["prior.root=/data"] if prior == "imagefolder" else []
    named = compose_config("train", [f"prior={prior}", *root])
    set_here = sorted(key for key in leaves(node) if not key.startswith("prior.") and key != "defaults")
    if prior == "font_digits":
        assert sorted(named.prior.settings) == set_here
    else:
        assert set(set_here) <= set(named.prior.settings)


def test_the_run_log_says_where_the_fine_tuning_settings_come_from(make_config, caplog):
    line = settings_line(compose_config("train", []))
    assert "the public prior (font_digits_pretrain) sets" in line
    assert "optimizer.lr=0.0005, trainer.max_steps=300" in line
    line = settings_line(compose_config("train", ["prior=none"]))
    assert line.startswith("prior=none") and "optimizer.lr=0.002, trainer.max_steps=800" in line
    with caplog.at_level(logging.INFO, logger="dpdit.build"):
        train(make_config())
    assert any(record.getMessage().startswith("prior=none: ") for record in caplog.records)


@pytest.mark.parametrize("command", ["inspect", "profile"])
def test_commands_that_compare_clipping_modes_refuse_privacy_none(command, make_config):
    from dpdit.inspect.tracing import check_settings
    from dpdit.profile import check_profile_settings

    check = {"inspect": check_settings, "profile": check_profile_settings}[command]
    check(make_config(config_name=command))
    with pytest.raises(ConfigError, match=f"python -m dpdit.{command} reads DP-SGD's settings.*leave privacy=dp"):
        check(make_config("privacy=none", config_name=command))
