from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")

# A run small enough for two CPU cores: tiny model, a few steps, few samples.
FAST = [
    "model.hidden_size=32",
    "model.depth=2",
    "model.num_heads=2",
    "data.batch_size=64",
    "data.physical_batch_size=32",
    "trainer.max_steps=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "sample.num_per_class=2",
    "sample.steps=3",
]


@pytest.fixture
def make_config(tmp_path):
    """Compose the real training config with overrides, writing into tmp_path/<name>."""

    def make(*overrides: str, name: str = "run", fast: bool = True):
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            return compose(
                config_name="train",
                overrides=[*(FAST if fast else []), f"paths.output_dir={tmp_path / name}", *overrides],
            )

    return make
