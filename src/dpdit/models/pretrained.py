"""diffusers' DiT (e.g. facebook/DiT-XL-2-256) made trainable under Opacus, and its frozen VAE.

`DiTTransformer2DModel` cannot be trained privately as it is: the output layer calls block
0's conditioning embedder a second time (ghost clipping refuses parameter reuse), and every
block draws its own label dropout (so an "unconditional" image is conditional in some
blocks). `PretrainedDiT` runs the same submodules with the same math in its own forward:
each embedder is called once, block 0's conditioning is reused by the output layer, and the
label dropout is drawn once per image by the diffusion loss before the model is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiTTransformer2DModel
from torch import nn

from dpdit.models.dit import DiT, modulate, unpatchify
from dpdit.models.finetune import DIT_RULES, PRETRAINED_RULES, apply_finetune
from dpdit.randomness import tensor_digest

DEFAULT_DIT = "facebook/DiT-XL-2-256"
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
LABELS = ("fresh", "imagenet", "none")


def _missing_weights(setting: str, name: str, subfolder: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{setting}={name!r} is not a local directory and is not in the Hugging Face cache "
        f"(looked for its {subfolder}/ or root config.json), and it could not be downloaded. "
        "On a machine with network access run\n"
        f"    hf download {name}\n"
        "and copy the hub cache (~/.cache/huggingface/hub, or $HF_HOME/hub) to this machine, or save it to a folder:\n"
        f'    python -c "from diffusers import DiffusionPipeline; '
        f"DiffusionPipeline.from_pretrained('{name}').save_pretrained('/path/to/{Path(name).name}')\"\n"
        f"and set {setting}=/path/to/{Path(name).name}. Set HF_HUB_OFFLINE=1 to skip network attempts."
    )


def load_component(
    model_class, name_or_path: str, subfolder: str, setting: str, cache_dir=None, local_files_only=False
):
    """`model_class` from a pipeline (its `subfolder`) or a single model, local or on the hub.

    A local directory is a pipeline if `subfolder/config.json` exists, a model if
    `config.json` does; a hub id is tried as a pipeline first. The hub cache and
    HF_HUB_OFFLINE are honoured by `from_pretrained` itself.
    """
    kwargs = {"cache_dir": cache_dir, "local_files_only": local_files_only}
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        for sub in (subfolder, None):
            if (path / (sub or "") / "config.json").is_file():
                return in_process_memory(model_class.from_pretrained(path, subfolder=sub, **kwargs))
        raise FileNotFoundError(
            f"{setting}={name_or_path!r} holds neither {subfolder}/config.json (a pipeline directory) "
            f"nor config.json (a {model_class.__name__} directory)"
        )
    if name_or_path.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"{setting}={name_or_path!r} is not a directory")
    for sub in (subfolder, None):
        try:
            return in_process_memory(model_class.from_pretrained(name_or_path, subfolder=sub, **kwargs))
        except OSError:
            continue
    raise _missing_weights(setting, name_or_path, subfolder)


def in_process_memory(model: nn.Module) -> nn.Module:
    """`model` with its tensors copied out of the safetensors file they were mapped from.
    Mapped, the system counts their pages as reclaimable (so a memory check sees 3 GB of
    DiT-XL/2 as free) and training writes them copy-on-write, each page becoming process
    memory at the first optimizer step; copied, the model holds what it appears to hold."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    return model


class FrozenVAE:
    """A frozen AutoencoderKL mapping images in [-1, 1] to latents scaled by its scaling
    factor and back. It is not a submodule: it is never trained, never checkpointed with the
    denoiser, and the EMA copy shares it instead of copying it."""

    def __init__(self, autoencoder: AutoencoderKL, name_or_path: str):
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.name_or_path = name_or_path
        config = autoencoder.config
        self.scaling_factor = config.scaling_factor
        self.image_channels = config.in_channels
        self.latent_channels = config.latent_channels
        self.downsampling = 2 ** (len(config.block_out_channels) - 1)

    def __deepcopy__(self, memo) -> FrozenVAE:
        return self

    def latent_size(self, image_size: int) -> int:
        if image_size % self.downsampling:
            raise ValueError(
                f"data.image_size={image_size} is not divisible by the VAE's downsampling factor "
                f"{self.downsampling}: choose a multiple of it"
            )
        return image_size // self.downsampling

    def _on(self, device: torch.device) -> AutoencoderKL:
        return self.autoencoder.to(device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (the posterior mean: deterministic, so cacheable)."""
        return self._on(images.device).encode(images).latent_dist.mean * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1]."""
        return self._on(latents.device).decode(latents / self.scaling_factor).sample.clamp(-1.0, 1.0)

    def fingerprint(self) -> str:
        """Changes whenever the VAE's configuration or weights change."""
        return tensor_digest(
            self.autoencoder.state_dict().items(), header=repr(sorted(dict(self.autoencoder.config).items()))
        )


def load_vae(name_or_path: str, cache_dir=None, local_files_only=False) -> FrozenVAE:
    autoencoder = load_component(
        AutoencoderKL, name_or_path, "vae", "model.vae_name_or_path", cache_dir, local_files_only
    )
    return FrozenVAE(autoencoder, str(name_or_path))


class PretrainedDiT(nn.Module):
    """A diffusers DiT with the interface of `dpdit.models.DiT`: forward(x, t, y) -> tensor.

    Args:
        transformer: the DiTTransformer2DModel (its class table has a null row at index
            `num_embeds_ada_norm`, 1000 for ImageNet, which DiTPipeline hard-codes).
        num_classes: the training data's classes.
        labels: `fresh` gives the data's classes new rows 0..num_classes-1 of every block's
            class table, started at the null row (the unconditional model); `imagenet` maps
            class k onto ImageNet id `class_ids[k]`; `none` trains unconditionally.
        class_ids: ImageNet ids for `labels=imagenet`.
        finetune: what trains (`dpdit.models.finetune`): `full`; `attention` (q, k, v and
            output projections, as DP-LDM); `adaln` (each block's `norm1.linear` and
            `proj_out_1`); `lora` (adapters of rank `lora_rank` and scale `lora_alpha` /
            `lora_rank` on the attention and MLP projections); `frozen_embedders` (all but
            the per-block timestep and class embedders). With `labels=fresh` the class
            tables are always trained: their new rows must learn.
        learn_sigma: also train the variance half of the output with the variational bound;
            otherwise only the epsilon half is trained and the variance half is kept.
        vae: the frozen VAE whose latents the model works on (None: the transformer's inputs).
    """

    def __init__(
        self,
        transformer: DiTTransformer2DModel,
        num_classes: int,
        labels: str = "fresh",
        class_ids: Sequence[int] | None = None,
        finetune: str = "full",
        learn_sigma: bool = False,
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        vae: FrozenVAE | None = None,
    ):
        super().__init__()
        self.vae = vae
        config = transformer.config
        if config.norm_type != "ada_norm_zero" or config.num_embeds_ada_norm is None:
            raise ValueError("model.name_or_path must be a class-conditional DiT (norm_type ada_norm_zero)")
        self.transformer = transformer
        self.in_channels = config.in_channels
        self.out_channels = transformer.out_channels
        self.input_size = config.sample_size
        self.patch_size = config.patch_size
        if learn_sigma and self.out_channels != 2 * self.in_channels:
            raise ValueError(
                "model.learn_sigma=true needs a DiT that outputs a variance (out_channels = 2 x in_channels)"
            )
        self.learn_sigma = learn_sigma
        self.labels = labels
        self.num_classes = 1 if labels == "none" else num_classes
        self.null_class = self.num_classes
        self.register_buffer(
            "table_rows", self._table_rows(num_classes, labels, class_ids, config.num_embeds_ada_norm), persistent=False
        )
        if labels == "fresh":
            self._start_fresh_rows(num_classes)
        apply_finetune(self, PRETRAINED_RULES, finetune, lora_rank, lora_alpha, train_class_tables=labels == "fresh")
        # from_pretrained returns eval mode, Lightning keeps submodules' modes, and Opacus
        # records activations only in train mode.
        self.train()

    @staticmethod
    def _table_rows(num_classes, labels, class_ids, null_row) -> torch.Tensor:
        """Class-table row of each label 0..num_classes (the last being the null class)."""
        if labels not in LABELS:
            raise ValueError(f"model.labels={labels!r} is unknown: choose one of {', '.join(LABELS)}")
        if labels == "none":
            # Unconditional: every label (and every data class) is the null row.
            return torch.full((num_classes + 1,), null_row, dtype=torch.long)
        if labels == "fresh":
            if num_classes > null_row:
                raise ValueError(f"data.num_classes={num_classes} exceeds the class table's {null_row} rows")
            rows = list(range(num_classes))
        else:
            if class_ids is None and num_classes == null_row:
                class_ids = range(null_row)
            if class_ids is None or len(class_ids) != num_classes:
                raise ValueError(
                    f"model.labels=imagenet needs model.class_ids=[...], one class id per data class "
                    f"({num_classes}), got {None if class_ids is None else list(class_ids)}; "
                    "or use model.labels=fresh to learn new classes"
                )
            if any(not 0 <= int(i) < null_row for i in class_ids):
                raise ValueError(f"model.class_ids must lie in [0, {null_row}), got {list(class_ids)}")
            rows = [int(i) for i in class_ids]
        return torch.tensor([*rows, null_row], dtype=torch.long)

    @torch.no_grad()
    def _start_fresh_rows(self, num_classes: int) -> None:
        for table in self.class_tables():
            table.weight[:num_classes] = table.weight[self.table_rows[-1]]

    def class_tables(self) -> list[nn.Embedding]:
        return [block.norm1.emb.class_embedder.embedding_table for block in self.transformer.transformer_blocks]

    def class_embeddings(self, labels: torch.Tensor) -> torch.Tensor:
        """The rows of `labels` in every block's class table, side by side: [n, blocks x width]."""
        return torch.cat([table.weight[self.table_rows[labels]] for table in self.class_tables()], dim=1)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str = DEFAULT_DIT, cache_dir=None, local_files_only=False, **kwargs
    ) -> PretrainedDiT:
        transformer = load_component(
            DiTTransformer2DModel, name_or_path, "transformer", "model.name_or_path", cache_dir, local_files_only
        )
        return cls(transformer, **kwargs)

    @staticmethod
    def _conditioning(block, t: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        embedder = block.norm1.emb
        return embedder.timestep_embedder(embedder.time_proj(t).to(dtype)) + embedder.class_embedder.embedding_table(
            rows
        )

    @staticmethod
    def _block(block, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """BasicTransformerBlock with adaLN-Zero, given its conditioning c."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1.linear(F.silu(c)).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * block.attn1(modulate(block.norm1.norm(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * block.ff(modulate(block.norm3(x), shift_mlp, scale_mlp))

    def sharding_units(self) -> list[nn.Module]:
        """Per block, the pieces `forward` calls (it runs a block's parts, not its forward)."""
        return [
            unit
            for block in self.transformer.transformer_blocks
            for unit in (
                block.norm1.emb.timestep_embedder,
                block.norm1.emb.class_embedder.embedding_table,
                block.norm1.linear,
                block.attn1,
                block.ff,
            )
        ]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] latents, t: [B] timesteps, y: [B] data labels (`null_class` for
        unconditional) -> [B, out_channels, H, W], as DiTTransformer2DModel computes it."""
        transformer = self.transformer
        rows = self.table_rows[y]
        tokens = transformer.pos_embed(x)
        blocks = transformer.transformer_blocks
        # The output layer reuses block 0's conditioning instead of calling its embedder again.
        c0 = self._conditioning(blocks[0], t, rows, tokens.dtype)
        tokens = self._block(blocks[0], tokens, c0)
        for block in blocks[1:]:
            tokens = self._block(block, tokens, self._conditioning(block, t, rows, tokens.dtype))
        shift, scale = transformer.proj_out_1(F.silu(c0)).chunk(2, dim=1)
        tokens = transformer.proj_out_2(modulate(transformer.norm_out(tokens), shift, scale))
        return unpatchify(tokens, self.patch_size, self.out_channels, x.shape[-2], x.shape[-1])

    def pipeline_class_ids(self) -> list[int]:
        """The class id each data class has in an exported DiTPipeline."""
        return self.table_rows[: self.num_classes].tolist()


def create_dit(
    pretrained: bool = False,
    *,
    in_channels: int,
    image_size: int,
    vae_name_or_path: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    finetune: str = "full",
    lora_rank: int = 4,
    lora_alpha: float | None = None,
    **kwargs,
) -> nn.Module:
    """The denoiser for images of `in_channels` x `image_size`^2.

    `pretrained=False` builds dpdit's own DiT (its size arguments in `kwargs`);
    `pretrained=True` loads a diffusers DiT (`name_or_path` and `PretrainedDiT`'s arguments
    in `kwargs`). With `vae_name_or_path` the images are encoded by that frozen VAE and the
    model works on its latents; the VAE rides along as `model.vae` (None without one).
    `finetune`, `lora_rank` and `lora_alpha` choose what trains (`dpdit.models.finetune`).
    """
    tuning = {"finetune": finetune, "lora_rank": lora_rank, "lora_alpha": lora_alpha}
    vae = load_vae(vae_name_or_path, cache_dir, local_files_only) if vae_name_or_path else None
    if vae is not None and in_channels != vae.image_channels:
        raise ValueError(
            f"data.channels={in_channels} but the VAE ({vae.name_or_path}) encodes {vae.image_channels}-channel images"
        )
    channels, size = (vae.latent_channels, vae.latent_size(image_size)) if vae else (in_channels, image_size)
    if pretrained:
        model = PretrainedDiT.from_pretrained(
            cache_dir=cache_dir, local_files_only=local_files_only, vae=vae, **tuning, **kwargs
        )
        if model.in_channels != channels:
            raise ValueError(
                f"the pretrained DiT expects {model.in_channels}-channel latents but gets {channels}-channel "
                f"{'latents' if vae else 'images'}: set model.vae_name_or_path (e.g. {DEFAULT_VAE}) to train on "
                "VAE latents of the images, or use a custom model (model=dit_xl_2 ...) for pixels"
            )
        if model.input_size != size:
            expected_image_size = model.input_size * (vae.downsampling if vae else 1)
            raise ValueError(
                f"the pretrained DiT works on {model.input_size}x{model.input_size} latents "
                f"({expected_image_size} px images) but data.image_size={image_size} "
                f"gives {size}x{size}: set data.image_size={expected_image_size}"
            )
    else:
        model = DiT(input_size=size, in_channels=channels, vae=vae, **kwargs)
        # The class table trains with every choice: fine-tuning onto new data must be able
        # to move the class conditioning.
        apply_finetune(model, DIT_RULES, **tuning, train_class_tables=True)
    return model
