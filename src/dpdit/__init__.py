"""dpdit: train and fine-tune Diffusion Transformers under differential privacy."""

__version__ = "0.1.0"
