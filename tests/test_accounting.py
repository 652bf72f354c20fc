"""Epsilon and calibration checked against an independent computation."""

import math

import numpy as np
import pytest
from scipy.special import gammaln, logsumexp

from dpdit.privacy import PrivacyConfig
from dpdit.privacy.accounting import (
    ACCOUNTANTS,
    ESTIMATES,
    RDP_ORDERS,
    _rdp_of_one_step,
    calibrate_noise_multiplier,
    epsilon_of,
)


def subsampled_gaussian_rdp(q: float, sigma: float, alpha: int) -> float:
    """RDP of the Poisson-subsampled Gaussian at integer order alpha (Mironov et al., 2019):
    log(sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2))) / (alpha - 1)."""
    k = np.arange(alpha + 1)
    log_binomial = gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
    log_terms = log_binomial + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
    return float(logsumexp(log_terms)) / (alpha - 1)


def independent_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """Best epsilon over integer orders with the conversion of Balle et al. (2020)."""
    best = math.inf
    for alpha in range(2, 257):
        rdp = steps * subsampled_gaussian_rdp(q, sigma, alpha)
        eps = rdp + math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        best = min(best, eps)
    return best


CASES = [(1.0, 0.01, 1000), (2.0, 0.1, 300), (7.5, 0.57, 450), (0.8, 0.5, 10)]


@pytest.mark.parametrize("sigma, q, steps", CASES)
def test_rdp_at_integer_orders_matches_independent_formula(sigma, q, steps):
    ours = _rdp_of_one_step(sigma, q)
    for index, order in enumerate(RDP_ORDERS):
        if float(order).is_integer() and order <= 256:
            assert ours[index] == pytest.approx(subsampled_gaussian_rdp(q, sigma, int(order)), rel=1e-8)


@pytest.mark.parametrize("sigma, q, steps", CASES)
def test_rdp_epsilon_matches_independent_computation(sigma, q, steps):
    ours = epsilon_of([(sigma, q, steps)], 1e-5, "rdp")
    independent = independent_epsilon(q, sigma, steps, 1e-5)
    # ours also searches fractional orders, so it can only be tighter, and only a little
    assert independent * 0.95 <= ours <= independent * (1 + 1e-9)


def test_history_composes_additively():
    split = epsilon_of([(2.0, 0.1, 100), (2.0, 0.1, 200)], 1e-5, "rdp")
    assert split == pytest.approx(epsilon_of([(2.0, 0.1, 300)], 1e-5, "rdp"), rel=1e-12)


@pytest.mark.parametrize("accountant", ["rdp", "prv", "gdp"])
def test_calibrated_sigma_spends_at_most_the_target(accountant):
    sigma = calibrate_noise_multiplier(10.0, 1e-5, 0.14, 600, accountant)
    spent = epsilon_of([(sigma, 0.14, 600)], 1e-5, accountant)
    assert 10.0 - 0.05 <= spent <= 10.0
    # a slightly smaller sigma would overspend: the calibration is tight
    assert epsilon_of([(sigma * 0.97, 0.14, 600)], 1e-5, accountant) > spent


def test_calibration_accounts_for_earlier_history():
    history = [(3.0, 0.5, 100)]
    sigma = calibrate_noise_multiplier(10.0, 1e-5, 0.5, 100, "rdp", history)
    assert epsilon_of([*history, (sigma, 0.5, 100)], 1e-5, "rdp") <= 10.0
    assert sigma > calibrate_noise_multiplier(10.0, 1e-5, 0.5, 100, "rdp")


def test_unreachable_target_is_refused():
    with pytest.raises(ValueError, match="unreachable"):
        calibrate_noise_multiplier(1e-6, 1e-5, 0.5, 1000, "rdp")


def dp_accounting_epsilon(q: float, sigma: float, steps: int, delta: float, accountant: str) -> float:
    """Epsilon from Google's dp-accounting, which shares no code with Opacus."""
    import dp_accounting
    from dp_accounting import pld, rdp

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    counter = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    return counter.compose(event).get_epsilon(delta)


@pytest.mark.parametrize("sigma, q, steps", [(1.0, 0.14, 600), (8.58, 0.57, 800), (2.0, 0.01, 2000)])
def test_epsilon_matches_google_dp_accounting(sigma, q, steps):
    # RDP: the same bound; ours searches more orders, so it can only be a little tighter
    theirs = dp_accounting_epsilon(q, sigma, steps, 1e-5, "rdp")
    assert theirs * 0.97 <= epsilon_of([(sigma, q, steps)], 1e-5, "rdp") <= theirs * (1 + 1e-6)
    # PRV against privacy loss distributions: two numerical routes to the same optimal epsilon
    assert epsilon_of([(sigma, q, steps)], 1e-5, "prv") == pytest.approx(
        dp_accounting_epsilon(q, sigma, steps, 1e-5, "pld"), rel=0.02
    )


GRID = [(target, q, steps) for target in (1.0, 3.0, 10.0) for q in (0.01, 0.2, 0.57) for steps in (10, 500)]


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.slow
def test_calibration_never_exceeds_the_target_over_a_grid(accountant):
    for target, q, steps in GRID:
        sigma = calibrate_noise_multiplier(target, 1e-5, q, steps, accountant)
        assert epsilon_of([(sigma, q, steps)], 1e-5, accountant) <= target, (target, q, steps)


@pytest.mark.slow
def test_prv_calibration_never_exceeds_the_target():
    # PRV costs about a second per evaluation: a corner of the grid
    for target, q, steps in [(1.0, 0.01, 500), (10.0, 0.57, 10), (3.0, 0.2, 500)]:
        sigma = calibrate_noise_multiplier(target, 1e-5, q, steps, "prv")
        assert epsilon_of([(sigma, q, steps)], 1e-5, "prv") <= target, (target, q, steps)


# 24 points: noise from 0.4 to 10, sample rates from 0.001 to 1, 1 to 5,000 steps, with the
# settings of the default digits run, a DPDM-like MNIST run and the smallest batches
BOUND_GRID = [
    (sigma, q, steps)
    for sigma, q in [(0.4, 0.01), (0.6, 0.043), (1.0, 0.001), (1.0, 0.068), (2.0, 0.2), (10.28, 0.684)]
    for steps in (1, 10, 800, 5000)
]


def fine_pld_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """dp-accounting's PLD at its default, finer value grid: closer to the true epsilon."""
    return dp_accounting_epsilon(q, sigma, steps, delta, "pld")


@pytest.mark.parametrize("sigma, q, steps", BOUND_GRID)
def test_every_bounding_accountant_is_at_or_above_pld(sigma, q, steps):
    """PLD (pessimistic) bounds the true epsilon from above; RDP and PRV may only be looser.
    Our coarser PLD grid is itself pessimistic: never below the finer one."""
    history = [(sigma, q, steps)]
    reference = fine_pld_epsilon(sigma, q, steps, 1e-5)
    assert reference * (1 - 1e-9) <= epsilon_of(history, 1e-5, "pld") <= reference * 1.05
    for accountant in ACCOUNTANTS:
        assert epsilon_of(history, 1e-5, accountant) >= reference * (1 - 1e-3), accountant


def test_gdp_falls_below_pld_and_is_refused():
    """The history of `data.batch_size=15 trainer.max_steps=10 privacy.target_epsilon=3` under
    GDP: GDP reports the target met while PLD gives more than twice as much."""
    sigma = calibrate_noise_multiplier(3.0, 1e-5, 15 / 1497, 10, "pld")
    gdp_sigma = calibrate_noise_multiplier(3.0, 1e-5, 15 / 1497, 10, "gdp")
    assert epsilon_of([(gdp_sigma, 15 / 1497, 10)], 1e-5, "gdp") <= 3.0
    assert epsilon_of([(gdp_sigma, 15 / 1497, 10)], 1e-5, "pld") > 7.0
    assert sigma > 1.3 * gdp_sigma
    assert "gdp" not in ACCOUNTANTS and "gdp" in ESTIMATES
    with pytest.raises(ValueError, match="privacy.accountant=gdp is a central-limit approximation.*pld"):
        PrivacyConfig(accountant="gdp").validate(dataset_size=1497)
