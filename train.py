"""Train a DiT under differential privacy: `python train.py [hydra overrides]`."""

import sys

import hydra
from omegaconf import DictConfig

from dpdit.train import ConfigError, train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except ConfigError as error:
        sys.exit(f"dpdit: {error}")


if __name__ == "__main__":
    main()
