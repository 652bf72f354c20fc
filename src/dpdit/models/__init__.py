from dpdit.models.contract import Denoiser
from dpdit.models.dit import DiT, get_2d_sincos_pos_embed, patchify, unpatchify
from dpdit.models.pretrained import FrozenVAE, PretrainedDiT, create_dit, load_vae

__all__ = [
    "DiT",
    "Denoiser",
    "FrozenVAE",
    "PretrainedDiT",
    "create_dit",
    "get_2d_sincos_pos_embed",
    "load_vae",
    "patchify",
    "unpatchify",
]
