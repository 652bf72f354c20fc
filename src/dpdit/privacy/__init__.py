"""Differential privacy for the training step, one concern per module:

- `mechanisms`: the DP step (`DPSGD`) and its non-private twin (`NonPrivate`), under the
  `Mechanism` protocol the training module uses;
- `accounting`: the epsilon of a history of noisy steps, noise calibration, the run's ledger
  and budget;
- `settings`: the `privacy` config group and the checks that refuse a run before it starts;
- `per_sample`: attaching Opacus, each layer's clipping path, float32 under mixed precision,
  noise multiplicity;
- `bookkeeping`: book-keeping clipping, the one-backward-pass mode.
"""

from dpdit.privacy.accounting import (
    ACCOUNTANTS,
    ESTIMATES,
    History,
    PrivacyLedger,
    calibrate_noise_multiplier,
    epsilon_by_accountant,
    epsilon_of,
    steps_of,
    steps_within_budget,
)
from dpdit.privacy.mechanisms import DPSGD, Mechanism, NonPrivate
from dpdit.privacy.per_sample import clipping_path, gram_matrices_outweigh_gradient
from dpdit.privacy.settings import (
    CLIPPING_MODES,
    PrivacyConfig,
    check_model_is_private,
    check_noise_multiplicity,
    check_parameters_held,
    check_precision,
    check_resumable,
)

__all__ = [
    "ACCOUNTANTS",
    "CLIPPING_MODES",
    "DPSGD",
    "ESTIMATES",
    "History",
    "Mechanism",
    "NonPrivate",
    "PrivacyConfig",
    "PrivacyLedger",
    "calibrate_noise_multiplier",
    "check_model_is_private",
    "check_noise_multiplicity",
    "check_parameters_held",
    "check_precision",
    "check_resumable",
    "clipping_path",
    "epsilon_by_accountant",
    "epsilon_of",
    "gram_matrices_outweigh_gradient",
    "steps_of",
    "steps_within_budget",
]
