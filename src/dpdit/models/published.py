"""The published configurations of the pipeline `model=pretrained` fine-tunes by default,
to build it with random weights: `facebook/DiT-XL-2-256` (its transformer and scheduler)
with `stabilityai/sd-vae-ft-ema`.

A pipeline built from them has every layer, shape and parameter count of the hub's, minus
the values, and needs no download: what a benchmark of memory and time at the real size
needs (`python -m dpdit.models.published /path/to/folder`, about 3 GB, cached: a folder that
already holds it is reused). It generates noise: never a stand-in for the real weights'
samples.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# diffusers' DiTTransformer2DModel as facebook/DiT-XL-2-256/transformer/config.json sets it:
# 28 blocks of width 16 x 72 = 1152, patch 2 on 32 x 32 x 4 latents, learned sigma (8 output
# channels), adaLN-Zero with 1000 classes, tanh-approximated GELU, attention with bias
DIT_XL_2_256 = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "sample_size": 32,
    "patch_size": 2,
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
}
# AutoencoderKL as stabilityai/sd-vae-ft-ema/config.json sets it: 256 px RGB to 32 x 32 x 4
SD_VAE_FT_EMA = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}
# the DDIM scheduler of the DiT pipeline: DDPM's linear betas, no clipping of latents
DIT_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "clip_sample": False,
}
# written last: a folder without it holds an interrupted save
RECORD = "random_weights.json"


def save_random_pipeline(
    directory: str | Path, seed: int = 0, transformer: dict = DIT_XL_2_256, vae: dict = SD_VAE_FT_EMA
) -> Path:
    """A DiTPipeline of these configurations (DiT-XL/2-256's by default) with random weights
    in `directory`, built once: a folder that holds the same record is reused."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    directory = Path(directory).expanduser()
    record = {"transformer": transformer, "vae": vae, "scheduler": DIT_SCHEDULER, "seed": seed}
    if (directory / RECORD).is_file() and json.loads((directory / RECORD).read_text()) == record:
        return directory
    (directory / RECORD).unlink(missing_ok=True)
    torch.manual_seed(seed)
    pipeline = DiTPipeline(
        transformer=DiTTransformer2DModel(**transformer),
        vae=AutoencoderKL(**vae),
        scheduler=DDIMScheduler(**DIT_SCHEDULER),
    )
    pipeline.save_pretrained(directory)
    (directory / RECORD).write_text(json.dumps(record, indent=2))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="where the pipeline folder goes (model.name_or_path=<it>)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(save_random_pipeline(args.directory, args.seed))


if __name__ == "__main__":
    main()
