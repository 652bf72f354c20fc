"""Diffusion Transformer (DiT, Peebles & Xie 2023) built for DP-SGD with Opacus.

Follows the official facebookresearch/DiT ``models.py`` with changes that let
Opacus compute per-sample gradients (hooks) and per-sample gradient norms
(ghost clipping) for every parameter:

* the patch embedding is patchify + ``nn.Linear`` instead of a strided Conv2d;
* attention is a plain qkv/proj ``nn.Linear`` pair around
  ``F.scaled_dot_product_attention`` (no ``nn.MultiheadAttention``);
* LayerNorms have no affine parameters, so every trainable module is an
  ``nn.Linear`` applied to 2-D or 3-D inputs or an ``nn.Embedding``, each called
  exactly once per forward;
* the position embedding is a fixed, non-persistent buffer;
* no label dropout inside the model: for classifier-free guidance the caller
  replaces labels by ``null_class``, so forward is deterministic.

With ``mlp_ratio=4`` and ``timestep_convention="diffusers"`` the model computes exactly what
diffusers' ``DiTTransformer2DModel`` computes, and exports as a ``DiTPipeline``
(``dpdit.export``).

Two optional additions from U-ViT (Bao et al., 2023), for small models and short runs:
``long_skips`` joins each block of the first half to its mirror in the second half (a
Linear of the two concatenated token streams), and ``output_conv`` adds a 3x3 convolution
over the unpatchified output, which smooths the seams between patches. Both stay per-sample
differentiable; a model with them has no DiTPipeline form.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from dpdit.models.pretrained import FrozenVAE


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C]; patches in row-major order, each flattened as (p, p, C)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, channels: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``patchify``: [B, (h/p)*(w/p), p*p*channels] -> [B, channels, h, w] (h, w in pixels)."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h // p, w // p, p, p, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, h, w)


def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, embed_dim]: sin in the first half, cos in the second."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1, 1).double() * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding of MAE/DiT: [grid_size**2, embed_dim] float32.

    Tokens are in row-major order; the first half of each vector encodes the
    column, the second half the row (as ``np.meshgrid(grid_w, grid_h)`` in MAE).
    """
    if embed_dim % 4 != 0:
        raise ValueError(
            f"position embedding size {embed_dim} is not divisible by 4: choose model.hidden_size divisible by 4"
        )
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")
    emb_w = get_1d_sincos_pos_embed(embed_dim // 2, grid_w)
    emb_h = get_1d_sincos_pos_embed(embed_dim // 2, grid_h)
    return torch.cat([emb_w, emb_h], dim=1).float()


#################################################################################
#               Embedding Layers for Patches, Timesteps and Class Labels        #
#################################################################################


class PatchEmbed(nn.Module):
    """Image to patch tokens: patchify, then a linear map (equivalent to a stride-p Conv2d)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * patch_size * patch_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(patchify(x, self.patch_size))


# How the timestep frequencies exp(-ln(max_period) * i / (half - shift)) are spaced: the
# official DiT divides by half, diffusers' DiTTransformer2DModel (Timesteps with
# downscale_freq_shift=1) by half - 1.
TIMESTEP_FREQUENCY_SHIFTS = {"dit": 0, "diffusers": 1}


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vector representations; `convention` is a key of
    `TIMESTEP_FREQUENCY_SHIFTS`."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, convention: str = "dit"):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.frequency_shift = TIMESTEP_FREQUENCY_SHIFTS[convention]

    @staticmethod
    def timestep_embedding(
        t: torch.Tensor, dim: int, max_period: int = 10000, frequency_shift: int = 0
    ) -> torch.Tensor:
        """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps t [B];
        max_period sets the lowest frequency."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - frequency_shift)
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size, frequency_shift=self.frequency_shift)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Embeds class labels; row ``num_classes`` is the null (unconditional) class for CFG."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention from two Linears and a parameter-free attention kernel."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, head_dim]
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden_size)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN-modulated norm, then a linear map to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SkipJoin(nn.Module):
    """U-ViT's long skip: a block's input joined with the output of its mirror block."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(2 * hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([x, skip], dim=-1))


class OutputConv(nn.Module):
    """A 3x3 convolution added to the unpatchified output; zero at initialisation."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone.

    ``learn_sigma`` doubles the output channels (epsilon, then the variance interpolation
    of Improved DDPM). ``label_embedding_std`` is the class table's initial scale: the
    official 0.02 suits long runs, short runs learn conditioning faster with larger values.
    ``timestep_convention`` spaces the timestep frequencies as the official DiT (``dit``) or
    as diffusers' DiTTransformer2DModel (``diffusers``, which an exact DiTPipeline export needs).
    ``long_skips`` and ``output_conv`` are U-ViT's additions (module docstring). ``vae``: the
    frozen VAE whose latents the model works on (None: pixels).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        label_embedding_std: float = 0.02,
        timestep_convention: str = "dit",
        long_skips: bool = False,
        output_conv: bool = False,
        vae: FrozenVAE | None = None,
    ):
        super().__init__()
        # the frozen VAE whose latents the model works on (not a submodule); None: pixels
        self.vae = vae
        if in_channels < 1:
            raise ValueError(f"model in_channels is {in_channels}: set data.channels to at least 1")
        if patch_size < 1 or input_size < 1 or input_size % patch_size != 0:
            raise ValueError(
                f"model input size {input_size} is not divisible by patch size {patch_size}: "
                "choose data.image_size divisible by model.patch_size"
            )
        if num_heads < 1 or hidden_size % num_heads != 0:
            raise ValueError(
                f"model hidden_size {hidden_size} is not divisible by num_heads {num_heads}: "
                "choose model.hidden_size divisible by model.num_heads"
            )
        if num_classes < 1:
            raise ValueError(f"model num_classes is {num_classes}: set data.num_classes to at least 1")
        if timestep_convention not in TIMESTEP_FREQUENCY_SHIFTS:
            raise ValueError(
                f"model.timestep_convention={timestep_convention!r} is unknown: choose dit (the official "
                "DiT's timestep frequencies) or diffusers (diffusers' DiTTransformer2DModel's, needed to "
                "export the model as a DiTPipeline)"
            )
        self.input_size = input_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.timestep_convention = timestep_convention
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.null_class = num_classes
        self.label_embedding_std = label_embedding_std

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, convention=timestep_convention)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        pos_embed = get_2d_sincos_pos_embed(hidden_size, input_size // patch_size)
        self.register_buffer("pos_embed", pos_embed.unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()
        # made after initialize_weights: the skip joins keep PyTorch's default init, the conv its zeros
        self.skip_joins = nn.ModuleList([SkipJoin(hidden_size) for _ in range(depth // 2)]) if long_skips else None
        self.output_conv = OutputConv(self.out_channels) if output_conv else None

    def initialize_weights(self) -> None:
        # Xavier-uniform Linears with zero bias; this covers the patch embedding,
        # initialised like the official DiT's flattened Conv2d weight.
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=self.label_embedding_std)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def sharding_units(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] images or latents, t: [B] timesteps, y: [B] labels
        (``null_class`` for unconditional) -> [B, out_channels, H, W]."""
        if x.shape[1:] != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(
                f"model expects inputs of shape [B, {self.in_channels}, {self.input_size}, "
                f"{self.input_size}], got {list(x.shape)}: check data.channels and data.image_size"
            )
        x = self.x_embedder(x) + self.pos_embed  # [B, L, D]
        c = self.t_embedder(t) + self.y_embedder(y)  # [B, D]
        joins = len(self.skip_joins) if self.skip_joins is not None else 0
        skips = []
        for index, block in enumerate(self.blocks):
            if index >= len(self.blocks) - joins:  # the second half: join the mirror block's output
                x = self.skip_joins[index - (len(self.blocks) - joins)](x, skips.pop())
            x = block(x, c)
            if index < joins:
                skips.append(x)
        x = self.final_layer(x, c)  # [B, L, p*p*out_channels]
        x = unpatchify(x, self.patch_size, self.out_channels, self.input_size, self.input_size)
        return self.output_conv(x) if self.output_conv is not None else x

    def class_embeddings(self, labels: torch.Tensor) -> torch.Tensor:
        """The class-table rows of `labels`, [n, hidden_size]."""
        return self.y_embedder.embedding_table.weight[labels]
