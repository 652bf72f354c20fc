"""Differential privacy for the training step, one concern per module:

- `mechanisms`: the DP step (`DPSGD`) and its non-private twin (`NonPrivate`), phases of one
  `Mechanism` base class the training module uses;
- `accounting`: the epsilon of a history of noisy steps, noise calibration, the run's ledger
  and budget;
- `settings`: the `privacy` config group and the checks that refuse a run before it starts;
- `clipping`: the clipping modes (`hooks`, `ghost`, `functorch`, `bookkeeping`), one module
  each, in one registry.
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
from dpdit.privacy.clipping import CLIPPING, CLIPPING_MODES, clipping_mode, clipping_path
from dpdit.privacy.clipping.base import gram_matrices_outweigh_gradient
from dpdit.privacy.mechanisms import DPSGD, VANILLA, Mechanism, NonPrivate
from dpdit.privacy.settings import (
    NonPrivateConfig,
    PrivacyConfig,
    check_dp_node,
    check_model_is_private,
    check_noise_multiplicity,
    check_parameters_held,
    check_precision,
    check_resumable,
)

__all__ = [
    "ACCOUNTANTS",
    "CLIPPING",
    "CLIPPING_MODES",
    "DPSGD",
    "ESTIMATES",
    "History",
    "Mechanism",
    "NonPrivate",
    "NonPrivateConfig",
    "PrivacyConfig",
    "PrivacyLedger",
    "VANILLA",
    "calibrate_noise_multiplier",
    "check_dp_node",
    "check_model_is_private",
    "check_noise_multiplicity",
    "check_parameters_held",
    "check_precision",
    "check_resumable",
    "clipping_mode",
    "clipping_path",
    "epsilon_by_accountant",
    "epsilon_of",
    "gram_matrices_outweigh_gradient",
    "steps_of",
    "steps_within_budget",
]
