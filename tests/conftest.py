"""The suite's fixtures; what tests share besides is in helpers.py."""

from pathlib import Path

import pytest

from helpers import FAST, compose_config, save_tiny_pipeline


@pytest.fixture
def make_config(tmp_path):
    """Compose the real training config with overrides, writing into tmp_path/<name>."""

    def make(*overrides: str, name: str = "run", fast: bool = True, config_name: str = "train"):
        # Runs train from scratch unless a test names a prior or an experiment; public stages it trains
        # are cached in tmp_path, never in the user's cache.
        names_prior = any(o.startswith(("prior=", "experiment=")) for o in overrides)
        scratch = [] if names_prior else ["prior=none"]
        fast_overrides = [o for o in FAST if not (names_prior and o.startswith("prior="))]
        return compose_config(
            config_name,
            *(fast_overrides if fast else scratch),
            f"paths.output_dir={tmp_path / name}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            *overrides,
        )

    return make


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("hub") / "tiny-dit")


@pytest.fixture
def fixed_secret(monkeypatch):
    """Every run of the test draws the same secret key: an interrupted run and its
    uninterrupted reference then share their batches and noise, as one run's resume does."""
    from dpdit.randomness import PrivateRandomness

    key = bytes(range(32))
    monkeypatch.setattr(PrivateRandomness, "secret", classmethod(lambda cls: cls(key, "secret")))
    return key
