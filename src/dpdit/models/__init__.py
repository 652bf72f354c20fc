from dpdit.models.dit import DiT, get_2d_sincos_pos_embed, patchify, unpatchify

__all__ = ["DiT", "get_2d_sincos_pos_embed", "patchify", "unpatchify"]
