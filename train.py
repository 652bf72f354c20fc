"""Train a DiT under differential privacy: `python train.py [hydra overrides]`."""

import hydra
from omegaconf import DictConfig

from dpdit.train import exit_on_config_error, train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    exit_on_config_error(train, cfg)


if __name__ == "__main__":
    main()
