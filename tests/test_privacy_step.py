"""The DP-SGD step of DiffusionModule, checked by numbers against micro-batched references.

A deterministic loss (fixed timestep and target) stands in for the diffusion loss so the
reference per-sample gradients can be recomputed one image at a time. The step runs
through a real Lightning Trainer with SGD(lr=1), so the update equals minus the gradient.
"""

import pytest
import torch

from dpdit.privacy import CLIPPING_MODES, DPSGD, NonPrivate, PrivacyConfig
from helpers import BATCH, ZeroLoss, batch, dp, norm, per_sample_gradients, run_step, tiny_model

U_VIT = {"long_skips": True, "output_conv": True}


@pytest.mark.parametrize("clipping", CLIPPING_MODES)
@pytest.mark.parametrize("physical_batch_size, options", [(BATCH, {}), (4, {}), (1, {}), (4, U_VIT)])
def test_clipped_update_matches_micro_batched_reference(clipping, physical_batch_size, options):
    images, labels = batch()
    per_sample = per_sample_gradients(images, labels, **options)
    norms = torch.stack([norm(g) for g in per_sample])
    bound = float(norms.median())  # half of the samples get clipped
    assert (norms > bound).any() and (norms < bound).any()
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    expected = [sum(f * g[k] for f, g in zip(factors, per_sample)) / BATCH for k in range(len(per_sample[0]))]
    # each clipped per-sample gradient respects the bound
    assert all(norm([f * x for x in g]) <= bound * (1 + 1e-9) for f, g in zip(factors, per_sample))

    _, update = run_step(
        dp(clipping, max_grad_norm=bound), physical_batch_size, data=(images, labels), model=tiny_model(**options)
    )
    for got, want in zip(update, expected):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("clipping", CLIPPING_MODES)
def test_every_micro_batch_counts(clipping):
    """Dropping any micro-batch from the reference changes the update by a lot."""
    images, labels = batch()
    per_sample = per_sample_gradients(images, labels)
    _, update = run_step(dp(clipping, max_grad_norm=1e6), physical_batch_size=2, data=(images, labels))
    for first in range(0, BATCH, 2):
        kept = [g for i, g in enumerate(per_sample) if not first <= i < first + 2]
        partial = [sum(g[k] for g in kept) / BATCH for k in range(len(per_sample[0]))]
        assert norm([u - p for u, p in zip(update, partial)]) > 1e-3 * norm(update)
    full = [sum(g[k] for g in per_sample) / BATCH for k in range(len(per_sample[0]))]
    assert norm([u - f for u, f in zip(update, full)]) < 1e-8 * norm(full)


@pytest.mark.parametrize("clipping", CLIPPING_MODES)
def test_dp_step_without_noise_or_clipping_equals_non_private_step(clipping):
    _, private = run_step(dp(clipping, max_grad_norm=1e6), physical_batch_size=4)
    _, baseline = run_step(NonPrivate(BATCH), physical_batch_size=4)
    for got, want in zip(private, baseline):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("clipping", CLIPPING_MODES)
def test_noise_has_the_expected_standard_deviation_once_per_logical_step(clipping):
    sigma, bound, expected_batch = 2.0, 0.5, 8
    privacy = DPSGD(
        PrivacyConfig(clipping=clipping, max_grad_norm=bound, noise_multiplier=sigma),
        sample_rate=0.5,
        dataset_size=2 * expected_batch,
        noise_multiplier=sigma,
    )
    torch.manual_seed(123)
    _, update = run_step(privacy, physical_batch_size=2, loss=ZeroLoss())
    noise = torch.cat([u.flatten() for u in update])
    want = sigma * bound / expected_batch
    n = noise.numel()
    # the sample std of n normal draws is within 5 standard errors (want / sqrt(2n))
    assert abs(noise.std().item() - want) < 5 * want / (2 * n) ** 0.5
    assert abs(noise.mean().item()) < 5 * want / n**0.5
    assert privacy.steps == 1


def test_empty_poisson_batch_still_adds_noise_and_counts_a_step():
    privacy = dp("ghost", max_grad_norm=1.0, noise_multiplier=1.0)
    empty = (torch.empty(0, 1, 8, 8, dtype=torch.float64), torch.empty(0, dtype=torch.long))
    _, update = run_step(privacy, physical_batch_size=4, data=empty)
    assert privacy.steps == 1
    assert all(torch.isfinite(u).all() for u in update)
    assert torch.cat([u.flatten() for u in update]).std() > 0.1 / BATCH


def test_accountant_counts_logical_steps_not_micro_batches():
    privacy = dp("hooks", noise_multiplier=1.0, statistics="off")  # the gradients' sigma alone
    module, _ = run_step(privacy, physical_batch_size=2, steps=3)
    assert privacy.steps == 3
    assert privacy.ledger.history == [(1.0, 1.0, 3)]
    assert module.trainer.global_step == 3


@pytest.mark.parametrize("clipping", ["hooks", "bookkeeping"])
@pytest.mark.parametrize("seed", range(4))
def test_bf16_mixed_clips_in_float32(seed, clipping):
    """Under bf16 autocast one image clipped to C moves the weights by exactly C / E.
    Per-sample gradients or norms left in bfloat16 miss C by about 0.1-0.3%."""
    bound = 1e-3  # far below every per-sample norm: the image is clipped
    images, labels = batch(size=1, seed=seed)
    _, update = run_step(
        dp(clipping, max_grad_norm=bound, dataset_size=1),
        physical_batch_size=1,
        data=(images.float(), labels),
        model=tiny_model().float(),
        precision="bf16-mixed",
    )
    assert all(u.dtype == torch.float32 for u in update)
    assert float(norm([u.double() for u in update])) == pytest.approx(bound, rel=1e-4)


@pytest.mark.parametrize(
    "precision, clipping, message",
    [
        ("16-mixed", "hooks", "trainer.precision=16-mixed is not supported with privacy=dp"),
        ("bf16-true", "hooks", "trainer.precision=bf16-true is not supported"),
        ("bf16-mixed", "ghost", "bf16-mixed with privacy.clipping=ghost.*Use privacy.clipping=hooks"),
        ("bf16-mixed", "functorch", "bf16-mixed with privacy.clipping=functorch.*Use privacy.clipping=hooks"),
    ],
)
def test_precisions_that_break_the_dp_step_are_refused(make_config, precision, clipping, message):
    from dpdit.build import setup
    from dpdit.cli import ConfigError

    with pytest.raises(ConfigError, match=message):
        setup(make_config(f"trainer.precision={precision}", f"privacy.clipping={clipping}"))


@pytest.mark.parametrize("clipping", ["hooks", "ghost", "bookkeeping"])
def test_gradients_are_freed_after_each_step(clipping):
    # zeroed instead (Opacus' default), they would be one more copy of the trained weights
    # through the next step's forward and backward pass
    module, _ = run_step(dp(clipping, noise_multiplier=1.0), physical_batch_size=BATCH // 2, steps=2)
    assert all(p.grad is None for p in module.model.parameters())
