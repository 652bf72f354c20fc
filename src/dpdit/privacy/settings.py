"""The `privacy` settings and every check that refuses a run before it starts: unknown or
out-of-range settings, precisions and models under which a DP step is not exact, and
checkpoints whose privacy history cannot be continued.

Each `privacy` node builds its own settings class: `privacy=dp` a `PrivacyConfig` (DP-SGD),
`privacy=none` a `NonPrivateConfig` (the non-private baseline). Both answer what building a
run asks of them (`poisson_sampling`, `clipping`, `randomness`, the checks), so the run is
built one way for both; `enabled` names which in the resolved config and on dashboards."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from hydra.utils import instantiate
from opacus.validators import ModuleValidator

from dpdit.privacy.accounting import ACCOUNTANTS, ESTIMATES
from dpdit.privacy.clipping import CLIPPING, clipping_mode
from dpdit.randomness import PrivateRandomness

log = logging.getLogger(__name__)

# What an init_ckpt_path checkpoint was trained on: this run's data (its privacy history
# counts towards this run's epsilon) or data disjoint from it (its history does not).
INIT_DATA = ("same", "disjoint")
# What the dashboard gets of each DP step: private (the clipped loss sum and the clipped count,
# with Gaussian noise, in the accountant's history), nonprivate (exact values, not covered by
# the guarantee) or off (nothing from the private data).
STATISTICS = ("private", "nonprivate", "off")
# how many statistics a private step releases: the clipped loss sum and the clipped count
RELEASED_STATISTICS = 2
# Trainer precisions under which a DP step stays exact. Mixed precision is "bf16-mixed"
# only: float16 scales the loss (clipping would bound the scaled gradients), "-true" modes
# hold weights, clipped sums and noise in low precision.
DP_PRECISIONS = ("32-true", "32", "64-true", "64", "bf16-mixed")


def check_enabled(enabled: bool, expected: bool) -> None:
    if enabled != expected:
        node = "dp" if enabled else "none"
        raise ValueError(f"privacy.enabled={str(enabled).lower()} contradicts the privacy node: choose privacy={node}")


class NonPrivateConfig:
    """`privacy=none`: training without privacy, with the same model, loss and micro-batches,
    no clipping, noise or accounting. Its batches are shuffled, of fixed size, from the seed.

    A prior or an experiment may set DP-SGD's settings for its DP fine-tuning (the default
    prior sets privacy.max_grad_norm and init_data); without privacy they act on nothing, and
    the run's log says so. A name DP-SGD does not know is refused."""

    poisson_sampling: ClassVar[bool] = False
    clipping: ClassVar[None] = None

    def __init__(self, enabled: bool = False, **dp_settings: Any):
        self.enabled = enabled
        self.unused = dp_settings

    def validate(self, dataset_size: int) -> None:
        check_enabled(self.enabled, False)
        known = {field.name for field in fields(PrivacyConfig)}
        for name in self.unused:
            if name not in known:
                raise ValueError(
                    f"privacy.{name} is not a setting: privacy=none takes none, privacy=dp takes {sorted(known)}"
                )
        if self.unused:
            log.info("privacy=none: %s (DP-SGD's) act on nothing", ", ".join(f"privacy.{name}" for name in self.unused))

    def check_precision(self, precision: str) -> None:
        """Any precision Lightning runs."""

    def check_model(self, model: torch.nn.Module) -> None:
        """Any model: no per-sample gradients are needed."""

    def check_sharding(self) -> None:
        """Any model: FSDP sums the gradients itself."""

    def randomness(self, seed: int) -> PrivateRandomness:
        return PrivateRandomness.create(secret=False, seed=seed)


@dataclass
class PrivacyConfig:
    """`privacy=dp`: DP-SGD's settings. `noise_multiplier: null` calibrates it to the target."""

    poisson_sampling: ClassVar[bool] = True
    enabled: bool = True
    target_epsilon: float | None = 10.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    accountant: str = "pld"
    clipping: str = "bookkeeping"
    noise_multiplicity: int = 1
    secure_mode: bool = True
    init_data: str = "same"
    statistics: str = "private"
    statistics_noise: float = 12.0
    loss_bound: float = 1.0
    adaptive_clipping: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2

    @property
    def statistics_factor(self) -> float:
        """sigma / sigma_eff: with the statistics released at `statistics_noise` x sigma each, the
        step is one Gaussian mechanism of noise multiplier sigma_eff = (sigma^-2 + 2 (r
        sigma)^-2)^(-1/2) = sigma / sqrt(1 + 2 / r^2) (Andrew et al., 2021, for the count)."""
        if self.statistics != "private":
            return 1.0
        return math.sqrt(1.0 + RELEASED_STATISTICS / self.statistics_noise**2)

    def effective_noise_multiplier(self, noise_multiplier: float) -> float:
        """The accountant's sigma for a step whose gradients get `noise_multiplier`."""
        return noise_multiplier / self.statistics_factor

    def gradient_noise_multiplier(self, effective: float) -> float:
        """The gradients' sigma that, with the statistics, makes the step's sigma at least
        `effective` (rounding may not take it below: the budget is checked at that sigma)."""
        sigma = effective * self.statistics_factor
        while self.effective_noise_multiplier(sigma) < effective:
            sigma = math.nextafter(sigma, math.inf)
        return sigma

    def validate(self, dataset_size: int) -> None:
        """Raise a ValueError naming the setting for every invalid choice."""
        check_enabled(self.enabled, True)
        if self.accountant in ESTIMATES:
            raise ValueError(
                f"privacy.accountant={self.accountant} is a central-limit approximation, not an upper "
                "bound: it can report far less than the epsilon spent (up to 80% below PLD), so it may "
                "not calibrate the noise or enforce the budget. Use privacy.accountant=pld (tightest), "
                "prv or rdp; the report shows gdp's estimate beside them"
            )
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(
                f"privacy.accountant={self.accountant!r} is unknown: choose one of {', '.join(ACCOUNTANTS)}"
            )
        clipping_mode(self.clipping)
        if self.max_grad_norm is None or self.max_grad_norm <= 0:
            raise ValueError(f"privacy.max_grad_norm={self.max_grad_norm} must be a positive clipping bound")
        if not 0.0 < self.delta < 1.0 / dataset_size:
            raise ValueError(
                f"privacy.delta={self.delta:g} must lie in (0, 1/N) = (0, {1.0 / dataset_size:.3g}) for "
                f"N={dataset_size} training images; the usual choice is below 1/N, e.g. 1e-5"
            )
        if self.noise_multiplier is None:
            if self.target_epsilon is None or self.target_epsilon <= 0:
                raise ValueError(
                    f"privacy.target_epsilon={self.target_epsilon} must be positive "
                    "(or give privacy.noise_multiplier directly)"
                )
        elif self.noise_multiplier < 0:
            raise ValueError(f"privacy.noise_multiplier={self.noise_multiplier} must be >= 0 (or null to calibrate)")
        if self.init_data not in INIT_DATA:
            raise ValueError(f"privacy.init_data={self.init_data!r} is unknown: choose one of {', '.join(INIT_DATA)}")
        check_noise_multiplicity(self.noise_multiplicity)
        if self.statistics not in STATISTICS:
            raise ValueError(
                f"privacy.statistics={self.statistics!r} is unknown: choose one of {', '.join(STATISTICS)}"
            )
        if self.statistics == "private" and not self.statistics_noise > 0:
            raise ValueError(
                f"privacy.statistics_noise={self.statistics_noise} must be positive: each released statistic's "
                "noise multiplier, as a multiple of the gradients' (or privacy.statistics=off)"
            )
        if self.adaptive_clipping and self.statistics != "private":
            raise ValueError(
                f"privacy.adaptive_clipping=true with privacy.statistics={self.statistics}: the bound follows the "
                "released (private) clipped count; set privacy.statistics=private"
            )
        if self.adaptive_clipping and not (0 < self.target_quantile < 1 and self.clip_learning_rate > 0):
            raise ValueError(
                f"privacy.target_quantile={self.target_quantile} must lie in (0, 1) and privacy.clip_learning_rate="
                f"{self.clip_learning_rate} be positive"
            )
        if self.statistics == "private" and not self.loss_bound > 0:
            raise ValueError(
                f"privacy.loss_bound={self.loss_bound} must be positive: each image's loss is clipped to it"
            )

    def check_precision(self, precision: str) -> None:
        check_precision(precision, self.clipping)

    def check_model(self, model: torch.nn.Module) -> None:
        check_model_is_private(model, self.clipping)

    def check_sharding(self) -> None:
        check_sharding(self.clipping)

    def randomness(self, seed: int) -> PrivateRandomness:
        """Where a new run's batches and noise come from: a secret key with `secure_mode` (a
        resumed run then takes its checkpoint's), the seed otherwise."""
        if not self.secure_mode:
            log.warning(
                "privacy.secure_mode=false: batch membership and noise are derived from seed=%d; anyone "
                "with the config can regenerate the noise, so this run is not a private release",
                seed,
            )
        return PrivateRandomness.create(secret=self.secure_mode, seed=seed)


def check_dp_node(node: Any, command: str) -> None:
    """Refuse `command`, which compares DP-SGD's clipping modes under the `privacy` node's
    settings, when the node is `privacy=none` (it has none of them)."""
    if not isinstance(instantiate(node), PrivacyConfig):
        raise ValueError(
            f"{command} reads DP-SGD's settings (privacy.clipping, privacy.noise_multiplicity, ...), which "
            "privacy=none does not have: leave privacy=dp (the non-private step is its vanilla row)"
        )


def check_noise_multiplicity(draws: Any) -> None:
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(
            f"privacy.noise_multiplicity={draws} must be a whole number >= 1: the "
            "noise draws averaged per image before clipping (1: one draw, plain DP-SGD)"
        )


def check_precision(precision: str, clipping: str) -> None:
    """Fail before training for a trainer precision under which DP-SGD is not exact."""
    precision = str(precision)
    if precision not in DP_PRECISIONS:
        raise ValueError(
            f"trainer.precision={precision} is not supported with privacy=dp: use 32-true, or "
            "bf16-mixed on GPUs (per-sample gradients, clipping and noise then stay in float32)"
        )
    refusal = clipping_mode(clipping).bf16_refusal
    if precision == "bf16-mixed" and refusal is not None:
        exact = " or ".join(name for name, mode in CLIPPING.items() if mode.bf16_refusal is None)
        raise ValueError(
            f"trainer.precision=bf16-mixed with privacy.clipping={clipping}: {refusal}. Use "
            f"privacy.clipping={exact} (norms, clipping and sums in float32) or trainer.precision=32-true"
        )


def check_sharding(clipping: str) -> None:
    """Fail before training for a clipping mode that cannot train sharded parameters."""
    refusal = clipping_mode(clipping).sharding_refusal
    if refusal is not None:
        able = " or ".join(name for name, mode in CLIPPING.items() if mode.sharding_refusal is None)
        raise ValueError(
            f"trainer=fsdp with privacy.clipping={clipping}: {refusal}. Use privacy.clipping={able}, or trainer=ddp"
        )


def check_model_is_private(model: torch.nn.Module, clipping: str) -> None:
    """Fail before training if Opacus cannot compute per-sample gradients of `model`."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(
            f"privacy.clipping={clipping}: the model has layers Opacus cannot train privately: "
            + "; ".join(str(e) for e in errors)
        )


def check_parameters_held(model: torch.nn.Module, optimizer: torch.optim.Optimizer, clipper=None) -> None:
    """Fail unless `optimizer` (and the clipping mode's `clipper`, where it keeps its own list) hold
    exactly the trainable parameter objects of `model`.

    Opacus' hooks write per-sample gradients and norms onto the parameters the forward pass
    uses; the optimizer clips, noises and steps the ones it was given. A parameter object
    replaced after they were made (a model materialised from the meta device, moved by
    creating new parameters, or given LoRA adapters afterwards: opacus#820) leaves them
    stepping a stale copy, and the model's weights silently never change."""
    trainable = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    holders = {"the optimizer": [p for group in optimizer.param_groups for p in group["params"]]}
    if getattr(clipper, "trainable_parameters", None) is not None:
        holders[clipper.holder] = clipper.trainable_parameters
    for holder, parameters in holders.items():
        held = {id(p) for p in parameters}
        if held != trainable.keys():
            missing = sorted(name for key, name in trainable.items() if key not in held)
            raise RuntimeError(
                f"{holder} does not hold the model's trainable parameters "
                f"({', '.join(missing[:3]) or 'it holds others'}): "
                "they were replaced after it was made, so training would never change them. Put the "
                "model on its device, out of the meta device and with its adapters before training starts"
            )


def check_resumable(state: dict[str, Any]) -> None:
    """A DP run resumes only a DP checkpoint."""
    if not state.get("enabled"):
        raise ValueError(
            "ckpt_path holds a run without privacy: its weights may have seen the data "
            "without DP, so no DP guarantee can be stated for the resumed run"
        )
