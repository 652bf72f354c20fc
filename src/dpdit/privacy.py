"""DP-SGD with Opacus: settings, noise calibration, accounting and the private backward pass.

A training step sees one logical batch (Poisson-sampled at `sample_rate`) as a sequence of
physical micro-batches. Each micro-batch's per-sample gradients are clipped and summed into
Opacus' `summed_grad` (a skipped optimizer step); the last micro-batch adds the Gaussian
noise once, divides by the expected batch size and steps, so every micro-batch counts
in `hooks` and in `ghost` mode alike. The noise comes from the run's secret streams
(`dpdit.randomness`), not from torch's generators.

With several ranks, each holds its share of the global batch and clips it; Opacus'
distributed optimizers add the noise on rank 0 only and sum the ranks' gradients, so the
global update is (sum of all clipped gradients + one N(0, sigma^2 C^2) draw) / (q N), the
single-process update.

Noise multiplicity (DPDM, Dockhorn et al. 2023): with `noise_multiplicity=K`, each image
enters the forward pass as K rows, each with its own timestep and noise, and its loss is
the mean over its rows. Opacus sees K rows per image, so its per-row results are gathered
into one per image before clipping: in `hooks` and `functorch` mode the per-row gradients
(Opacus' public `grad_sample`) are averaged over each image's rows after the backward pass;
in `ghost` mode this training's copies of Opacus' norm samplers fold each image's rows into
one sequence, whose gradient is the sum over the rows (layers without a norm sampler get one
that averages their per-row gradients). Either way the mean gradient over the K
draws is clipped once, and the sensitivity, and with it the accounting, is that of K=1.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from dp_accounting import dp_event, pld
from opacus.accountants import create_accountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import get_optimizer_class
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.validators import ModuleValidator

from dpdit.bisection import bracket, last_fitting, narrow
from dpdit.randomness import PrivateRandomness

# Accountants whose epsilon is an upper bound on the true one, tightest first: Google's
# privacy loss distributions (dp-accounting, pessimistic estimate), Opacus' PRV (its upper
# error bound) and RDP. Only these calibrate the noise, enforce the budget or fill `epsilon`.
ACCOUNTANTS = ("pld", "prv", "rdp")
# Accountants that only estimate: Opacus' GDP is a central-limit approximation that fell up
# to 80% below PLD on a grid. The report shows them beside the bounds, never as `epsilon`.
ESTIMATES = ("gdp",)
# PLD's value grid: coarser is faster and still pessimistic (about 0.01% above 1e-4's epsilon)
PLD_DISCRETIZATION = 1e-3
# Opacus' ways to the per-sample norms: hooks (per-layer per-sample gradients from hooks),
# ghost (norms without per-sample gradients where a layer allows it), functorch (per-sample
# gradients of every layer by vmap, for layers Opacus has no hook for).
CLIPPING_MODES = ("hooks", "ghost", "functorch")
# What an init_ckpt_path checkpoint was trained on: this run's data (its privacy history
# counts towards this run's epsilon) or data disjoint from it (its history does not).
INIT_DATA = ("same", "disjoint")
# Trainer precisions under which a DP step stays exact. Mixed precision is "bf16-mixed"
# only: float16 scales the loss (clipping would bound the scaled gradients), "-true" modes
# hold weights, clipped sums and noise in low precision.
DP_PRECISIONS = ("32-true", "32", "64-true", "64", "bf16-mixed")
MAX_NOISE_MULTIPLIER = 1000.0

History = list[tuple[float, float, int]]
# Opacus' default RDP orders plus larger ones: with sample rates near 1 the best order is
# often above 63, and a missing order only makes epsilon looser, never wrong.
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [64, 80, 96, 128, 192, 256, 512, 1024])

log = logging.getLogger(__name__)

# Opacus logs one INFO line per layer when it attaches hooks.
logging.getLogger("opacus").setLevel(logging.WARNING)


def steps_of(history: History) -> int:
    """Noisy steps recorded in a history of (noise multiplier, sample rate, steps) entries."""
    return sum(entry[2] for entry in history)


@functools.lru_cache(maxsize=1024)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    return compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS)


def _pld_epsilon(history: History, delta: float) -> float:
    accountant = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    for sigma, q, steps in history:
        accountant.compose(dp_event.PoissonSampledDpEvent(float(q), dp_event.GaussianDpEvent(float(sigma))), int(steps))
    return float(accountant.get_epsilon(delta))


def epsilon_of(history: History, delta: float, accountant: str) -> float:
    """Epsilon spent by a history of (noise multiplier, sample rate, steps) entries.

    RDP composes additively over steps, so each (sigma, q) pair's per-step RDP is computed
    once and cached: logging epsilon after every step stays cheap.
    """
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf  # a step without noise has no DP guarantee
    if accountant == "rdp":
        rdp = sum(steps * _rdp_of_one_step(float(sigma), float(q)) for sigma, q, steps in history)
        return float(get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)[0])
    if accountant == "pld":
        return _pld_epsilon(history, delta)
    with warnings.catch_warnings():
        # Opacus warns that GDP can underestimate: the report lists it as an estimate only.
        warnings.filterwarnings("ignore", message="GDP accounting is experimental")
        # PRV sizes its discretisation domain from an RDP bound at a tiny delta over Opacus'
        # default orders, whose optimum is often the largest: a looser bound there only
        # widens the domain, and PRV's epsilon stays an upper bound.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        counter = create_accountant(mechanism=accountant)
        counter.history = [tuple(entry) for entry in history]
        try:
            return float(counter.get_epsilon(delta=delta))
        except ValueError:
            # Opacus' GDP conversion searches epsilon in [0, 500] and fails beyond it
            if accountant != "gdp":
                raise
            return math.inf


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    history: History = (),
    tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (to `tolerance` in epsilon) for which `history` followed by
    `steps` steps at `sample_rate` spends at most `target_epsilon`.

    Unlike Opacus' `get_noise_multiplier`, the returned value is checked with `epsilon_of`,
    the very function that computes the reported epsilon, so the report never exceeds the
    target.
    """

    if steps < 1:
        raise ValueError(f"calibrating the noise needs at least one step to take, got {steps}")

    def spent(sigma: float) -> float:
        return epsilon_of([*history, (sigma, sample_rate, steps)], delta, accountant)

    def too_little(sigma: float) -> bool:
        return spent(sigma) > target_epsilon

    bracketed = bracket(too_little, limit=MAX_NOISE_MULTIPLIER)
    if bracketed is None:
        raise ValueError(
            f"privacy.target_epsilon={target_epsilon} is unreachable: even noise multiplier "
            f"{MAX_NOISE_MULTIPLIER:g} spends more over {steps} steps at sample rate "
            f"{sample_rate:.4g} (delta={delta:g}). Raise privacy.target_epsilon, lower "
            "trainer.max_steps or data.batch_size."
        )
    # the smallest sigma found that meets the target, within `tolerance` of it in epsilon
    _, sigma = narrow(
        too_little, *bracketed, done=lambda low, high: target_epsilon - spent(high) <= tolerance or high - low <= 1e-6 * high
    )
    return sigma


def steps_within_budget(
    target_epsilon: float, delta: float, noise_multiplier: float, sample_rate: float, steps: int, accountant: str, history: History
) -> int:
    """The most steps, up to `steps`, that can follow `history` at (noise multiplier, sample
    rate) without epsilon exceeding `target_epsilon`."""

    def fits(count: int) -> bool:
        more = [(noise_multiplier, sample_rate, count)] if count else []
        return epsilon_of([*history, *more], delta, accountant) <= target_epsilon

    if fits(steps):
        return steps
    if not fits(0):
        return 0
    return last_fitting(fits, 0, steps)


def epsilon_by_accountant(history: History, delta: float, accountants: tuple[str, ...] = ACCOUNTANTS) -> dict[str, float]:
    """The epsilon each of `accountants` gives for the same history."""
    return {accountant: epsilon_of(history, delta, accountant) for accountant in accountants}


@dataclass
class PrivacyConfig:
    """The `privacy` config group. `noise_multiplier: null` calibrates it to the target."""

    enabled: bool = True
    target_epsilon: float | None = 10.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    accountant: str = "pld"
    clipping: str = "ghost"
    noise_multiplicity: int = 1
    secure_mode: bool = True
    init_data: str = "same"

    def validate(self, dataset_size: int) -> None:
        """Raise a ValueError naming the setting for every invalid choice."""
        if not self.enabled:
            return
        if self.accountant in ESTIMATES:
            raise ValueError(
                f"privacy.accountant={self.accountant} is a central-limit approximation, not an upper "
                "bound: it can report far less than the epsilon spent (up to 80% below PLD), so it may "
                "not calibrate the noise or enforce the budget. Use privacy.accountant=pld (tightest), "
                "prv or rdp; the report shows gdp's estimate beside them"
            )
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"privacy.accountant={self.accountant!r} is unknown: choose one of {', '.join(ACCOUNTANTS)}")
        if self.clipping not in CLIPPING_MODES:
            raise ValueError(f"privacy.clipping={self.clipping!r} is unknown: choose one of {', '.join(CLIPPING_MODES)}")
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
    if precision == "bf16-mixed" and clipping == "ghost":
        raise ValueError(
            "trainer.precision=bf16-mixed with privacy.clipping=ghost: ghost clipping's second "
            "backward pass sums the batch's clipped gradients in bfloat16, whose rounding mixes "
            "images and breaks the per-image bound. Use privacy.clipping=hooks (per-sample "
            "gradients clipped in float32) or trainer.precision=32-true"
        )
    if precision == "bf16-mixed" and clipping == "functorch":
        raise ValueError(
            "trainer.precision=bf16-mixed with privacy.clipping=functorch: functorch recomputes "
            "each layer per sample outside autocast, from bfloat16 inputs. Use "
            "privacy.clipping=hooks (per-sample gradients clipped in float32) or trainer.precision=32-true"
        )


def full_precision(device: torch.device):
    """A context without autocast: per-sample norms, clipping and noise under bf16-mixed
    must run in the parameters' precision, not in bfloat16."""
    return torch.autocast(device.type, enabled=False)


def in_float32(sampler):
    """A per-sample gradient function that computes in float32 when autocast
    gave it bfloat16 activations or gradients: the norms that clipping compares with C,
    and the clipped vectors that are summed, then carry no bfloat16 rounding."""

    def widen(x):
        return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x

    def compute(module, activations, backprops, *args, **kwargs):
        with full_precision(backprops.device):
            return sampler(module, [widen(a) for a in activations], widen(backprops), *args, **kwargs)

    return compute


def mean_over_draws(per_row: torch.Tensor, draws: int) -> torch.Tensor:
    """Per-row values [n * draws, ...], each image's `draws` rows consecutive, to per-image means [n, ...]."""
    return per_row.unflatten(0, (-1, draws)).mean(dim=1)


def gram_matrices_outweigh_gradient(layer: torch.nn.Module, tokens: int) -> bool:
    """Whether a Linear's ghost norm over `tokens` rows per sample (two tokens x tokens Gram
    matrices, g g^T and a a^T) holds more values than its per-sample weight gradient: then
    forming that gradient is the cheaper way to its norm (Li et al., 2022)."""
    return 2 * tokens**2 > layer.weight.numel()


def per_image_norm_sampler(sampler, draws: int, grad_sampler=None):
    """An Opacus ghost norm sampler whose norms are per image. Each image's `draws` rows
    become one sequence ([n * draws, ..., d] to [n, draws x ..., d]; token ids [n, draws x ...]),
    on which a Linear's or Embedding's per-sample gradient is the sum of the rows' gradients;
    the norm of their mean is that norm / draws.

    Folding multiplies a Linear's sequence by `draws` and its Gram matrices by draws^2; with a
    `grad_sampler` (the Linear's), a layer whose Gram matrices would outweigh its gradient
    takes the norm of the per-image gradient that sampler sums over the folded sequence."""

    def fold(x: torch.Tensor) -> torch.Tensor:
        images = x.shape[0] // draws
        return x.reshape(images, -1, x.shape[-1]) if x.is_floating_point() else x.reshape(images, -1)

    def compute(module, activations, backprops):
        activations, backprops = [fold(a) for a in activations], fold(backprops)
        if grad_sampler is not None and gram_matrices_outweigh_gradient(module, backprops.shape[1]):
            grads = grad_sampler(module, activations, backprops)
            norms = {parameter: grad.flatten(1).norm(dim=1) for parameter, grad in grads.items()}
        else:
            norms = sampler(module, activations, backprops)
        return {parameter: norm / draws for parameter, norm in norms.items()}

    return compute


def norm_of_mean_gradient_sampler(grad_sampler, draws: int):
    """A ghost norm sampler for a layer without one: the norm of the mean of each image's
    `draws` per-row gradients, from Opacus' grad sampler for the layer."""

    def compute(module, activations, backprops):
        grads = grad_sampler(module, activations, backprops)
        return {parameter: mean_over_draws(grad, draws).flatten(1).norm(dim=1) for parameter, grad in grads.items()}

    return compute


def check_model_is_private(model: torch.nn.Module, clipping: str) -> None:
    """Fail before training if Opacus cannot compute per-sample gradients of `model`."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(
            f"privacy.clipping={clipping}: the model has layers Opacus cannot train privately: "
            + "; ".join(str(e) for e in errors)
        )


def check_parameters_held(model: torch.nn.Module, optimizer: torch.optim.Optimizer, hooks=None) -> None:
    """Fail unless `optimizer` (and ghost clipping's `hooks`, which keep their own list) hold
    exactly the trainable parameter objects of `model`.

    Opacus' hooks write per-sample gradients and norms onto the parameters the forward pass
    uses; the optimizer clips, noises and steps the ones it was given. A parameter object
    replaced after they were made (a model materialised from the meta device, moved by
    creating new parameters, or given LoRA adapters afterwards: opacus#820) leaves them
    stepping a stale copy, and the model's weights silently never change."""
    trainable = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    holders = {"the optimizer": [p for group in optimizer.param_groups for p in group["params"]]}
    if getattr(hooks, "trainable_parameters", None) is not None:
        holders["Opacus' ghost clipping hook list"] = hooks.trainable_parameters
    for holder, parameters in holders.items():
        held = {id(p) for p in parameters}
        if held != trainable.keys():
            missing = sorted(name for key, name in trainable.items() if key not in held)
            raise RuntimeError(
                f"{holder} does not hold the model's trainable parameters ({', '.join(missing[:3]) or 'it holds others'}): "
                "they were replaced after it was made, so training would never change them. Put the "
                "model on its device, out of the meta device and with its adapters before training starts"
            )


def _sum_gradients_over_ranks(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter.grad is not None:
                torch.distributed.all_reduce(parameter.grad)


class NonPrivateTraining:
    """`privacy=none`: the same micro-batched step without clipping, noise or accounting."""

    enabled = False
    noise_multiplicity = 1  # one noise draw per image
    hooks = None  # no per-sample gradients

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world_size: int = 1) -> torch.optim.Optimizer:
        if world_size > 1:
            optimizer.register_step_pre_hook(_sum_gradients_over_ranks)
        return optimizer

    def backward(self, module, loss_per_sample: torch.Tensor) -> None:
        # Sum over the micro-batch (and, at the step, over ranks), mean over the logical
        # batch, whose size is fixed without Poisson sampling: micro-batches add up.
        module.manual_backward(loss_per_sample.sum() / self.batch_size)

    def end_micro_batch(self) -> None:
        """Gradients simply accumulate in `.grad` until the optimizer steps."""

    def take_gradient_norms(self) -> None:
        """No clipping, so no per-sample norms are computed."""

    budget_exhausted = False

    @property
    def epsilon(self) -> float:
        return math.inf

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


def check_resumable(state: dict[str, Any]) -> None:
    """A DP run resumes only a DP checkpoint."""
    if not state.get("enabled"):
        raise ValueError(
            "ckpt_path holds a run without privacy: its weights may have seen the data "
            "without DP, so no DP guarantee can be stated for the resumed run"
        )


def with_noise_from(optimizer_class: type, randomness: PrivateRandomness, step_of) -> type:
    """`optimizer_class` (any of Opacus' DP optimizers) whose noise phase draws
    N(0, sigma^2 C^2) from `randomness`' stream for step `step_of()` instead of torch's
    generator. As in Opacus' distributed optimizers, only rank 0 adds noise."""

    class SecretNoise(optimizer_class):
        def add_noise(self) -> None:
            params = self.params
            for p in params:
                _check_processed_flag(p.summed_grad)
            if getattr(self, "rank", 0) == 0 and self.noise_multiplier > 0:
                noises = randomness.gaussian_noise(step_of(), [p.summed_grad for p in params], self.noise_multiplier * self.max_grad_norm)
            else:
                noises = [torch.zeros_like(p.summed_grad) for p in params]
            for p, noise in zip(params, noises):
                p.grad = (p.summed_grad + noise).view_as(p)
                _mark_as_processed(p.summed_grad)

    SecretNoise.__name__ = SecretNoise.__qualname__ = f"SecretNoise{optimizer_class.__name__}"
    return SecretNoise


class DPSGDTraining:
    """DP-SGD (Abadi et al., 2016) through Opacus' per-sample gradients and accountants.

    Args:
        config: the privacy settings.
        sample_rate: Poisson sampling rate q = expected batch / dataset size.
        dataset_size: N, public.
        noise_multiplier: sigma (already calibrated when the config asked for it).
        randomness: where batch membership and noise come from (default: a new secret key
            under `secure_mode`, the seed 0's key otherwise).
    """

    enabled = True

    def __init__(
        self,
        config: PrivacyConfig,
        sample_rate: float,
        dataset_size: int,
        noise_multiplier: float,
        randomness: PrivateRandomness | None = None,
    ):
        self.config = config
        self.randomness = randomness or PrivateRandomness.create(secret=config.secure_mode)
        self.sample_rate = sample_rate
        self.dataset_size = dataset_size
        self.expected_batch_size = sample_rate * dataset_size
        self.noise_multiplier = noise_multiplier
        # Opacus' accountant keeps the history of (sigma, q, steps); epsilon comes from
        # `epsilon_of` with the configured accountant.
        self.accountant = create_accountant(mechanism="rdp")
        self.hooks = None
        self.optimizer = None
        # accountant steps the budget allows (None: no target, no limit)
        self.step_limit: int | None = None
        self._gradient_norms: list[torch.Tensor] = []
        self._epsilon_memo: tuple[int, float] = (0, 0.0)
        # where an init_ckpt_path run started from, and whether its spend counts
        self.init_checkpoint: dict[str, Any] | None = None

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world_size: int = 1) -> torch.optim.Optimizer:
        """Attach Opacus' per-sample gradient hooks to `model` and wrap `optimizer`; with
        `world_size` ranks, the optimizer adds noise on rank 0 and sums over ranks."""
        ghost = {"max_grad_norm": self.config.max_grad_norm, "use_ghost_clipping": True}
        self.hooks = prepare_module(
            model,
            self.config.clipping,
            wrap_model=False,
            batch_first=True,
            loss_reduction="mean",
            strict=True,
            **(ghost if self.config.clipping == "ghost" else {}),
        )
        self.hooks.GRAD_SAMPLERS = {layer: in_float32(f) for layer, f in self.hooks.GRAD_SAMPLERS.items()}
        if self.config.clipping == "ghost" and self.noise_multiplicity > 1:
            self._gather_ghost_draws(model)
        optimizer_class = get_optimizer_class(
            clipping="flat", distributed=world_size > 1, grad_sample_mode=self.config.clipping
        )
        # the noise of the step about to be accounted: its index in the history
        self.optimizer = with_noise_from(optimizer_class, self.randomness, lambda: self.steps)(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm,
            # each rank's share: the distributed optimizer divides the sum by world_size too
            expected_batch_size=self.expected_batch_size / world_size,
            loss_reduction="mean",
        )
        self.optimizer.attach_step_hook(self._account_step)
        return self.optimizer

    @property
    def noise_multiplicity(self) -> int:
        return self.config.noise_multiplicity

    def _gather_ghost_draws(self, model: torch.nn.Module) -> None:
        """Ghost clipping with K draws: this training's own norm samplers, per image. A layer
        type without a norm sampler gets one from its per-row gradients (Opacus' grad sampler,
        or functorch), which Opacus would otherwise turn into per-row norms."""
        draws = self.noise_multiplicity
        samplers = {
            layer: per_image_norm_sampler(f, draws, self.hooks.GRAD_SAMPLERS[layer] if layer is torch.nn.Linear else None)
            for layer, f in self.hooks.NORM_SAMPLERS.items()
        }
        for layer in {type(m) for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))}:
            if layer not in samplers:
                grad_sampler = self.hooks.GRAD_SAMPLERS.get(layer, ft_compute_per_sample_gradient)
                samplers[layer] = norm_of_mean_gradient_sampler(grad_sampler, draws)
        self.hooks.NORM_SAMPLERS = samplers

    def _account_step(self, optimizer) -> None:
        # Called by Opacus right after the noise is added: one step per logical batch.
        self.accountant.step(noise_multiplier=optimizer.noise_multiplier, sample_rate=self.sample_rate)

    def limit_steps(self, remaining_steps: int) -> int:
        """Stop the run where one more step would spend more than the target: returns how
        many of `remaining_steps` the budget allows."""
        if self.config.target_epsilon is None:
            return remaining_steps
        allowed = steps_within_budget(
            self.config.target_epsilon, self.config.delta, self.noise_multiplier, self.sample_rate,
            remaining_steps, self.config.accountant, self.accountant.history,
        )
        self.step_limit = self.steps + allowed
        return allowed

    def epsilon_due(self, steps_done: int, last: bool) -> bool:
        """Whether the dashboard shows epsilon after this step: always with RDP (cached,
        microseconds); with PLD and PRV, which take 0.05-1 s per evaluation, at a hundred
        points of the run and at its last step."""
        interval = 1 if self.config.accountant == "rdp" else max(1, (self.step_limit or steps_done) // 100)
        return last or self.budget_exhausted or steps_done % interval == 0

    @property
    def budget_exhausted(self) -> bool:
        return self.step_limit is not None and self.steps >= self.step_limit

    def epsilon_after_next_step(self) -> float:
        history = [*self.accountant.history, (self.noise_multiplier, self.sample_rate, 1)]
        return epsilon_of(history, self.config.delta, self.config.accountant)

    def backward(self, module, loss_per_sample: torch.Tensor) -> None:
        """Per-sample gradients of one micro-batch (their mean over the micro-batch)."""
        if self.config.clipping == "ghost":
            # Two passes: per-sample norms, then the gradient of the clipped-weighted loss.
            DPTensorFastGradientClipping(self.hooks, self.optimizer, loss_per_sample, "mean").backward()
            norms = self.hooks.per_sample_gradient_norms
        else:
            module.manual_backward(loss_per_sample.mean())
            if self.noise_multiplicity > 1:
                for parameter in self.optimizer.params:
                    parameter.grad_sample = mean_over_draws(parameter.grad_sample, self.noise_multiplicity)
            # Opacus computes these norms again when it clips; it does not keep them.
            norms = torch.stack([g.flatten(1).norm(dim=1) for g in self.optimizer.grad_samples], dim=1).norm(dim=1)
        self._gradient_norms.append(norms.detach())

    def take_gradient_norms(self) -> torch.Tensor:
        """The per-sample gradient norms (before clipping) of the step so far, and forget them.
        Computed from the private data without noise: a diagnostic, not a private statistic."""
        norms, self._gradient_norms = torch.cat(self._gradient_norms), []
        return norms

    def end_micro_batch(self) -> None:
        """Clip this micro-batch into the running sum without noise or an optimizer step."""
        self.optimizer.signal_skip_step(do_skip=True)
        with full_precision(self.optimizer.params[0].device):
            self.optimizer.step()
        self.optimizer.zero_grad()

    @property
    def steps(self) -> int:
        return steps_of(self.accountant.history)

    @property
    def epsilon(self) -> float:
        # PRV takes about a second per evaluation: evaluate once per step at most.
        steps = self.steps
        if self._epsilon_memo[0] != steps:
            self._epsilon_memo = (steps, epsilon_of(self.accountant.history, self.config.delta, self.config.accountant))
        return self._epsilon_memo[1]

    def state_dict(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "noise_multiplier": self.noise_multiplier,
            "history": list(self.accountant.history),
            "randomness": self.randomness.state_dict(),
            "init_checkpoint": self.init_checkpoint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_resumable(state)
        # (sigma, q, steps) entries mean the same to every accountant, so a run may
        # switch accountants on resume.
        self.accountant.history = [tuple(entry) for entry in state["history"]]
        self.init_checkpoint = state.get("init_checkpoint")
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
            "epsilon": self.epsilon,
            "delta": self.config.delta,
            "target_epsilon": self.config.target_epsilon,
            "epsilon_by_accountant": epsilon_by_accountant(self.accountant.history, self.config.delta),
            "epsilon_estimates": epsilon_by_accountant(self.accountant.history, self.config.delta, ESTIMATES),
            "epsilon_estimates_note": "not upper bounds: gdp is a central-limit approximation and may lie below the epsilon spent",
            **self.randomness.describe(),
            "step_limit": self.step_limit,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.config.max_grad_norm,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "accountant": self.config.accountant,
            "clipping": self.config.clipping,
            "noise_multiplicity": self.config.noise_multiplicity,
            "dataset_size": self.dataset_size,
            "expected_batch_size": self.expected_batch_size,
            "history": [list(entry) for entry in self.accountant.history],
            "init_checkpoint": self.init_checkpoint,
            "settings": asdict(self.config),
        }
