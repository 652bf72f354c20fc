from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")

# A run small enough for two CPU cores: tiny model, a few steps, few samples.
FAST = [
    # from scratch: public stages are trained only where a test asks for a prior
    "prior=none",
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

    def make(*overrides: str, name: str = "run", fast: bool = True, config_name: str = "train"):
        # Runs train from scratch unless a test names a prior or an experiment; public stages it trains
        # are cached in tmp_path, never in the user's cache.
        names_prior = any(o.startswith(("prior=", "experiment=")) for o in overrides)
        scratch = [] if names_prior else ["prior=none"]
        fast_overrides = [o for o in FAST if not (names_prior and o.startswith("prior="))]
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            return compose(
                config_name=config_name,
                overrides=[
                    *(fast_overrides if fast else scratch), f"paths.output_dir={tmp_path / name}",
                    f"paths.cache_dir={tmp_path / 'cache'}", *overrides,
                ],
            )

    return make


def save_tiny_pipeline(directory: Path, num_embeds_ada_norm: int = 1000, seed: int = 0) -> Path:
    """A randomly initialised DiTPipeline (2-block DiT with learned sigma on 8x8x4 latents,
    a VAE for 16x16 RGB images, DDIM), saved like the hub's facebook/DiT-XL-2-256."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=num_embeds_ada_norm,
    )
    # Random adaLN outputs instead of zeros, so that every weight matters in the tests.
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(directory)
    return directory


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
