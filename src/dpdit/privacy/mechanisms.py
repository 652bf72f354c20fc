"""The DP step: one logical batch in, one optimizer step out, in the phases DP-SGD names.

A training step sees one logical batch (Poisson-sampled at `sample_rate`) as a sequence of
physical micro-batches (`Mechanism.step`):

1. per-image losses: each image as K rows (noise multiplicity), its loss their mean;
2. per-sample gradients: the backward pass of the clipping mode (`privacy.clipping`, the
   registry in `clipping/`): per-sample gradients, or the micro-batch's clipped sum in `.grad`;
3. clip and accumulate: each micro-batch's clipped per-sample gradients summed into
   Opacus' `summed_grad` (a skipped optimizer step), so every micro-batch counts alike;
4. noise and step: the last micro-batch is clipped, the Gaussian noise added once (drawn
   from the run's secret streams, `dpdit.randomness`), the sum divided by the expected
   batch size and the optimizer steps;
5. account: the ledger records the step.

With several ranks, each holds its share of the global batch and clips it; Opacus'
distributed optimizers add the noise on rank 0 only and sum the ranks' gradients, so the
global update is (sum of all clipped gradients + one N(0, sigma^2 C^2) draw) / (q N), the
single-process update. The non-private mechanism runs the same step without clipping,
noise or accounting.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import asdict
from typing import Any, Callable

import torch
from opacus.optimizers import get_optimizer_class
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from dpdit.privacy.accounting import History, PrivacyLedger, epsilon_of
from dpdit.privacy.clipping import clipping_mode
from dpdit.privacy.clipping.base import Backward, full_precision, mean_over_draws
from dpdit.privacy.settings import PrivacyConfig, check_parameters_held, check_resumable, check_sharding
from dpdit.privacy.sharding import busiest_rank_count, is_sharded, noise_target
from dpdit.randomness import PrivateRandomness

log = logging.getLogger(__name__)

# Opacus logs one INFO line per layer when it attaches hooks.
logging.getLogger("opacus").setLevel(logging.WARNING)

PerImageLosses = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# the non-private step's name beside the clipping modes in profiles and the inspector's tables
VANILLA = "vanilla"


def placeholder_image(
    images: torch.Tensor, labels: torch.Tensor, null_class: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A micro-batch of one zero-weighted placeholder image (data-independent, contributing
    exactly nothing), with the weight of its loss. Poisson sampling can draw an empty batch,
    whose step must still add its noise and be accounted, and Opacus cannot run an empty
    batch; under FSDP a rank with fewer images runs them to keep step with the others."""
    return images.new_zeros((1, *images.shape[1:])), labels.new_full((1,), null_class), 0.0


def per_image_losses(losses: PerImageLosses, images: torch.Tensor, labels: torch.Tensor, draws: int) -> torch.Tensor:
    """Each image's loss as the mean over its `draws` rows, each with its own timestep and noise."""
    if draws > 1:
        images, labels = images.repeat_interleave(draws, dim=0), labels.repeat_interleave(draws, dim=0)
    return mean_over_draws(losses(images, labels), draws)


class Mechanism(ABC):
    """The logical step the training module takes (the module docstring numbers its phases):
    `DPSGD` and `NonPrivate` differ in the phases, which are the abstract methods."""

    enabled: bool
    noise_multiplicity: int = 1
    # whether values computed from the private data without noise (the exact loss, the batch
    # size, the samples' class-consistency) may be logged
    releases_exact_values: bool

    def attach(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        losses: PerImageLosses,
        backward: Backward,
        world_size: int = 1,
    ) -> torch.optim.Optimizer:
        """Bind the step to `model`, its per-row `losses` (images, labels -> [rows]) and its
        `backward` (Lightning's `manual_backward`); returns the optimizer to train with, which
        with `world_size` ranks sums their gradients."""
        self.model, self.losses, self.backward = model, losses, backward
        self.sharded = is_sharded(model.parameters())
        return self.prepare_optimizer(optimizer, world_size)

    def step(
        self, images: torch.Tensor, labels: torch.Tensor, optimizer, micro_batch_size: int
    ) -> dict[str, torch.Tensor]:
        """One logical batch, as micro-batches of `micro_batch_size` images, stepping
        `optimizer` (Lightning's wrapper of the one `attach` returned); returns the step's sums
        over images (`loss`, `images`, ...), to be added over ranks."""
        batch_size = images.shape[0]
        placeholder = placeholder_image(images, labels, self.model.null_class)
        micro_batches = [
            (x, y, 1.0) for x, y in zip(images.split(micro_batch_size), labels.split(micro_batch_size)) if len(x)
        ]
        # an empty batch runs the placeholder (its step still adds noise and is accounted); under
        # FSDP each rank runs as many micro-batches as the busiest one, as forward passes gather
        count = max(len(micro_batches), 1)
        if self.sharded:
            count = busiest_rank_count(count, images.device)
        micro_batches += [placeholder] * (count - len(micro_batches))
        loss_sum = torch.zeros((), device=images.device)
        for index, (x, y, weight) in enumerate(micro_batches):
            loss = weight * per_image_losses(self.losses, x, y, self.noise_multiplicity)  # 1. K draws per image
            self.per_sample_gradients(loss)  # 2.
            loss_sum += loss.detach().sum()
            if index < len(micro_batches) - 1:
                self.clip_and_accumulate()  # 3. (the last micro-batch's in 4.)
        self.noise_and_step(optimizer, images.device)  # 4.
        self.account()  # 5.
        return {"loss": loss_sum, "images": loss_sum.new_tensor(batch_size), **self.step_sums(batch_size, loss_sum)}

    def noise_and_step(self, optimizer, device: torch.device) -> None:
        # Opacus' optimizer clips the last micro-batch, adds the noise and scales, in float32
        with full_precision(device):
            optimizer.step()
        # freed, not zeroed (Opacus' default): zeroed gradients would stay held through the
        # next forward and backward pass, one more copy of the trained weights
        optimizer.zero_grad(set_to_none=True)

    # The phases

    @abstractmethod
    def prepare_optimizer(self, optimizer: torch.optim.Optimizer, world_size: int) -> torch.optim.Optimizer:
        """The optimizer the step uses, made from the training's."""

    @abstractmethod
    def per_sample_gradients(self, loss_per_sample: torch.Tensor) -> None:
        """2. The backward pass of one micro-batch's per-image losses."""

    @abstractmethod
    def clip_and_accumulate(self) -> None:
        """3. Add a micro-batch (not the last) to the step's sum without stepping."""

    @abstractmethod
    def account(self) -> None:
        """5. Record the step."""

    @abstractmethod
    def step_sums(self, batch_size: int, loss_sum: torch.Tensor) -> dict[str, torch.Tensor]:
        """The mechanism's own sums over the step's `batch_size` images."""

    # Around the step

    def observe(self, sums: dict[str, torch.Tensor]) -> None:
        """What the mechanism takes from its step's released sums (over every rank) for the
        next step: nothing, unless it adapts (`DPSGD`'s adaptive clipping)."""

    @abstractmethod
    def check_attached(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise unless the hooks and `optimizer` still hold the model's trainable parameters."""

    @abstractmethod
    def dashboard(self, sums: dict[str, torch.Tensor], last: bool) -> dict[str, float]:
        """The mechanism's logged values after a step, from its sums over every rank."""

    @abstractmethod
    def describe(self) -> str:
        """The mechanism's settings in a line, read from it (no accountant runs for it)."""

    @property
    @abstractmethod
    def budget_exhausted(self) -> bool:
        """Whether another step would spend more than the target."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def report(self) -> dict[str, Any]:
        """The privacy report's contents."""


def _sum_gradients_over_ranks(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter.grad is not None:
                torch.distributed.all_reduce(parameter.grad)


class NonPrivate(Mechanism):
    """`privacy=none`: the same micro-batched step without clipping, noise or accounting."""

    enabled = False
    releases_exact_values = True
    noise_multiplicity = 1  # one noise draw per image
    budget_exhausted = False

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer, world_size: int) -> torch.optim.Optimizer:
        if self.sharded:
            # FSDP reduce-scatters every backward pass's gradients: summed, as here, not averaged
            for unit in self.model.modules():
                if isinstance(unit, FSDPModule):
                    unit.set_gradient_divide_factor(1.0)
        elif world_size > 1:
            optimizer.register_step_pre_hook(_sum_gradients_over_ranks)
        return optimizer

    def check_attached(self, optimizer: torch.optim.Optimizer) -> None:
        """No hooks keep parameters of their own."""

    def per_sample_gradients(self, loss_per_sample: torch.Tensor) -> None:
        # Sum over the micro-batch (and, at the step, over ranks), mean over the logical
        # batch, whose size is fixed without Poisson sampling: micro-batches add up.
        self.backward(loss_per_sample.sum() / self.batch_size)

    def clip_and_accumulate(self) -> None:
        """Gradients simply accumulate in `.grad` until the optimizer steps."""

    def account(self) -> None:
        """Nothing is spent."""

    def step_sums(self, batch_size: int, loss_sum: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def dashboard(self, sums: dict[str, torch.Tensor], last: bool) -> dict[str, float]:
        return {}

    def describe(self) -> str:
        return "training without privacy"

    def state_dict(self) -> dict[str, Any]:
        return {"enabled": False}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("enabled"):
            raise ValueError(
                "ckpt_path holds a DP run but privacy=none: resume it with privacy=dp, "
                "or its earlier privacy spend would be silently dropped"
            )

    def report(self) -> dict[str, Any]:
        return {"enabled": False, "epsilon": None}


def with_noise_from(optimizer_class: type, randomness: PrivateRandomness, step_of) -> type:
    """`optimizer_class` (any of Opacus' DP optimizers) whose noise phase draws
    N(0, sigma^2 C^2) from `randomness`' stream for step `step_of()` instead of torch's
    generator. As in Opacus' distributed optimizers, only rank 0 adds noise; on sharded
    parameters (whose gradients the clipping mode has already summed over ranks) each rank
    adds the noise of its own rows.

    No phase holds a second copy of the gradients, which at DiT-XL/2's size is 3 GiB each:
    the noise is drawn and added in place, a chunk of values at a time, and the summed
    gradient becomes `.grad` (Opacus adds a new tensor for each); the ghost optimizers' accumulation
    takes the first micro-batch's clipped sum as it is (Opacus copies it) and frees each
    `.grad` once it is summed."""

    class SecretNoise(optimizer_class):
        def accumulate(self) -> None:
            for p in self.params:
                if p.summed_grad is None:
                    p.summed_grad = p.grad.data
                else:
                    p.summed_grad.add_(p.grad.data)
                p.grad = None

        def add_noise(self) -> None:
            params = self.params
            for p in params:
                _check_processed_flag(p.summed_grad)
            if getattr(self, "rank", 0) == 0 and self.noise_multiplier > 0:
                randomness.add_gaussian_noise(
                    step_of(), [noise_target(p.summed_grad) for p in params], self.noise_multiplier * self.max_grad_norm
                )
            for p in params:
                p.grad = p.summed_grad if isinstance(p.summed_grad, DTensor) else p.summed_grad.view_as(p)
                _mark_as_processed(p.summed_grad)

    SecretNoise.__name__ = SecretNoise.__qualname__ = f"SecretNoise{optimizer_class.__name__}"
    return SecretNoise


class DPSGD(Mechanism):
    """DP-SGD (Abadi et al., 2016) through Opacus' per-sample gradients.

    Args:
        config: the privacy settings.
        sample_rate: Poisson sampling rate q = expected batch / dataset size.
        dataset_size: N, public.
        noise_multiplier: sigma of the gradients' noise (already calibrated when the config
            asked for it). With `privacy.statistics=private` the accountant records the whole
            release's sigma_eff (`PrivacyConfig.effective_noise_multiplier`).
        randomness: where batch membership and noise come from (default: a new secret key
            under `secure_mode`, the seed 0's key otherwise).
        history: the accountant's history the run starts with (an earlier run on the same data).
        init_checkpoint: where the run started from and whether its spend counts (the report's).
    """

    enabled = True

    def __init__(
        self,
        config: PrivacyConfig,
        sample_rate: float,
        dataset_size: int,
        noise_multiplier: float,
        randomness: PrivateRandomness | None = None,
        history: History = (),
        init_checkpoint: dict[str, Any] | None = None,
    ):
        self.config = config
        self.clipping = clipping_mode(config.clipping)
        self.randomness = randomness or PrivateRandomness.create(secret=config.secure_mode)
        self.sample_rate = sample_rate
        self.dataset_size = dataset_size
        self.expected_batch_size = sample_rate * dataset_size
        self.noise_multiplier = noise_multiplier
        self.noise_multiplicity = config.noise_multiplicity
        self.effective_noise_multiplier = config.effective_noise_multiplier(noise_multiplier)
        self.ledger = PrivacyLedger(
            self.effective_noise_multiplier, sample_rate, config.delta, config.accountant, config.target_epsilon
        )
        self.ledger.history = [tuple(entry) for entry in history]
        self.init_checkpoint = init_checkpoint
        self.releases_exact_values = config.statistics == "nonprivate"
        # the clip bound: the configured one, or where adaptive clipping has taken it
        self.max_grad_norm = config.max_grad_norm
        self.bounds = {"initial": config.max_grad_norm, "min": config.max_grad_norm, "max": config.max_grad_norm}
        self.bounds.update(sum=0.0, steps=0)
        self.clipper = None
        self.optimizer = None
        self._gradient_norms: list[torch.Tensor] = []
        self._clipped_losses: list[torch.Tensor] = []

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer, world_size: int) -> torch.optim.Optimizer:
        """Attach the clipping mode to the model and wrap `optimizer` in the Opacus optimizer
        it steps with; with `world_size` ranks, that adds noise on rank 0 and sums over ranks.
        On sharded parameters the clipping mode sums over ranks and each rank adds its rows'
        noise: the optimizer is the single-process one, over the global expected batch."""
        if self.sharded:
            check_sharding(self.config.clipping)
        self.clipper = self.clipping.attach(self.model, self.max_grad_norm, self.noise_multiplicity, self.backward)
        summing = world_size > 1 and not self.sharded
        optimizer_class = get_optimizer_class(
            clipping="flat", distributed=summing, grad_sample_mode=self.clipping.optimizer
        )
        # the noise of the step about to be accounted: its index in the history
        self.optimizer = with_noise_from(optimizer_class, self.randomness, lambda: self.steps)(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            # each rank's share: the distributed optimizer divides the sum by world_size too
            expected_batch_size=self.expected_batch_size / (world_size if summing else 1),
            loss_reduction="mean",
        )
        return self.optimizer

    def check_attached(self, optimizer: torch.optim.Optimizer) -> None:
        check_parameters_held(self.model, optimizer, self.clipper)

    def per_sample_gradients(self, loss_per_sample: torch.Tensor) -> None:
        """The clipping mode's backward pass: per-sample gradients for the optimizer to clip,
        or the clipped sum in `.grad`; either way the per-image norms before clipping."""
        self._gradient_norms.append(self.clipper.per_image_norms(loss_per_sample, self.optimizer).detach())
        # an empty batch's placeholder has weight 0, hence loss 0: it adds nothing
        self._clipped_losses.append(loss_per_sample.detach().clamp(0.0, self.config.loss_bound))

    def clip_and_accumulate(self) -> None:
        """Clip this micro-batch into the running sum without noise or an optimizer step."""
        self.optimizer.signal_skip_step(do_skip=True)
        with full_precision(self.optimizer.params[0].device):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def account(self) -> None:
        self.ledger.record_step()

    def take_gradient_norms(self) -> torch.Tensor:
        """The per-sample gradient norms (before clipping) of the step so far, and forget them.
        Computed from the private data without noise: a diagnostic, not a private statistic."""
        norms, self._gradient_norms = torch.cat(self._gradient_norms), []
        return norms

    def step_sums(self, batch_size: int, loss_sum: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the dashboard gets of this step, by `privacy.statistics`: with `private`, the
        clipped loss sum and the clipped count, each with its Gaussian noise added once (on
        rank 0, as the gradients' noise) from the step's own secret stream; with
        `nonprivate`, the exact clipped count and norm sum; with `off`, nothing."""
        # an empty batch's placeholder image has no gradient to count
        norms = self.take_gradient_norms()[:batch_size]
        losses, self._clipped_losses = torch.cat(self._clipped_losses), []
        clipped = (norms > self.max_grad_norm).sum().to(loss_sum)
        if self.config.statistics == "nonprivate":
            return {"clipped": clipped, "norms": norms.sum().to(loss_sum)}
        if self.config.statistics == "off":
            return {}
        noise = self.statistics_noise(loss_sum.device).to(loss_sum)
        return {"private_loss": losses.sum().to(loss_sum) + noise[0], "private_clipped": clipped + noise[1]}

    def statistics_noise(self, device: torch.device) -> torch.Tensor:
        """The released statistics' noise of this step (just accounted): N(0, (r sigma B)^2) on
        the loss sum, N(0, (r sigma)^2) on the count; zero on ranks other than 0."""
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return torch.zeros(2, dtype=torch.float64, device=device)
        std = self.config.statistics_noise * self.noise_multiplier
        (normals,) = self.randomness.gaussian_noise(
            self.steps - 1, [torch.zeros(2, dtype=torch.float64, device=device)], 1.0, purpose="statistics"
        )
        return normals * torch.tensor([std * self.config.loss_bound, std], dtype=torch.float64, device=device)

    def observe(self, sums: dict[str, torch.Tensor]) -> None:
        """Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy, 2021): the bound moves
        geometrically towards the `target_quantile` of the per-image gradient norms,
        C <- C exp(-eta (b - gamma)), where b = 1 - (noisy clipped count) / E estimates the
        share of images within the bound. It reads only the released count: no privacy spent
        beyond what the history already records."""
        if not self.config.adaptive_clipping:
            return
        within = 1.0 - float(sums["private_clipped"]) / self.expected_batch_size
        bound = self.max_grad_norm * math.exp(-self.config.clip_learning_rate * (within - self.config.target_quantile))
        self.set_max_grad_norm(bound)

    def set_max_grad_norm(self, bound: float) -> None:
        self.max_grad_norm = bound
        self.optimizer.max_grad_norm = bound
        self.clipper.set_max_grad_norm(bound)
        self.bounds.update(min=min(self.bounds["min"], bound), max=max(self.bounds["max"], bound))
        self.bounds["sum"] += bound
        self.bounds["steps"] += 1

    def dashboard(self, sums: dict[str, torch.Tensor], last: bool) -> dict[str, float]:
        """Epsilon so far and the mechanism's settings, and by `privacy.statistics`: the noisy
        clipped loss and clipped fraction per expected image (`private/`, covered by epsilon),
        or the exact share of per-sample gradients clipped and their mean norm (`nonprivate/`)."""
        values = {"privacy/epsilon": self.epsilon} if self.ledger.epsilon_due(last) else {}
        values.update(
            {
                "privacy/noise_multiplier": self.effective_noise_multiplier,
                "privacy/sample_rate": self.sample_rate,
                "privacy/max_grad_norm": self.max_grad_norm,
            }
        )
        if "private_loss" in sums:
            values["private/loss"] = sums["private_loss"] / self.expected_batch_size
            values["private/clipped_fraction"] = sums["private_clipped"] / self.expected_batch_size
        if "clipped" in sums and sums["images"] > 0:
            values["nonprivate/clipped_fraction"] = sums["clipped"] / sums["images"]
            values["nonprivate/grad_norm_mean"] = sums["norms"] / sums["images"]
        return values

    def describe(self) -> str:
        config = self.config
        target = "" if config.target_epsilon is None else f"target epsilon {config.target_epsilon:g} "
        return (
            f"DP-SGD: noise multiplier {self.effective_noise_multiplier:.4g} (gradients {self.noise_multiplier:.4g}), "
            f"clip bound {config.max_grad_norm:g}, "
            f"sample rate {self.sample_rate:.4g} of {self.dataset_size} images, {target}at delta "
            f"{config.delta:g} ({config.accountant}), randomness {self.randomness.describe()['randomness']}, "
            f"dashboard statistics {config.statistics}"
        )

    @property
    def steps(self) -> int:
        return self.ledger.steps

    @property
    def epsilon(self) -> float:
        return self.ledger.epsilon

    @property
    def budget_exhausted(self) -> bool:
        return self.ledger.budget_exhausted

    def state_dict(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "bounds": dict(self.bounds),
            "history": list(self.ledger.history),
            "randomness": self.randomness.state_dict(),
            "init_checkpoint": self.init_checkpoint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_resumable(state)
        self.ledger.history = [tuple(entry) for entry in state["history"]]
        self.init_checkpoint = state.get("init_checkpoint")
        if self.config.adaptive_clipping and "bounds" in state:
            # where the bound had gone, not where the config starts it
            self.max_grad_norm, self.bounds = state["max_grad_norm"], dict(state["bounds"])
        if "randomness" in state:
            self.randomness.load_state_dict(state["randomness"])
            if self.config.secure_mode and not self.randomness.is_secret:
                log.warning(
                    "the resumed checkpoint's batches and noise were seeded (privacy.secure_mode=false): "
                    "the run stays seeded and is not a private release"
                )

    def report(self) -> dict[str, Any]:
        return {
            "enabled": True,
            **self.ledger.report(),
            **self.randomness.describe(),
            "step_limit": self.ledger.step_limit,
            # the step's sigma, which epsilon is computed from (the history's); the gradients'
            # own is larger when the statistics are released with them
            "noise_multiplier": self.effective_noise_multiplier,
            "gradient_noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "accountant": self.config.accountant,
            "clipping": self.config.clipping,
            "noise_multiplicity": self.config.noise_multiplicity,
            "dataset_size": self.dataset_size,
            "expected_batch_size": self.expected_batch_size,
            "history": [list(entry) for entry in self.ledger.history],
            "init_checkpoint": self.init_checkpoint,
            "statistics": self.statistics_report(),
            "adaptive_clipping": self.adaptive_clipping_report(),
            "settings": asdict(self.config),
        }

    def adaptive_clipping_report(self) -> dict[str, Any] | None:
        """The clip bound's path under adaptive clipping: where it started, ended and went."""
        if not self.config.adaptive_clipping:
            return None
        bounds, config = self.bounds, self.config
        return {
            "target_quantile": config.target_quantile,
            "learning_rate": config.clip_learning_rate,
            "initial": bounds["initial"],
            "final": self.max_grad_norm,
            "min": bounds["min"],
            "max": bounds["max"],
            "mean": bounds["sum"] / bounds["steps"] if bounds["steps"] else bounds["initial"],
        }

    def statistics_report(self) -> dict[str, Any]:
        """What the dashboard's statistics are and, when released privately, what they cost:
        the epsilon the history would spend had its steps released the gradients alone."""
        config = self.config
        if config.statistics != "private":
            note = {
                "nonprivate": (
                    "exact values from the private data, NOT covered by epsilon: share the dashboard as you would "
                    "the data"
                ),
                "off": "nothing computed from the private data is logged",
            }[config.statistics]
            return {"mode": config.statistics, "note": note}
        sigma, effective = self.noise_multiplier, self.effective_noise_multiplier
        gradients_only = [(sigma if s == effective else s, q, n) for s, q, n in self.ledger.history]
        alone = epsilon_of(gradients_only, config.delta, config.accountant)
        return {
            "mode": "private",
            "released": ["private/loss", "private/clipped_fraction"],
            "noise_multiplier": config.statistics_noise * sigma,
            "loss_bound": config.loss_bound,
            "effective_noise_multiplier": effective,
            "epsilon_without_statistics": alone,
            "note": (
                f"the clipped loss sum (each image's loss clipped to {config.loss_bound:g}) and the clipped count are "
                f"released with noise multiplier {config.statistics_noise:g} x sigma each: with the gradients one "
                f"Gaussian mechanism of sigma_eff {effective:.4g} (gradients' sigma {sigma:.4g}), which epsilon "
                f"counts; the gradients alone would have spent {alone:.4g}"
            ),
        }
