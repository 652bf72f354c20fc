"""`python train.py`: build the run (`dpdit.build`), fit, and report the privacy spent.

The run's outputs (last checkpoint, privacy report, samples, the exported pipeline) are
written by its callbacks (`dpdit.callbacks`)."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from dpdit.build import setup
from dpdit.logs import finish_wandb_runs

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train as configured; returns the privacy report."""
    trainer, module, datamodule = setup(cfg, train_public_stage=train)
    log.info("%s; writing into %s", module.privacy.describe(), cfg.paths.output_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    finish_wandb_runs(trainer.loggers)
    report = module.privacy.report()
    if report["enabled"]:
        log.info(
            "spent epsilon %.4g (%s, delta %g) in %d steps",
            report["epsilon"],
            report["accountant"],
            report["delta"],
            report["steps"],
        )
    return report
