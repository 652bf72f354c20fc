"""Empirical privacy audit with one training run (Steinke, Nasr and Jagielski, 2023).

`m` canaries (random images shaped like the training data, each with a class of its own)
each join the training set independently with probability 1/2. After training, each canary
is scored by the trained model (`loss_scores`, `embedding_scores`); the auditor guesses
"included" for the highest scores and "excluded" for the lowest and abstains on the rest.
An (epsilon, delta)-DP training makes r guesses at most as accurate as randomized response
with accuracy e^eps / (1 + e^eps), up to a delta term; the largest epsilon that this
number of correct guesses rejects at the chosen confidence is a lower bound on the
epsilon the run really spends. A lower bound above the claimed epsilon proves the claim
wrong; one below it is consistent with it (a black-box audit is rarely tight).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from scipy import stats
from torch import nn
from torch.utils.data import ConcatDataset, TensorDataset

from dpdit.bisection import bracket, narrow
from dpdit.build import setup, shards
from dpdit.cli import ConfigError, Interrupted, command
from dpdit.data import ImageDataModule
from dpdit.diffusion import GaussianDiffusion, mean_per_sample
from dpdit.logs import finish_wandb_runs


def make_canaries(count: int, shape: tuple[int, ...], first_label: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` images of `shape` with every value +-1 at random, each with a class of its own
    (`first_label`, `first_label + 1`, ...): what the model learns of one canary, through its
    class embedding above all, tells nothing about another."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 2, (count, *shape), generator=generator).float() * 2.0 - 1.0
    return images, first_label + torch.arange(count)


class CanaryDataModule(ImageDataModule):
    """The configured data plus the canaries drawn for inclusion (each with probability 1/2).

    The canaries live in the model's space (pixels, or latents for a model with a VAE), so
    they are added after any encoding. The dataset size N, and with it the sample rate,
    counts the included canaries, as for any other training image.
    """

    def __init__(self, canaries: int = 1000, canary_seed: int = 1, **data_settings: Any):
        super().__init__(**data_settings)
        self.canary_count = canaries
        self.canary_seed = canary_seed
        self.canaries: tuple[torch.Tensor, torch.Tensor] | None = None
        self.included: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.canaries is not None:
            return
        super().setup(stage)
        shape = tuple(self.train_dataset[0][0].shape)
        self.canaries = make_canaries(self.canary_count, shape, self.num_classes, self.canary_seed)
        generator = torch.Generator().manual_seed(self.canary_seed + 1)
        self.included = torch.rand(self.canary_count, generator=generator) < 0.5
        images, labels = self.canaries
        self.train_dataset = ConcatDataset(
            [self.train_dataset, TensorDataset(images[self.included], labels[self.included])]
        )


@torch.no_grad()
def canary_losses(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    images: torch.Tensor,
    labels: torch.Tensor,
    draws: int,
    seed: int,
    batch_size: int = 256,
) -> torch.Tensor:
    """Each canary's epsilon-prediction loss given `labels`, averaged over `draws` fixed
    (timestep, noise) pairs: the same pairs whatever the model or labels."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    losses = torch.zeros(images.shape[0])
    for _ in range(draws):
        t = torch.randint(0, diffusion.num_train_timesteps, (images.shape[0],), generator=generator)
        noise = torch.randn(images.shape, generator=generator)
        for index in torch.arange(images.shape[0]).split(batch_size):
            x0, eps, t_index = images[index].to(device), noise[index].to(device), t[index].to(device)
            output = model(diffusion.scheduler.add_noise(x0, eps, t_index), t_index, labels[index].to(device))
            losses[index] += mean_per_sample((output[:, : x0.shape[1]] - eps) ** 2).cpu()
    model.train(training)
    return losses / draws


def loss_scores(model: nn.Module, diffusion: GaussianDiffusion, images, labels, draws: int, seed: int) -> np.ndarray:
    """Black-box score: how much the canary's own class lowers its loss against the null
    (unconditional) class, at the same draws. Only a trained-on canary's class means anything."""
    null = torch.full_like(labels, model.null_class)
    unconditional = canary_losses(model, diffusion, images, null, draws, seed)
    return (unconditional - canary_losses(model, diffusion, images, labels, draws, seed)).numpy()


@torch.no_grad()
def embedding_scores(model: nn.Module, initial: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """White-box score: how far training moved the canary's class-embedding rows from
    their initial values. Only a trained-on canary's rows receive gradients; noise moves all."""
    return (model.class_embeddings(labels.to(initial.device)) - initial).norm(dim=1).cpu().numpy()


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of at least `v` correct guesses out of `r`, on `m` canaries, under the
    hypothesis that training is (epsilon, delta)-DP (Steinke et al., 2023, Theorem 3.1
    and its delta extension): a binomial tail at randomized response's accuracy, plus
    2 m delta times the largest mean probability of falling short of `v` by i."""
    accuracy = 1.0 / (1.0 + math.exp(-epsilon))
    tail = stats.binom.sf(v - 1, r, accuracy)
    if delta == 0.0 or v == 0:
        return float(min(tail, 1.0))
    shortfall = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, accuracy))
    alpha = float(np.max(shortfall / np.arange(1, v + 1)))
    return float(min(tail + 2.0 * m * delta * alpha, 1.0))


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, significance: float) -> float:
    """The largest epsilon (to 1e-6) that `v` correct of `r` guesses reject at `significance`;
    0 when even epsilon = 0 is not rejected."""
    if r == 0 or p_value(m, r, v, 0.0, delta) >= significance:
        return 0.0

    def rejected(epsilon: float) -> bool:
        return p_value(m, r, v, epsilon, delta) < significance

    low, _ = narrow(rejected, *bracket(rejected), done=lambda low, high: high - low <= 1e-6)
    return low


@dataclass
class Guesses:
    score: str
    guesses: int
    correct: int
    epsilon_lower_bound: float


def audit_scores(
    scores: dict[str, np.ndarray], included: np.ndarray, delta: float, confidence: float, guess_counts: list[int]
) -> dict[str, Any]:
    """The best lower bound over the scores and `guess_counts` (r guesses: the r/2 highest
    scores guessed included, the r/2 lowest excluded). Each (score, count) pair is tested at
    (1 - confidence) / pairs (Bonferroni), so the best one still holds at `confidence`."""
    m = len(included)
    significance = (1.0 - confidence) / (len(scores) * len(guess_counts))
    results = []
    for name, score in scores.items():
        order = np.argsort(-score, kind="stable")
        for r in guess_counts:
            top, bottom = order[: (r + 1) // 2], order[m - r // 2 :]
            correct = int(included[top].sum() + (~included[bottom]).sum())
            results.append(Guesses(name, r, correct, epsilon_lower_bound(m, r, correct, delta, significance)))
    best = max(results, key=lambda g: g.epsilon_lower_bound)
    return {
        "epsilon_lower_bound": best.epsilon_lower_bound,
        "best": vars(best),
        "auc": {name: _auc(score, included) for name, score in scores.items()},
        "tests": [vars(g) for g in results],
    }


def _auc(scores: np.ndarray, included: np.ndarray) -> float:
    """Probability that an included canary outscores an excluded one (ties count half)."""
    ranks = stats.rankdata(scores)
    positives = int(included.sum())
    negatives = len(scores) - positives
    if not positives or not negatives:
        return math.nan
    return float((ranks[included].sum() - positives * (positives + 1) / 2) / (positives * negatives))


SCORES = ("loss", "embedding")
WEIGHTS = ("model", "ema")


def check_audit_settings(cfg: DictConfig) -> None:
    """Refuse, before training, settings under which the audit cannot run."""
    audit = cfg.audit
    if cfg.ckpt_path is not None or cfg.init_ckpt_path is not None:
        raise ConfigError(
            "an audit scores one training run from its initial weights: leave ckpt_path and init_ckpt_path null"
        )
    if shards(cfg.trainer):
        raise ConfigError(
            "the audit scores the canaries on whole weights: use trainer=ddp or one device, not trainer=fsdp"
        )
    if not audit.scores or set(audit.scores) - set(SCORES):
        raise ConfigError(f"audit.scores={list(audit.scores)}: choose among {', '.join(SCORES)}")
    if audit.weights not in WEIGHTS:
        raise ConfigError(f"audit.weights={audit.weights}: choose one of {', '.join(WEIGHTS)}")
    if not 0.0 < audit.confidence < 1.0:
        raise ConfigError(f"audit.confidence={audit.confidence} must lie in (0, 1), e.g. 0.95")
    if not audit.guesses or any(not 0 < r <= audit.canaries for r in audit.guesses):
        raise ConfigError(f"audit.guesses={list(audit.guesses)}: each must lie in [1, audit.canaries={audit.canaries}]")


def run_audit(cfg: DictConfig) -> dict[str, Any]:
    """Train as configured with the canaries, score them, and write `audit_report.json`."""
    check_audit_settings(cfg)
    # every canary has a class of its own, after the data's
    cfg.model.num_classes = cfg.data.num_classes + cfg.audit.canaries
    trainer, module, datamodule = setup(cfg)
    images, labels = datamodule.canaries
    if module.model.num_classes != cfg.model.num_classes:
        raise ConfigError(
            "the audit gives every canary a class of its own: with model=pretrained, set model.labels=fresh"
        )
    initial = module.model.class_embeddings(labels).detach().clone()
    trained = False
    try:
        trainer.fit(module, datamodule=datamodule)
        trained = True
        model = module.model if cfg.audit.weights == "model" else module.ema.module
        scores = {
            "loss": lambda: loss_scores(model, module.diffusion, images, labels, cfg.audit.draws, cfg.audit.seed),
            "embedding": lambda: embedding_scores(model, initial, labels),
        }
        measured = {name: scores[name]() for name in cfg.audit.scores}
    except Interrupted as stop:
        # a bound holds only for a whole run and its scores: there is no partial audit
        where = "while scoring the canaries" if trained else f"during training, after step {trainer.global_step}"
        raise Interrupted(
            f"audit stopped by SIGTERM {where}; no audit_report.json was written: run the audit again"
        ) from stop
    included = datamodule.included.numpy()
    result = audit_scores(measured, included, cfg.privacy.delta, cfg.audit.confidence, list(cfg.audit.guesses))
    privacy = module.privacy.report()
    epsilon = privacy["epsilon"]
    report = {
        "epsilon_lower_bound": result["epsilon_lower_bound"],
        "claimed_epsilon": epsilon if epsilon is not None and math.isfinite(epsilon) else None,
        "delta": cfg.privacy.delta,
        "confidence": cfg.audit.confidence,
        **result,
        "canaries": len(included),
        "canaries_included": int(included.sum()),
        "dataset_size": datamodule.dataset_size,
        "weights": cfg.audit.weights,
        "draws": cfg.audit.draws,
        "privacy": {
            key: privacy.get(key)
            for key in (
                "enabled",
                "noise_multiplier",
                "max_grad_norm",
                "sample_rate",
                "steps",
                "accountant",
                "clipping",
            )
        },
    }
    if trainer.is_global_zero:
        (Path(cfg.paths.output_dir) / "audit_report.json").write_text(json.dumps(report, indent=2))
    finish_wandb_runs(trainer.loggers)
    return report


@command("audit")
def main(cfg: DictConfig) -> None:
    report = run_audit(cfg)
    print(
        f"audit: epsilon >= {report['epsilon_lower_bound']:.3f} at {cfg.audit.confidence:.0%} confidence "
        f"({report['best']['correct']}/{report['best']['guesses']} correct guesses "
        f"by the {report['best']['score']} score); "
        f"claimed epsilon {report['claimed_epsilon']}"
    )


if __name__ == "__main__":
    main()
