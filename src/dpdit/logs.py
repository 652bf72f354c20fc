"""A run's log: every line the run logs, its libraries' included, goes to the terminal and to
`<job>.log` in the run directory (Hydra's handlers); harmless library notices are silenced
one by one, each with its reason, and everything else stays visible."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

# Loggers that their libraries give a terminal handler of their own at import (before Hydra
# sets up the run's), which keeps their lines out of the run's log file.
LIBRARY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "diffusers")


class ConsoleFormatter(logging.Formatter):
    """Information as it is; warnings and errors with their level and source."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname} {record.name}: {message}"


class DropAdvertisements(logging.Filter):
    """Lightning's "Tip:" lines advertise a hosted service; they say nothing about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


# Notices that say nothing about a run, each silenced by its message, with the reason.
HARMLESS_NOTICES = {
    # Lightning 2.6 reads each training step's output with a torch pytree API that torch
    # deprecated after that release: the result is the same, the notice repeats every fit.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated": FutureWarning,
    # Lightning warns (with a code example) that under manual optimisation a step's
    # checkpoint holds the weights after the optimizer step: for a DP step that is the point
    # where the weights, the optimizer and the accountant's history agree, the one to save.
    "Using ModelCheckpoint with manual optimization and every_n_train_steps": UserWarning,
    # The first layers' inputs (noisy images, timesteps, labels) never require grad; the
    # backward hooks Opacus puts on them are expected to fire on outputs only.
    "Full backward hook is firing when gradients are computed with respect to module outputs": UserWarning,
}


def silence_harmless_notices() -> None:
    for message, category in HARMLESS_NOTICES.items():
        warnings.filterwarnings("ignore", message=message, category=category)


def log_into_run() -> None:
    """Send Lightning's and diffusers' lines and Python warnings through the run's handlers
    (terminal and log file)."""
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    advertisements = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, DropAdvertisements) for f in advertisements.filters):
        advertisements.addFilter(DropAdvertisements())
    logging.captureWarnings(True)
    silence_harmless_notices()


class WandbLogger(LightningWandbLogger):
    """Lightning's W&B logger without the `anonymous` setting it always passes (as None),
    which W&B deprecated and warns about; and with files attached from the run's own files
    folder, which W&B takes as they are instead of linking them with a warning."""

    def __init__(self, **settings):
        super().__init__(**settings)
        self._wandb_init.pop("anonymous", None)

    def attach(self, path: Path) -> None:
        """Attach a copy of `path` (as it is now) to the W&B run."""
        copy = Path(self.experiment.dir) / path.name
        shutil.copyfile(path, copy)
        self.experiment.save(str(copy), base_path=self.experiment.dir, policy="now")


def finish_wandb_runs(loggers: list) -> None:
    """End the W&B runs of these loggers: a W&B run left open in the process would take in
    the next job's logs (Hydra sweeps run their jobs in one process)."""
    for logger in loggers:
        if isinstance(logger, LightningWandbLogger):
            logger.experiment.finish()
