"""Train a DiT under differential privacy: `python train.py [hydra overrides]`."""

from omegaconf import DictConfig

from dpdit.cli import command
from dpdit.train import train


@command("train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
