"""Noise multiplicity: each image's gradient is the mean over its K noise draws, clipped once.

The reference recomputes every draw's gradient alone (one row at a time) from the very
timesteps and noise the training step drew, averages each image's K draws, clips the mean
and averages over the batch.
"""

import copy

import pytest
import torch
from torch import nn

from dpdit.privacy import CLIPPING_MODES, DPSGD, PrivacyConfig, gram_matrices_outweigh_gradient
from helpers import BATCH, OwnDraws, Scale, batch, latent_batch, norm, pretrained, run_step, tiny_model


class RecordedDraws(OwnDraws):
    """A diffusion-like loss with random timesteps and noise per row; it keeps every row it
    drew (image, label, timestep, noise), in the order of the forward passes."""

    def __init__(self):
        self.rows = []

    def training_losses(self, model, x, y, draws=None):
        t = torch.randint(0, 1000, (x.shape[0],))
        noise = torch.randn_like(x)
        self.rows += list(zip(x, y, t, noise))
        return self.row_loss(model, x, y, t, noise)

    @staticmethod
    def row_loss(model, x, y, t, noise):
        return ((model(x, t, y)[:, : x.shape[1]] - noise) ** 2).flatten(1).mean(1)


def dp(clipping, draws, max_grad_norm, noise_multiplier=0.0):
    config = PrivacyConfig(
        clipping=clipping,
        max_grad_norm=max_grad_norm,
        noise_multiplier=noise_multiplier,
        noise_multiplicity=draws,
        statistics="nonprivate",  # the exact norms these tests compare
    )
    return DPSGD(config, sample_rate=1.0, dataset_size=BATCH, noise_multiplier=noise_multiplier)


def row_gradients(model, rows):
    """Each drawn row's gradient, computed alone."""
    grads = []
    for x, y, t, noise in rows:
        reference = copy.deepcopy(model)
        RecordedDraws.row_loss(reference, x[None], y[None], t[None], noise[None]).sum().backward()
        grads.append([p.grad if p.grad is not None else torch.zeros_like(p) for p in reference.parameters()])
    return grads


def mean_of(gradients):
    return [sum(parts) / len(gradients) for parts in zip(*gradients)]


def check_update(model, data, clipping, draws, physical_batch_size):
    """Run one step with a bound that clips half the images; compare with the reference.
    Returns the per-draw gradients for further checks."""
    # Find the bound from an unclipped run's draws: the same seed draws the same rows.
    probe = RecordedDraws()
    run_step(dp(clipping, draws, 1e6), physical_batch_size, loss=probe, data=data, model=copy.deepcopy(model))
    per_row = row_gradients(model, probe.rows)
    assert len(per_row) == BATCH * draws
    per_image = [mean_of(per_row[i * draws : (i + 1) * draws]) for i in range(BATCH)]
    norms = torch.stack([norm(g) for g in per_image])
    bound = float(norms.median())
    assert (norms > bound).any() and (norms < bound).any()
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    expected = [sum(f * g[k] for f, g in zip(factors, per_image)) / BATCH for k in range(len(per_image[0]))]

    loss = RecordedDraws()
    module, update = run_step(
        dp(clipping, draws, bound), physical_batch_size, loss=loss, data=data, model=copy.deepcopy(model)
    )
    assert all(torch.equal(a[3], b[3]) for a, b in zip(loss.rows, probe.rows)), "the two runs drew different noise"
    for got, want in zip(update, expected):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    # the dashboard's norms are the images', before clipping
    logged = module.trainer.callback_metrics["nonprivate/grad_norm_mean"]
    assert float(logged) == pytest.approx(float(norms.mean()), rel=1e-6)
    return per_row, bound


@pytest.mark.parametrize("clipping", CLIPPING_MODES)
@pytest.mark.parametrize("draws", [1, 3])
@pytest.mark.parametrize("physical_batch_size", [BATCH, 4])
def test_image_gradient_is_the_mean_of_its_draws_clipped_once(clipping, draws, physical_batch_size):
    torch.manual_seed(0)
    per_row, bound = check_update(tiny_model(), batch(), clipping, draws, physical_batch_size)
    if draws > 1:
        # Clipping each draw before averaging (not what DPDM does) gives another update:
        # the test tells the two apart.
        clipped_rows = [[(bound / (norm(g) + 1e-6)).clamp(max=1.0) * p for p in g] for g in per_row]
        once = [mean_of(per_row[i * draws : (i + 1) * draws]) for i in range(BATCH)]
        each = [mean_of(clipped_rows[i * draws : (i + 1) * draws]) for i in range(BATCH)]
        assert max(float(norm([a - b for a, b in zip(x, y)])) for x, y in zip(once, each)) > 1e-3 * bound


@pytest.mark.parametrize("clipping", CLIPPING_MODES)
def test_pretrained_image_gradient_is_the_mean_of_its_draws(tiny_pipeline, clipping):
    torch.manual_seed(0)
    check_update(
        pretrained(tiny_pipeline, finetune="full").double(), latent_batch(), clipping, draws=2, physical_batch_size=4
    )


@pytest.mark.parametrize("draws", [1, 4])
def test_accounting_does_not_depend_on_the_number_of_draws(draws):
    privacy = dp("hooks", draws, max_grad_norm=1.0, noise_multiplier=1.3)
    run_step(privacy, physical_batch_size=4, loss=RecordedDraws(), steps=2)
    assert privacy.ledger.history == [(1.3, 1.0, 2)]


@pytest.mark.slow
def test_calibrated_noise_does_not_depend_on_the_number_of_draws(make_config):
    from dpdit.build import setup

    sigmas = [
        setup(make_config(f"privacy.noise_multiplicity={k}", name=f"k{k}"))[1].privacy.noise_multiplier for k in (1, 8)
    ]
    assert sigmas[0] == sigmas[1]


@pytest.mark.parametrize("draws", [0, -2, 1.5])
def test_invalid_noise_multiplicity_is_refused_before_training(make_config, draws):
    from dpdit.build import setup
    from dpdit.cli import ConfigError

    with pytest.raises(ConfigError, match=f"privacy.noise_multiplicity={draws} must be a whole number >= 1"):
        setup(make_config(f"privacy.noise_multiplicity={draws}"))


def check_ghost_norms_with_draws(model, rows, draws):
    """Ghost clipping's norms with `draws` rows per image against autograd's norm of each
    image's mean gradient."""
    expected = []
    for i in range(rows.shape[0] // draws):
        model.zero_grad()
        (model(rows[i * draws : (i + 1) * draws]) ** 2).flatten(1).sum(1).mean().backward()
        expected.append(norm([p.grad for p in model.parameters()]))

    privacy = dp("ghost", draws, max_grad_norm=1.0)
    privacy.attach(model, torch.optim.SGD(model.parameters(), lr=1.0), losses=None, backward=None)
    privacy.per_sample_gradients((model(rows) ** 2).flatten(1).sum(1).unflatten(0, (-1, draws)).mean(1))
    torch.testing.assert_close(privacy.take_gradient_norms(), torch.stack(expected), rtol=1e-9, atol=0)


@pytest.mark.parametrize("layers", [[nn.Linear(4, 4), Scale()], [nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 4)]])
def test_ghost_norms_with_draws_are_the_norms_of_each_images_mean_gradient(layers):
    """Layers with a norm sampler (Linear), with a grad sampler only (Conv2d) and with neither."""
    torch.manual_seed(0)
    draws, images = 3, 4
    rows = torch.randn(images * draws, *((1, 4, 4) if isinstance(layers[0], nn.Conv2d) else (4,)), dtype=torch.float64)
    check_ghost_norms_with_draws(nn.Sequential(*layers).double(), rows, draws)


@pytest.mark.parametrize("tokens, gradient_formed", [(1, False), (4, True)])
def test_ghost_norms_with_draws_over_sequences(tokens, gradient_formed):
    """A Linear over a sequence: with few tokens per image its ghost norm folds the draws
    into the Gram matrices; with more, forming the per-image gradient is cheaper. Both are
    the norm of each image's mean gradient."""
    torch.manual_seed(0)
    draws, images = 3, 4
    model = nn.Linear(8, 8).double()
    assert gram_matrices_outweigh_gradient(model, draws * tokens) == gradient_formed
    check_ghost_norms_with_draws(model, torch.randn(images * draws, tokens, 8, dtype=torch.float64), draws)
