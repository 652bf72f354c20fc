"""The published configurations build DiT-XL/2-256 and its VAE at their real sizes, and the
random pipeline folder is built once and rebuilt when its record differs."""

import json

import torch
from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

from dpdit.models.published import DIT_XL_2_256, RECORD, SD_VAE_FT_EMA, save_random_pipeline


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_published_configurations_have_the_hub_models_sizes():
    with torch.device("meta"):
        transformer, vae = DiTTransformer2DModel(**DIT_XL_2_256), AutoencoderKL(**SD_VAE_FT_EMA)
    # diffusers keeps a timestep MLP and class table per block: 749.8M, not the paper's 675M
    assert count(transformer) == 749_826_464 and len(transformer.transformer_blocks) == 28
    assert transformer.inner_dim == 1152 and transformer.config.out_channels == 8
    assert count(vae) == 83_653_863 and vae.config.scaling_factor == 0.18215


TINY_TRANSFORMER = {
    **DIT_XL_2_256,
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "num_layers": 1,
    "sample_size": 4,
}
TINY_VAE = {
    **SD_VAE_FT_EMA,
    "block_out_channels": [8, 8, 8, 8],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 32,
}


def test_the_random_pipeline_is_saved_once_and_rebuilt_when_its_record_differs(tmp_path):
    folder = save_random_pipeline(tmp_path / "xl", transformer=TINY_TRANSFORMER, vae=TINY_VAE)
    pipeline = DiTPipeline.from_pretrained(folder)
    assert pipeline.transformer.config.num_layers == 1 and pipeline.vae.config.latent_channels == 4
    weights = next(folder.glob("transformer/*.safetensors"))
    saved_at = weights.stat().st_mtime_ns
    save_random_pipeline(folder, transformer=TINY_TRANSFORMER, vae=TINY_VAE)
    assert weights.stat().st_mtime_ns == saved_at
    save_random_pipeline(folder, seed=1, transformer=TINY_TRANSFORMER, vae=TINY_VAE)
    assert json.loads((folder / RECORD).read_text())["seed"] == 1 and weights.stat().st_mtime_ns != saved_at
