"""Gaussian diffusion around diffusers' schedulers: per-sample training loss and CFG sampling.

Training uses the DDPM forward process (`DDPMScheduler.add_noise`); sampling builds a DDIM,
DPM-Solver or DDPM scheduler from the same configuration, so schedules always agree.
The loss is returned per sample (shape [B]): DP-SGD clips each sample's gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from tqdm.auto import tqdm

SAMPLERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "ddpm": DDPMScheduler}


def mean_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale) -> torch.Tensor:
    """Log-likelihood of 8-bit data x in [-1, 1] under N(mean, exp(log_scale)^2), binned."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (x - mean + 1.0 / 255))
    cdf_min = torch.special.ndtr(inv_std * (x - mean - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


@dataclass
class TrainingDraws:
    """Training rows' own randomness: each row's timestep, diffusion noise and whether its
    label is dropped."""

    t: torch.Tensor
    noise: torch.Tensor
    drop: torch.Tensor

    def __len__(self) -> int:
        return len(self.t)

    def rows(self, index) -> TrainingDraws:
        return TrainingDraws(self.t[index], self.noise[index], self.drop[index])

    def to(self, device: torch.device) -> TrainingDraws:
        return TrainingDraws(self.t.to(device), self.noise.to(device), self.drop.to(device))


class GaussianDiffusion:
    """Epsilon-prediction diffusion with classifier-free guidance.

    Args:
        num_train_timesteps, beta_schedule, beta_start, beta_end: the DDPM noise schedule.
        label_dropout: probability that a training image's label is replaced by the model's
            null class, which teaches the unconditional model CFG needs.
        clip_sample: clip predicted images to [-1, 1] while sampling (pixel space only).
        log_sigma_mean, log_sigma_std: with a mean, training timesteps are drawn so that the
            noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) is log-normal (as in
            EDM and DPDM) instead of uniform over t. Under DP this spends the clipped
            per-sample gradients on the noise levels that shape the images, not on the
            lowest ones, whose gradients are large and mostly noise.
        min_snr_gamma: with a value, each image's epsilon loss is weighted by
            min(SNR_t, gamma) / SNR_t (Min-SNR-gamma, Hang et al. 2023): the low-noise
            timesteps, whose near-identity denoising dominates the uniform loss, count less.
            Unlike log-normal timesteps it still trains the high-noise levels sampling
            starts from.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        label_dropout: float = 0.1,
        clip_sample: bool = True,
        log_sigma_mean: float | None = None,
        log_sigma_std: float = 1.2,
        min_snr_gamma: float | None = None,
    ):
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"diffusion.label_dropout={label_dropout} must lie in [0, 1)")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"diffusion.min_snr_gamma={min_snr_gamma} must be positive (or null: no weighting)")
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
            clip_sample=clip_sample,
            prediction_type="epsilon",
        )
        self.num_train_timesteps = num_train_timesteps
        self.label_dropout = label_dropout
        self.log_sigma_mean = log_sigma_mean
        self.log_sigma_std = log_sigma_std
        alphas_cumprod = self.scheduler.alphas_cumprod
        self.log_sigmas = 0.5 * torch.log((1.0 - alphas_cumprod) / alphas_cumprod)
        snr = alphas_cumprod / (1.0 - alphas_cumprod)
        self.loss_weights = None if min_snr_gamma is None else snr.clamp(max=min_snr_gamma) / snr
        self._posterior = self._posterior_tables()

    def _posterior_tables(self) -> dict[str, torch.Tensor]:
        """Coefficients of q(x_{t-1} | x_t, x_0), for the learned-variance bound."""
        betas = self.scheduler.betas.double()
        alphas_cumprod = self.scheduler.alphas_cumprod.double()
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        return {
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            # variance[0] is 0; the log is clipped as in Nichol & Dhariwal (2021)
            "log_variance": torch.log(torch.cat([variance[1:2], variance[1:]])),
            "log_betas": torch.log(betas),
            "mean_coef_x0": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "mean_coef_xt": (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
        }

    def _table(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self._posterior[name].to(like.device)[t].to(like.dtype).view(-1, *[1] * (like.dim() - 1))

    def drop_labels(self, labels: torch.Tensor, null_class: int, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Replace each label by the null class where `drop` says (None: with probability
        `label_dropout`, drawn here)."""
        if drop is None:
            drop = torch.rand(labels.shape, device=labels.device) < self.label_dropout
        return torch.where(drop, torch.full_like(labels, null_class), labels)

    def sample_timesteps(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.log_sigma_mean is None:
            return torch.randint(0, self.num_train_timesteps, (n,), device=device, generator=generator)
        log_sigma = self.log_sigma_mean + self.log_sigma_std * torch.randn(n, generator=generator)
        t = torch.searchsorted(self.log_sigmas, log_sigma).clamp(max=self.num_train_timesteps - 1)
        return t.to(device)

    def draw(self, n: int, shape: torch.Size, dtype: torch.dtype, generator: torch.Generator) -> TrainingDraws:
        """`n` training rows' own randomness for inputs of `shape`, on the CPU from `generator`."""
        t = self.sample_timesteps(n, torch.device("cpu"), generator)
        noise = torch.randn((n, *shape), generator=generator, dtype=dtype)
        drop = torch.rand(n, generator=generator) < self.label_dropout
        return TrainingDraws(t, noise, drop)

    def training_losses(
        self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor, draws: TrainingDraws | None = None
    ) -> torch.Tensor:
        """Per-sample loss [B]: epsilon MSE (Min-SNR weighted if asked), plus the variational
        bound if sigma is learned. `draws`: each row's timestep, noise and label dropout
        (None: drawn here from torch's generator)."""
        if draws is None:
            t = self.sample_timesteps(x0.shape[0], x0.device)
            noise = torch.randn_like(x0)
            labels = self.drop_labels(labels, model.null_class)
        else:
            t, noise = draws.t, draws.noise
            labels = self.drop_labels(labels, model.null_class, draws.drop)
        x_t = self.scheduler.add_noise(x0, noise, t)
        output = model(x_t, t, labels)
        eps = output[:, : x0.shape[1]]
        loss = mean_per_sample((eps - noise) ** 2)
        if self.loss_weights is not None:
            loss = loss * self.loss_weights.to(loss.device)[t].to(loss.dtype)
        if model.learn_sigma:
            variance = output[:, x0.shape[1] :]
            # The bound trains only the variance: the mean comes from a frozen epsilon.
            loss = loss + self._variational_bound(x0, x_t, t, eps.detach(), variance)
        return loss

    def _variational_bound(self, x0, x_t, t, eps, variance_values) -> torch.Tensor:
        """L_vlb term of Improved DDPM in bits per dimension, scaled as in DiT."""
        fraction = (variance_values + 1.0) / 2.0
        model_log_variance = fraction * self._table("log_betas", t, x0) + (1.0 - fraction) * self._table(
            "log_variance", t, x0
        )
        x0_predicted = (x_t - self._table("sqrt_one_minus_alphas_cumprod", t, x0) * eps) / self._table(
            "sqrt_alphas_cumprod", t, x0
        )
        coef_x0, coef_xt = self._table("mean_coef_x0", t, x0), self._table("mean_coef_xt", t, x0)
        model_mean = coef_x0 * x0_predicted + coef_xt * x_t
        true_mean = coef_x0 * x0 + coef_xt * x_t
        kl = mean_per_sample(normal_kl(true_mean, self._table("log_variance", t, x0), model_mean, model_log_variance))
        nll = -mean_per_sample(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance))
        bits = torch.where(t == 0, nll, kl) / math.log(2.0)
        return bits * self.num_train_timesteps / 1000.0

    def guided_epsilon(self, model, x, t, labels, guidance_scale: float) -> torch.Tensor:
        """eps_uncond + s * (eps_cond - eps_uncond), both halves in one forward pass."""
        channels = x.shape[1]
        timesteps = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        if guidance_scale == 1.0:
            return model(x, timesteps, labels)[:, :channels]
        null = torch.full_like(labels, model.null_class)
        eps = model(torch.cat([x, x]), torch.cat([timesteps, timesteps]), torch.cat([labels, null]))
        eps_cond, eps_uncond = eps[:, :channels].chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    def sampling_scheduler(self, sampler: str, pixel_space: bool):
        """A `sampler` (ddim, dpm or ddpm) scheduler of the training noise schedule."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sample.scheduler={sampler!r} is unknown: choose one of {', '.join(SAMPLERS)}")
        # Clipping x0 to [-1, 1] suits pixels only; VAE latents range wider.
        return SAMPLERS[sampler].from_config(
            self.scheduler.config, clip_sample=self.scheduler.config.clip_sample and pixel_space
        )

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        labels: torch.Tensor,
        guidance_scale: float = 4.0,
        num_steps: int = 50,
        sampler: str = "ddim",
        generator: torch.Generator | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """Class-conditional samples in model space (pixels in [-1, 1], or latents), one per label."""
        scheduler = self.sampling_scheduler(sampler, pixel_space=model.vae is None)
        scheduler.set_timesteps(num_steps)
        shape = (labels.shape[0], model.in_channels, model.input_size, model.input_size)
        # in the model's precision: a 64-true run's model is float64
        dtype = next(model.parameters()).dtype
        x = randn_tensor(shape, generator=generator, device=labels.device, dtype=dtype) * scheduler.init_noise_sigma
        for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False):
            eps = self.guided_epsilon(model, scheduler.scale_model_input(x, t), t, labels, guidance_scale)
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
        return x
