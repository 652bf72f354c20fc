"""The Lightning module: one logical DP-SGD step per training step, and an EMA of the weights."""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from dpdit.diffusion import GaussianDiffusion
from dpdit.distributed import check_replicas_identical
from dpdit.privacy import DPSGDTraining, NonPrivateTraining, check_parameters_held, full_precision, mean_over_draws
from dpdit.randomness import derived_seed


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one rank's model randomness (timesteps, diffusion noise, label dropout) in
    one step: independent across ranks, and the same in a resumed and an uninterrupted run.
    The DP mechanism's own draws (batches, noise) come from `dpdit.randomness` instead."""
    return derived_seed(seed, 1, rank, step)


def ema_with_warmup(decay: float) -> Callable:
    """EMA update whose decay ramps up as (1 + n) / (10 + n) towards `decay`: in a short run
    the first, far-from-final weights must fade fast, or they dominate the average."""

    @torch.no_grad()
    def update(ema_parameters, parameters, num_averaged) -> None:
        n = float(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        for ema_parameter, parameter in zip(ema_parameters, parameters):
            ema_parameter.lerp_(parameter, weight)

    return update


class DiffusionModule(L.LightningModule):
    """Trains `model` on the diffusion loss under `privacy` (DP-SGD or none).

    Each training step receives one logical batch and runs it as micro-batches of at most
    `physical_batch_size` images; the optimizer steps once per logical batch, so
    `trainer.max_steps` counts noisy (logical) steps. With the privacy's noise multiplicity
    K, each image is K rows of the forward pass (own timestep, noise and label dropout) and
    its loss is their mean. The EMA copy is post-processing of
    the private weights and costs no privacy; samples are drawn from it.

    Each step reseeds the model's random generators from (seed, rank, step), and the DP
    mechanism's batches and noise are keyed by the step, so a run resumed from a checkpoint
    continues exactly as the uninterrupted run would have.
    """

    def __init__(
        self,
        model: nn.Module,
        diffusion: GaussianDiffusion,
        optimizer: Callable[..., torch.optim.Optimizer],
        privacy: DPSGDTraining | NonPrivateTraining,
        physical_batch_size: int,
        ema_decay: float = 0.999,
        seed: int = 0,
        config: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        # The models' buffers are constants (positions, class-row maps): only weights average.
        self.ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(ema_decay), use_buffers=False)
        self.ema.requires_grad_(False)
        self.diffusion = diffusion
        self.optimizer_factory = optimizer
        self.privacy = privacy
        self.physical_batch_size = physical_batch_size
        self.seed = seed
        # the resolved run configuration, saved in checkpoints so that they rebuild their model
        self.config = config

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return self.privacy.prepare(self.model, self.optimizer_factory(trainable), self.trainer.world_size)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        torch.manual_seed(step_seed(self.seed, self.global_rank, self.global_step))
        images, labels = batch
        optimizer = self.optimizers()
        batch_size = images.shape[0]
        # Poisson sampling can draw an empty batch; the step must still add its noise and be
        # accounted. Opacus cannot run an empty batch, so one zero-weighted placeholder image
        # (data-independent, contributing exactly nothing) goes through instead.
        weight = 1.0 if batch_size else 0.0
        if not batch_size:
            images = images.new_zeros((1, *images.shape[1:]))
            labels = labels.new_full((1,), self.model.null_class)
        chunks = list(zip(images.split(self.physical_batch_size), labels.split(self.physical_batch_size)))
        loss_sum = torch.zeros((), device=images.device)
        draws = self.privacy.noise_multiplicity
        for index, (x, y) in enumerate(chunks):
            if draws > 1:
                x, y = x.repeat_interleave(draws, dim=0), y.repeat_interleave(draws, dim=0)
            loss_per_sample = weight * mean_over_draws(self.diffusion.training_losses(self.model, x, y), draws)
            self.privacy.backward(self, loss_per_sample)
            loss_sum += loss_per_sample.detach().sum()
            if index < len(chunks) - 1:
                self.privacy.end_micro_batch()
        with full_precision(images.device):
            optimizer.step()
        optimizer.zero_grad()
        self.ema.update_parameters(self.model)

        loss = self.log_step(loss_sum, batch_size, optimizer)
        if self.privacy.budget_exhausted:
            self.trainer.should_stop = True
        return loss

    def log_step(self, loss_sum: torch.Tensor, batch_size: int, optimizer) -> torch.Tensor:
        """The global batch's loss and size (summed over ranks), the learning rate, and under
        DP the privacy dashboard: epsilon so far and the mechanism's settings, and, as
        non-private diagnostics, the share of per-sample gradients clipped and their mean norm."""
        totals = [loss_sum, loss_sum.new_tensor(batch_size)]
        norms = self.privacy.take_gradient_norms()
        if norms is not None:
            # An empty batch's placeholder image has no gradient to count.
            counted = norms[:batch_size]
            clipped = (counted > self.privacy.config.max_grad_norm).sum()
            totals += [clipped.to(loss_sum), counted.sum().to(loss_sum)]
        totals = self.trainer.strategy.reduce(torch.stack(totals), reduce_op="sum")
        images = totals[1].clamp(min=1)
        loss = totals[0] / images
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/batch_size", totals[1])
        self.log("train/lr", optimizer.param_groups[0]["lr"])
        if not self.privacy.enabled:
            return loss
        if self.privacy.epsilon_due(self.privacy.steps, last=self.global_step >= self.trainer.max_steps):
            self.log("privacy/epsilon", self.privacy.epsilon, prog_bar=True)
        self.log("privacy/noise_multiplier", self.privacy.noise_multiplier)
        self.log("privacy/sample_rate", self.privacy.sample_rate)
        self.log("privacy/max_grad_norm", self.privacy.config.max_grad_norm)
        if totals[1] > 0:
            self.log("nonprivate/clipped_fraction", totals[2] / images)
            self.log("nonprivate/grad_norm_mean", totals[3] / images)
        return loss

    def on_train_start(self) -> None:
        # Lightning has moved the model to its device and made the optimizer: both must still
        # see the same parameter objects, or the weights would silently never change.
        check_parameters_held(self.model, self.optimizers().optimizer, self.privacy.hooks)
        # a resumed run whose budget is already spent takes no step
        if self.privacy.budget_exhausted:
            self.trainer.should_stop = True

    def on_train_end(self) -> None:
        if self.trainer.world_size > 1:
            check_replicas_identical(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["privacy"] = self.privacy.state_dict()
        if self.config is not None:
            checkpoint["config"] = self.config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.privacy.load_state_dict(checkpoint.get("privacy", {"enabled": False}))
