import pytest
import torch

from dpdit.diffusion import GaussianDiffusion
from dpdit.models import DiT


def tiny(learn_sigma=False, seed=0):
    torch.manual_seed(seed)
    return DiT(
        input_size=8,
        patch_size=2,
        in_channels=1,
        hidden_size=32,
        depth=2,
        num_heads=2,
        num_classes=3,
        learn_sigma=learn_sigma,
    )


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_training_losses_are_per_sample_and_train_every_output(learn_sigma):
    model = tiny(learn_sigma)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    loss = GaussianDiffusion().training_losses(model, torch.rand(5, 1, 8, 8) * 2 - 1, torch.randint(0, 3, (5,)))
    assert loss.shape == (5,) and torch.isfinite(loss).all()
    loss.sum().backward()
    grad = model.final_layer.linear.weight.grad.view(-1, 2 if learn_sigma else 1, 32)  # p*p rows per channel
    assert (grad.abs().sum(dim=(0, 2)) > 0).all()


def test_variance_bound_trains_only_the_variance_half():
    model = tiny(learn_sigma=True)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    diffusion = GaussianDiffusion()
    x0, t = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 500, 999])
    x_t = diffusion.scheduler.add_noise(x0, torch.randn_like(x0), t)
    output = model(x_t, t, torch.zeros(4, dtype=torch.long))
    eps, variance = output[:, :1], output[:, 1:]
    bound = diffusion._variational_bound(x0, x_t, t, eps.detach(), variance)
    assert bound.shape == (4,) and torch.isfinite(bound).all()
    assert (bound > -1e-6).all() and bound[0] > 0  # a KL (t > 0) or a negative log-likelihood (t = 0)
    (eps_grad,) = torch.autograd.grad(bound.sum(), output, retain_graph=True)
    assert eps_grad[:, :1].abs().sum() == 0 and eps_grad[:, 1:].abs().sum() > 0


def test_label_dropout_uses_the_null_class():
    diffusion = GaussianDiffusion(label_dropout=0.5)
    torch.manual_seed(0)
    dropped = diffusion.drop_labels(torch.zeros(10_000, dtype=torch.long), null_class=7)
    assert set(dropped.tolist()) == {0, 7}
    assert abs((dropped == 7).float().mean().item() - 0.5) < 0.03


@pytest.mark.parametrize("sampler", ["ddim", "dpm", "ddpm"])
def test_sampling_shapes_and_seed_reproducibility(sampler):
    model = tiny().eval()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    diffusion = GaussianDiffusion()
    labels = torch.tensor([0, 1, 2])

    def draw(seed):
        return diffusion.sample(model, labels, 3.0, 5, sampler, torch.Generator().manual_seed(seed), progress=False)

    first = draw(0)
    assert first.shape == (3, 1, 8, 8) and torch.isfinite(first).all()
    assert torch.equal(first, draw(0)) and not torch.equal(first, draw(1))


def test_guidance_combines_conditional_and_unconditional_predictions():
    model = tiny().eval()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    diffusion = GaussianDiffusion()
    x, labels = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    t = torch.full((2,), 400)
    cond, uncond = model(x, t, labels), model(x, t, torch.full_like(labels, model.null_class))
    torch.testing.assert_close(diffusion.guided_epsilon(model, x, 400, labels, 1.0), cond)
    torch.testing.assert_close(diffusion.guided_epsilon(model, x, 400, labels, 4.0), uncond + 4.0 * (cond - uncond))


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="sample.scheduler"):
        GaussianDiffusion().sample(tiny(), torch.tensor([0]), sampler="euler")


def test_log_normal_timesteps_follow_the_noise_level_distribution():
    diffusion = GaussianDiffusion(log_sigma_mean=1.0, log_sigma_std=0.5)
    torch.manual_seed(0)
    t = diffusion.sample_timesteps(20_000, torch.device("cpu"))
    log_sigma = diffusion.log_sigmas[t]
    assert abs(log_sigma.median().item() - 1.0) < 0.05
    assert abs(log_sigma.std().item() - 0.5) < 0.05
    uniform = GaussianDiffusion().sample_timesteps(20_000, torch.device("cpu"))
    assert abs(uniform.float().mean().item() - 499.5) < 10


def test_min_snr_weighting_scales_each_image_by_its_timesteps_weight():
    """Min-SNR-gamma: min(SNR_t, gamma) / SNR_t, so 1 where the noise is heavy (SNR <= gamma) and
    gamma / SNR_t, below 1, at the low-noise end; the same draws otherwise."""
    model = tiny()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    x, labels = torch.rand(64, 1, 8, 8) * 2 - 1, torch.randint(0, 3, (64,))
    plain, weighted = GaussianDiffusion(), GaussianDiffusion(min_snr_gamma=5.0)
    torch.manual_seed(3)
    t = plain.sample_timesteps(64, x.device)
    torch.manual_seed(3)
    unweighted = plain.training_losses(model, x, labels)
    torch.manual_seed(3)
    losses = weighted.training_losses(model, x, labels)
    alpha_bar = plain.scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    torch.testing.assert_close(losses, unweighted * torch.clamp(snr, max=5.0) / snr)
    assert (snr > 5.0).any() and (snr < 5.0).any()
    with pytest.raises(ValueError, match="diffusion.min_snr_gamma"):
        GaussianDiffusion(min_snr_gamma=0.0)
