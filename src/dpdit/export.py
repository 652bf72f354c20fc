"""Export a fine-tuned diffusers DiT as a `DiTPipeline` directory (EMA weights, VAE, scheduler).

At the end of training the `ExportPipeline` callback writes `<run>/pipeline`; from a
checkpoint:

    python -m dpdit.export outputs/2026-11-22/12-00-00 [--ckpt PATH] [--output DIR]

rebuilds the run's model from its saved Hydra config and exports the checkpoint's EMA.
The result loads with `diffusers.DiTPipeline.from_pretrained(DIR)`; `pipeline.labels`
maps the training data's class names to the class ids to pass as `class_labels`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import DiTPipeline
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dpdit.diffusion import SAMPLERS, GaussianDiffusion
from dpdit.models.pretrained import PretrainedDiT
from dpdit.train import read_checkpoint, weights_under


def exportable(model) -> bool:
    """Whether `model` has a DiTPipeline form: a diffusers DiT with its VAE."""
    return isinstance(model, PretrainedDiT) and model.vae is not None


def export_pipeline(
    model: PretrainedDiT, diffusion: GaussianDiffusion, directory: str | Path, class_names: list[str], sampler: str = "ddim"
) -> Path:
    """Save `model` (its diffusers transformer), its VAE and a `sampler` scheduler of the
    training noise schedule as a DiTPipeline in `directory`."""
    if not exportable(model):
        raise ValueError("only a pretrained DiT with a VAE (model=pretrained) exports as a DiTPipeline")
    scheduler = SAMPLERS[sampler].from_config(diffusion.scheduler.config, clip_sample=False)
    pipeline = DiTPipeline(transformer=model.transformer, vae=model.vae.autoencoder, scheduler=scheduler)
    if model.labels != "none":
        pipeline.register_to_config(id2label=dict(zip(model.pipeline_class_ids(), class_names)))
    pipeline.save_pretrained(directory)
    return Path(directory)


def ema_state(checkpoint_path: str | Path) -> dict[str, torch.Tensor]:
    """The EMA weights of a training checkpoint, keyed as the model's own state_dict."""
    return weights_under(read_checkpoint(str(checkpoint_path), "--ckpt"), "ema.module.")


def export_run(run_dir: str | Path, checkpoint: str | Path | None = None, output: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    config_path = run_dir / ".hydra" / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: pass the directory of a training run")
    checkpoint = Path(checkpoint or run_dir / "checkpoints" / "last.ckpt")
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint} not found: pass --ckpt")
    output = Path(output or run_dir / "pipeline")
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty: pass another --output")
    cfg = OmegaConf.load(config_path)
    model = instantiate(cfg.model)
    model.load_state_dict(ema_state(checkpoint))
    datamodule = instantiate(cfg.data)
    return export_pipeline(model, instantiate(cfg.diffusion), output, datamodule.class_names, cfg.sample.scheduler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dpdit.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the training run's directory (holds .hydra/config.yaml)")
    parser.add_argument("--ckpt", help="checkpoint to export (default: RUN_DIR/checkpoints/last.ckpt)")
    parser.add_argument("--output", help="pipeline directory to write (default: RUN_DIR/pipeline)")
    args = parser.parse_args(argv)
    try:
        print(export_run(args.run_dir, args.ckpt, args.output))
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        sys.exit(f"dpdit.export: {error}")


if __name__ == "__main__":
    main()
