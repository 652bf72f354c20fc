"""Accounting: the epsilon a history of noisy steps spends, the noise a target calls for,
and the ledger that records a run's steps and enforces its budget.

A history is a list of (noise multiplier, sample rate, steps) entries, the form Opacus'
accountants keep; every accountant here reads the same entries, so a run may switch
accountants on resume.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import numpy as np
from dp_accounting import dp_event, pld
from opacus.accountants import create_accountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from dpdit.bisection import bracket, last_fitting, narrow

# Accountants whose epsilon is an upper bound on the true one, tightest first: Google's
# privacy loss distributions (dp-accounting, pessimistic estimate), Opacus' PRV (its upper
# error bound) and RDP. Only these calibrate the noise, enforce the budget or fill `epsilon`.
ACCOUNTANTS = ("pld", "prv", "rdp")
# Accountants that only estimate: Opacus' GDP is a central-limit approximation that fell up
# to 80% below PLD on a grid. The report shows them beside the bounds, never as `epsilon`.
ESTIMATES = ("gdp",)
# PLD's value grid: coarser is faster and still pessimistic (about 0.01% above 1e-4's epsilon)
PLD_DISCRETIZATION = 1e-3
MAX_NOISE_MULTIPLIER = 1000.0

History = list[tuple[float, float, int]]
# Opacus' default RDP orders plus larger ones: with sample rates near 1 the best order is
# often above 63, and a missing order only makes epsilon looser, never wrong.
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [64, 80, 96, 128, 192, 256, 512, 1024])


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


def epsilon_by_accountant(
    history: History, delta: float, accountants: tuple[str, ...] = ACCOUNTANTS
) -> dict[str, float]:
    """The epsilon each of `accountants` gives for the same history."""
    return {accountant: epsilon_of(history, delta, accountant) for accountant in accountants}


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
        too_little,
        *bracketed,
        done=lambda low, high: target_epsilon - spent(high) <= tolerance or high - low <= 1e-6 * high,
    )
    return sigma


def steps_within_budget(
    target_epsilon: float,
    delta: float,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    history: History,
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


class PrivacyLedger:
    """A run's noisy steps at (noise multiplier, sample rate), the epsilon they spend under
    `accountant` at `delta`, and the budget `target_epsilon` (None: no budget)."""

    def __init__(
        self, noise_multiplier: float, sample_rate: float, delta: float, accountant: str, target_epsilon: float | None
    ):
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.delta = delta
        self.accountant = accountant
        self.target_epsilon = target_epsilon
        self.history: History = []
        # steps the budget allows in all (None: no target, no limit)
        self.step_limit: int | None = None
        self._epsilon_memo: tuple[int, float] = (0, 0.0)

    def record_step(self) -> None:
        """One more noisy step; consecutive steps at the same (sigma, q) share an entry, as in Opacus."""
        entry = (self.noise_multiplier, self.sample_rate)
        if self.history and tuple(self.history[-1][:2]) == entry:
            self.history[-1] = (*entry, self.history[-1][2] + 1)
        else:
            self.history.append((*entry, 1))

    @property
    def steps(self) -> int:
        return steps_of(self.history)

    @property
    def epsilon(self) -> float:
        # PRV takes about a second per evaluation: evaluate once per step at most.
        steps = self.steps
        if self._epsilon_memo[0] != steps:
            self._epsilon_memo = (steps, epsilon_of(self.history, self.delta, self.accountant))
        return self._epsilon_memo[1]

    def epsilon_after_next_step(self) -> float:
        return epsilon_of([*self.history, (self.noise_multiplier, self.sample_rate, 1)], self.delta, self.accountant)

    def limit_steps(self, remaining_steps: int) -> int:
        """Stop the run where one more step would spend more than the target: returns how
        many of `remaining_steps` the budget allows."""
        if self.target_epsilon is None:
            return remaining_steps
        allowed = steps_within_budget(
            self.target_epsilon,
            self.delta,
            self.noise_multiplier,
            self.sample_rate,
            remaining_steps,
            self.accountant,
            self.history,
        )
        self.step_limit = self.steps + allowed
        return allowed

    @property
    def budget_exhausted(self) -> bool:
        return self.step_limit is not None and self.steps >= self.step_limit

    def epsilon_due(self, last: bool) -> bool:
        """Whether the dashboard shows epsilon after this step: always with RDP (cached,
        microseconds); with PLD and PRV, which take 0.05-1 s per evaluation, at a hundred
        points of the run and at its last step."""
        interval = 1 if self.accountant == "rdp" else max(1, (self.step_limit or self.steps) // 100)
        return last or self.budget_exhausted or self.steps % interval == 0

    def report(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "epsilon_by_accountant": epsilon_by_accountant(self.history, self.delta),
            "epsilon_estimates": epsilon_by_accountant(self.history, self.delta, ESTIMATES),
            "epsilon_estimates_note": (
                "not upper bounds: gdp is a central-limit approximation and may lie below the epsilon spent"
            ),
        }
