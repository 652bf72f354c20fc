"""The Lightning module: one logical DP-SGD step per training step, and an EMA of the weights."""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import lightning as L
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.optim.swa_utils import AveragedModel

from dpdit.diffusion import GaussianDiffusion
from dpdit.distributed import DPFSDPStrategy, check_replicas_identical, shard
from dpdit.privacy import Mechanism
from dpdit.randomness import derived_seed


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of torch's generator on one rank in one step (what the model draws beyond
    its images' draws: a placeholder's). The DP mechanism's own draws (batches, noise) come
    from `dpdit.randomness` instead."""
    return derived_seed(seed, 1, rank, step)


class StepDraws:
    """The model's randomness of one step (each row's timestep, noise and label dropout),
    drawn for the whole global batch from (seed, step) and handed out to this rank's images
    in the order the DP step runs them. Rank r holds the images at positions r, r + W, ...
    of the global batch (`dpdit.data.LogicalBatchSampler`), so an image gets the same draws
    however many ranks share the batch: a run resumed on another number of processes
    continues as the uninterrupted run would have. Placeholder micro-batches (zero weight),
    past this rank's images, get none."""

    def __init__(
        self,
        diffusion,
        seed: int,
        step: int,
        images: torch.Tensor,
        draws_per_image: int,
        rank: int,
        world_size: int,
        total: int,
    ):
        generator = torch.Generator().manual_seed(derived_seed(seed, 2, step))
        everything = diffusion.draw(total * draws_per_image, images.shape[1:], images.dtype, generator)
        positions = rank + world_size * torch.arange(images.shape[0])
        if len(positions) and positions[-1] >= total:
            raise ValueError(
                f"rank {rank} of {world_size} holds {len(positions)} images of a global batch of {total}: "
                "dpdit's batch sampler gives rank r the images r, r + W, ... of each batch"
            )
        rows = (positions[:, None] * draws_per_image + torch.arange(draws_per_image)).flatten()
        self.draws = everything.rows(rows).to(images.device)
        self.taken = 0

    def take(self, rows: int):
        """The next `rows` rows' draws; None past this rank's images."""
        if self.taken + rows > len(self.draws):
            return None
        self.taken += rows
        return self.draws.rows(slice(self.taken - rows, self.taken))


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


class LearningRateSchedule:
    """The optimizer's learning rate over a run: a linear warm-up over `warmup_steps`, then
    `decay`: `constant`, or `cosine` down to 0 at the run's last step. A function of the
    step alone, so a resumed run follows the uninterrupted run's rates. Under DP it reads
    no data: it is part of the (public) algorithm."""

    DECAYS = ("constant", "cosine")

    def __init__(self, warmup_steps: int = 0, decay: str = "constant"):
        if warmup_steps < 0:
            raise ValueError(f"lr_schedule.warmup_steps={warmup_steps} must be at least 0")
        if decay not in self.DECAYS:
            raise ValueError(f"lr_schedule.decay={decay!r} is unknown: choose one of {', '.join(self.DECAYS)}")
        self.warmup_steps = warmup_steps
        self.decay = decay

    def factor(self, step: int, max_steps: int) -> float:
        """The multiple of the configured learning rate that step `step` (from 0) uses."""
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.decay == "constant" or max_steps <= 0:
            return warmup
        return warmup * 0.5 * (1.0 + math.cos(math.pi * min(step, max_steps) / max_steps))


class TrainedWeightsAverage(AveragedModel):
    """An EMA copy of a model that averages only the parameters training changes: frozen
    ones (a fine-tuned DiT-XL/2's 600M base weights) are copied at the first update and,
    never changing, equal the model's ever after. The copy keeps every weight, so
    checkpoints and the exported pipeline hold the whole model."""

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if self.n_averaged == 0:
            super().update_parameters(model)
            return
        trained = [(average, p) for average, p in zip(self.module.parameters(), model.parameters()) if p.requires_grad]
        self.multi_avg_fn([average for average, _ in trained], [p.detach() for _, p in trained], self.n_averaged)
        self.n_averaged += 1


def without_weights(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters are on the meta device (no memory; a state dict
    loaded with `assign=True` fills them); buffers are copied."""
    memo = {id(p): nn.Parameter(p.detach().to("meta"), p.requires_grad) for p in module.parameters()}
    return copy.deepcopy(module, memo)


class DiffusionModule(L.LightningModule):
    """Trains `model` on the diffusion loss under `privacy` (DP-SGD or none).

    Each training step receives one logical batch and runs it as micro-batches of at most
    `physical_batch_size` images; the optimizer steps once per logical batch, so
    `trainer.max_steps` counts noisy (logical) steps. With the privacy's noise multiplicity
    K, each image is K rows of the forward pass (own timestep, noise and label dropout) and
    its loss is their mean. The EMA copy is post-processing of
    the private weights and costs no privacy; samples are drawn from it.

    Each step's model draws come from (seed, step) (`StepDraws`), and the DP mechanism's
    batches and noise are keyed by the step, so a run resumed from a checkpoint continues
    exactly as the uninterrupted run would have, on any number of processes.
    """

    def __init__(
        self,
        model: nn.Module,
        diffusion: GaussianDiffusion,
        optimizer: Callable[..., torch.optim.Optimizer],
        privacy: Mechanism,
        physical_batch_size: int,
        ema_decay: float = 0.999,
        seed: int = 0,
        config: dict[str, Any] | None = None,
        lr_schedule: LearningRateSchedule | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        # The models' buffers are constants (positions, class-row maps): only weights average.
        self.ema = TrainedWeightsAverage(model, multi_avg_fn=ema_with_warmup(ema_decay), use_buffers=False)
        self.ema.requires_grad_(False)
        self.diffusion = diffusion
        self.optimizer_factory = optimizer
        self.privacy = privacy
        self.physical_batch_size = physical_batch_size
        self.lr_schedule = lr_schedule or LearningRateSchedule()
        self.seed = seed
        # the resolved run configuration, saved in checkpoints so that they rebuild their model
        self.config = config

    def configure_model(self) -> None:
        """Under `DPFSDPStrategy`, shard the model and its EMA alike (each rank then holds its
        rows of both), keeping an empty (meta) copy of the EMA's structure to gather into."""
        strategy = self.trainer.strategy
        if not isinstance(strategy, DPFSDPStrategy) or isinstance(self.model, FSDPModule):
            return
        # not a submodule: FSDP, checkpoints and the optimizer must not see it
        object.__setattr__(self, "unsharded_ema", without_weights(self.ema.module))
        mesh = strategy.device_mesh["data_parallel"]
        shard(self.model, mesh, strategy.policy)
        shard(self.ema.module, mesh, strategy.policy)

    def sampling_model(self) -> nn.Module | None:
        """The EMA weights as a plain module to sample from or export. Under FSDP every rank
        must call this (the weights are gathered from all of them); rank 0 gets the module,
        the others None."""
        if not isinstance(self.ema.module, FSDPModule):
            return self.ema.module
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.ema.module, options=options)
        if not self.trainer.is_global_zero:
            return None
        self.unsharded_ema.load_state_dict(weights, assign=True)
        return self.unsharded_ema.to(self.device)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(trainable)
        self.base_learning_rates = [group["lr"] for group in optimizer.param_groups]
        return self.privacy.attach(
            self.model, optimizer, self.per_image_losses, self.manual_backward, self.trainer.world_size
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        torch.manual_seed(step_seed(self.seed, self.global_rank, self.global_step))
        images, labels = batch
        world_size = self.trainer.world_size
        total = images.new_tensor(images.shape[0], dtype=torch.long)
        if world_size > 1:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
        self.step_draws = StepDraws(
            self.diffusion,
            self.seed,
            self.global_step,
            images,
            self.privacy.noise_multiplicity,
            self.global_rank,
            world_size,
            int(total),
        )
        factor = self.lr_schedule.factor(self.global_step, self.trainer.max_steps)
        for group, base in zip(self.optimizers().param_groups, self.base_learning_rates):
            group["lr"] = base * factor
        sums = self.privacy.step(images, labels, self.optimizers(), self.physical_batch_size)
        self.ema.update_parameters(self.model)
        loss = self.log_step(sums)
        if self.privacy.budget_exhausted:
            self.trainer.should_stop = True
        return loss

    def per_image_losses(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.diffusion.training_losses(self.model, images, labels, self.step_draws.take(len(images)))

    def log_step(self, sums: dict[str, torch.Tensor]) -> torch.Tensor:
        """The learning rate, the mechanism's dashboard and, where the mechanism releases exact
        values, the global batch's loss and size (summed over ranks)."""
        totals = self.trainer.strategy.reduce(torch.stack(list(sums.values())), reduce_op="sum")
        sums = dict(zip(sums, totals))
        loss = sums["loss"] / sums["images"].clamp(min=1)
        if self.privacy.releases_exact_values:
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/batch_size", sums["images"])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        self.privacy.observe(sums)
        for name, value in self.privacy.dashboard(sums, last=self.global_step >= self.trainer.max_steps).items():
            self.log(name, value, prog_bar=name in ("privacy/epsilon", "private/loss"))
        return loss

    def on_train_start(self) -> None:
        # Lightning has moved the model to its device and made the optimizer: both must still
        # see the same parameter objects, or the weights would silently never change.
        self.privacy.check_attached(self.optimizers().optimizer)
        # a resumed run whose budget is already spent takes no step
        if self.privacy.budget_exhausted:
            self.trainer.should_stop = True

    def on_train_end(self) -> None:
        # sharded ranks hold different rows by design
        if self.trainer.world_size > 1 and not isinstance(self.model, FSDPModule):
            check_replicas_identical(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["privacy"] = self.privacy.state_dict()
        if self.config is not None:
            checkpoint["config"] = self.config
