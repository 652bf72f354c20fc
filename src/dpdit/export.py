"""Export a trained DiT as a diffusers `DiTPipeline` directory (EMA weights, VAE, scheduler).

At the end of training the `ExportPipeline` callback writes `<run>/pipeline`; from a
checkpoint:

    python -m dpdit.export outputs/2026-11-22/12-00-00 [--ckpt PATH] [--output DIR]

rebuilds the run's model from the configuration stored in the checkpoint (as
`python -m dpdit.sample` does) and exports the checkpoint's EMA.
Both a fine-tuned diffusers DiT (`model=pretrained`) and dpdit's own DiT export; LoRA
adapters are merged into their base weights. dpdit's DiT becomes a `DiTTransformer2DModel`
that computes exactly what it computed, which needs `model.mlp_ratio=4.0` and
`model.timestep_convention=diffusers` (the `dit_*` model configs' settings); its classes
keep their ids 0..K-1 and its null class becomes id 1000, which `DiTPipeline` hard-codes.
`pipeline.labels` maps the training data's class names to the ids to pass as `class_labels`.

A latent model's folder loads with `diffusers.DiTPipeline.from_pretrained(DIR)`.

A pixel-space model (no VAE, e.g. the 8x8 digits) gets the same folder without `vae/`
(`model_index.json` says `"vae": [null, null]`). `DiTPipeline` has no optional components,
so it loads only with `DiTPipeline.from_pretrained(DIR, vae=None)`, and its `__call__`
always decodes with the VAE whatever `output_type`, so sample with its transformer and
scheduler (which clips like dpdit's pixel-space sampling):

    pipe = DiTPipeline.from_pretrained(DIR, vae=None)
    labels = torch.tensor(pipe.get_label_ids(["3", "7"]))
    null, config = torch.full_like(labels, 1000), pipe.transformer.config
    x = torch.randn(len(labels), config.in_channels, config.sample_size, config.sample_size)
    pipe.scheduler.set_timesteps(50)
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            eps = pipe.transformer(torch.cat([x, x]), t.expand(2 * len(x)), torch.cat([labels, null])).sample
            cond, uncond = eps[:, : config.in_channels].chunk(2)
            x = pipe.scheduler.step(uncond + 2.0 * (cond - uncond), t, x).prev_sample
    images = (x + 1) / 2  # in [0, 1]

or sample the checkpoint with `python -m dpdit.sample ckpt_path=<run>/checkpoints/last.ckpt`.
The folder's transformer also loads as a pretrained model to fine-tune:
`model=pretrained model.name_or_path=DIR model.vae_name_or_path=null`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import DiTPipeline, DiTTransformer2DModel
from hydra.utils import instantiate

from dpdit.checkpoints import EMA_PREFIX, last_checkpoint, model_of, read_checkpoint, weights_under
from dpdit.diffusion import GaussianDiffusion
from dpdit.models.dit import DiT
from dpdit.models.finetune import is_adapter
from dpdit.models.pretrained import PretrainedDiT

# DiTPipeline hard-codes the null class id 1000 (ImageNet's classes are 0..999).
PIPELINE_NULL_CLASS = 1000
# dpdit's Linears -> DiTTransformer2DModel's: inside each block, the timestep MLP (shared
# in dpdit, copied into every block), and the output layer.
BLOCK_LINEARS = {
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm1.linear",
}
TIMESTEP_LINEARS = {
    "t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
}
OUTPUT_LINEARS = {"final_layer.adaLN_modulation.1": "proj_out_1", "final_layer.linear": "proj_out_2"}


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights named and valued as in the model without LoRA: each peft LoRA
    layer's active adapters are merged into its base weight (W + B A * scaling, computed
    here, the model is left as it is) and its adapter weights are dropped."""
    state = model.state_dict()
    if not any(is_adapter(name) for name in state):
        return state
    # peft pulls in transformers (seconds to import): only for a model with adapters
    from peft.tuners.lora import LoraLayer

    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            prefix = f"{name}."
            for key in [key for key in state if key.startswith(prefix)]:
                del state[key]
            state.update({prefix + key: value for key, value in layer.get_base_layer().state_dict().items()})
            state[prefix + "weight"] = merged_weight(layer)
    return state


@torch.no_grad()
def merged_weight(layer) -> torch.Tensor:
    """The weight a peft LoRA layer's forward applies: its base weight plus the active
    adapters not merged into it yet."""
    weight = layer.get_base_layer().weight.detach().clone()
    for adapter in layer.active_adapters:
        if adapter in layer.merged_adapters or not (adapter in layer.lora_A or adapter in layer.lora_embedding_A):
            continue
        if layer.use_dora.get(adapter) or layer.lora_bias.get(adapter):
            raise ValueError(f"LoRA adapter {adapter!r} uses DoRA or lora_bias: only plain LoRA adapters are merged")
        weight += layer.get_delta_weight(adapter).to(weight.dtype)
    return weight


def why_not_exportable(model: torch.nn.Module) -> str | None:
    """Why `model` has no exact DiTPipeline form, with the settings to change (None: it has one)."""
    if isinstance(model, PretrainedDiT):
        return None
    if not isinstance(model, DiT):
        return f"a {type(model).__name__} is neither dpdit's DiT nor a diffusers DiT"
    fixes = []
    if int(model.hidden_size * model.mlp_ratio) != 4 * model.hidden_size:
        fixes.append(
            f"model.mlp_ratio={model.mlp_ratio:g} (diffusers' DiT has MLPs 4 x hidden_size wide: "
            "train with model.mlp_ratio=4.0)"
        )
    if model.timestep_convention != "diffusers":
        fixes.append(
            f"model.timestep_convention={model.timestep_convention} (diffusers' DiT spaces the timestep "
            "frequencies its own way: train with model.timestep_convention=diffusers)"
        )
    if model.num_classes > PIPELINE_NULL_CLASS:
        fixes.append(
            f"model.num_classes={model.num_classes} (DiTPipeline's null class is id {PIPELINE_NULL_CLASS}: "
            f"at most {PIPELINE_NULL_CLASS} classes fit)"
        )
    for option, layers in (("long_skips", model.skip_joins), ("output_conv", model.output_conv)):
        if layers is not None:
            fixes.append(f"model.{option}=true (diffusers' DiT has no such layer: train with model.{option}=false)")
    if not fixes:
        return None
    return "this DiT has no exact DiTPipeline form: " + "; ".join(fixes)


def exportable(model: torch.nn.Module) -> bool:
    """Whether `model` has an exact DiTPipeline form."""
    return why_not_exportable(model) is None


def _renamed(state: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """The weights and biases of the Linears `names` maps (ours -> theirs), under their names."""
    return {
        f"{theirs}.{kind}": state[f"{ours}.{kind}"] for ours, theirs in names.items() for kind in ("weight", "bias")
    }


def pipeline_class_table(table: torch.Tensor, num_classes: int) -> torch.Tensor:
    """dpdit's class table (classes 0..K-1, then the null row) as DiTPipeline indexes it:
    the classes in rows 0..K-1, the null row at PIPELINE_NULL_CLASS and in every unused row."""
    rows = table[num_classes].repeat(PIPELINE_NULL_CLASS + 1, 1)
    rows[:num_classes] = table[:num_classes]
    return rows


def _transformer_config(model: DiT) -> dict:
    return {
        "num_attention_heads": model.num_heads,
        "attention_head_dim": model.hidden_size // model.num_heads,
        "in_channels": model.in_channels,
        # stated even without learned sigma: DiTPipeline reads out_channels // 2
        "out_channels": model.out_channels,
        "num_layers": len(model.blocks),
        "sample_size": model.input_size,
        "patch_size": model.patch_size,
        "num_embeds_ada_norm": PIPELINE_NULL_CLASS,
        # dpdit's LayerNorms all use 1e-6; diffusers' default 1e-5 would change each MLP's norm
        "norm_eps": 1e-6,
    }


def _transformer_weights(model: DiT, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p, channels, width = model.patch_size, model.in_channels, model.hidden_size
    weights = {
        # patchify flattens a patch as (p, p, C); the Conv2d weight is [D, C, p, p]
        "pos_embed.proj.weight": state["x_embedder.proj.weight"].reshape(width, p, p, channels).permute(0, 3, 1, 2),
        "pos_embed.proj.bias": state["x_embedder.proj.bias"],
        **_renamed(state, OUTPUT_LINEARS),
    }
    class_table = pipeline_class_table(state["y_embedder.embedding_table.weight"], model.num_classes)
    for i in range(len(model.blocks)):
        block = f"transformer_blocks.{i}."
        weights.update(
            _renamed(state, {f"blocks.{i}.{ours}": block + theirs for ours, theirs in BLOCK_LINEARS.items()})
        )
        weights.update(_renamed(state, {ours: block + theirs for ours, theirs in TIMESTEP_LINEARS.items()}))
        weights[block + "norm1.emb.class_embedder.embedding_table.weight"] = class_table
        for kind in ("weight", "bias"):
            # qkv's output rows are q, then k, then v
            for name, part in zip(("to_q", "to_k", "to_v"), state[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)):
                weights[f"{block}attn1.{name}.{kind}"] = part
    return weights


def diffusers_transformer(model: torch.nn.Module) -> DiTTransformer2DModel:
    """`model` as a DiTTransformer2DModel (on the CPU, in the model's precision) that
    computes what it computes, LoRA adapters merged."""
    reason = why_not_exportable(model)
    if reason is not None:
        raise ValueError(reason)
    state = plain_state_dict(model)
    if isinstance(model, PretrainedDiT):
        config, weights = (
            model.transformer.config,
            {key.removeprefix("transformer."): value for key, value in state.items()},
        )
    else:
        config, weights = _transformer_config(model), _transformer_weights(model, state)
    # Module.type casts as .to does, without diffusers' warning about float32-only modules
    transformer = DiTTransformer2DModel.from_config(config).type(next(model.parameters()).dtype)
    transformer.load_state_dict(weights)
    return transformer.eval()


def _pipeline_class_ids(model: torch.nn.Module) -> list[int] | None:
    """The DiTPipeline class id of each data class (None: an unconditional model)."""
    if isinstance(model, PretrainedDiT):
        return None if model.labels == "none" else model.pipeline_class_ids()
    return list(range(model.num_classes))


def export_pipeline(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    directory: str | Path,
    class_names: list[str],
    sampler: str = "ddim",
) -> Path:
    """Save `model` as a DiTPipeline in `directory`: its diffusers transformer, its VAE (none
    in pixel space) and a `sampler` scheduler of the training noise schedule."""
    transformer = diffusers_transformer(model)
    vae = None if model.vae is None else model.vae.autoencoder
    scheduler = diffusion.sampling_scheduler(sampler, pixel_space=vae is None)
    pipeline = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    class_ids = _pipeline_class_ids(model)
    if class_ids is not None:
        pipeline.register_to_config(id2label=dict(zip(class_ids, class_names)))
    with _no_missing_vae_warning():
        pipeline.save_pretrained(directory)
    return Path(directory)


@contextmanager
def _no_missing_vae_warning():
    """A pixel-space pipeline has no VAE by design; diffusers warns that `vae=None` "cannot be
    saved" while writing `"vae": [null, null]` as intended. Other warnings pass."""
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("self.vae=None ")

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def ema_state(checkpoint_path: str | Path) -> dict[str, torch.Tensor]:
    """The EMA weights of a training checkpoint, keyed as the model's own state_dict."""
    return weights_under(read_checkpoint(str(checkpoint_path), "--ckpt"), EMA_PREFIX)


def export_run(run_dir: str | Path, checkpoint: str | Path | None = None, output: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    checkpoint = Path(checkpoint or last_checkpoint(run_dir))
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint} not found: pass the directory of a training run, or --ckpt")
    output = Path(output or run_dir / "pipeline")
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty: pass another --output")
    # the model and data as trained: the run configuration stored in the checkpoint
    model, cfg = model_of(checkpoint, "--ckpt")
    datamodule = instantiate(cfg.data)
    return export_pipeline(model, instantiate(cfg.diffusion), output, datamodule.class_names, cfg.sample.scheduler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dpdit.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the training run's directory (holds checkpoints/last.ckpt)")
    parser.add_argument("--ckpt", help="checkpoint to export (default: RUN_DIR/checkpoints/last.ckpt)")
    parser.add_argument("--output", help="pipeline directory to write (default: RUN_DIR/pipeline)")
    args = parser.parse_args(argv)
    try:
        print(export_run(args.run_dir, args.ckpt, args.output))
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        sys.exit(f"dpdit.export: {error}")


if __name__ == "__main__":
    main()
