"""What the tests share: the real configs composed one way, the tiny models, batches and
losses of the DP-step tests, and a tiny diffusers pipeline saved like the hub's."""

import copy
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from torch.distributed.tensor import DTensor

from dpdit.cli import CONFIG_DIR
from dpdit.diffusion import TrainingDraws
from dpdit.models import DiT, PretrainedDiT
from dpdit.module import DiffusionModule
from dpdit.privacy import DPSGD, PrivacyConfig
from dpdit.profile import RepeatedBatch

CONFIGS = str(CONFIG_DIR)

# A run small enough for two CPU cores: tiny model, a few steps, few samples.
FAST = [
    # from scratch: public stages are trained only where a test asks for a prior
    "prior=none",
    "model.hidden_size=32",
    "model.depth=2",
    "model.num_heads=2",
    "data.batch_size=64",
    "data.physical_batch_size=32",
    "trainer.max_steps=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "sample.num_per_class=2",
    "sample.steps=3",
]


def compose_config(config_name: str, *overrides: str, hydra: bool = False):
    """The command's real config (`train`, `audit`, `sample`, ...) with `overrides`."""
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=hydra)


BATCH = 6


class OwnDraws:
    """A diffusion-like loss that draws (or fixes) its own timesteps and noise: the step's
    draws it is handed are placeholders."""

    def draw(self, n, shape, dtype, generator):
        return TrainingDraws(
            torch.zeros(n, dtype=torch.long), torch.zeros(n, *shape, dtype=dtype), torch.zeros(n, dtype=torch.bool)
        )


class FixedLoss(OwnDraws):
    """Per-sample squared error of the model's output at a fixed timestep."""

    def training_losses(self, model, x, y, draws=None):
        t = torch.full((x.shape[0],), 10, dtype=torch.long)
        return ((model(x, t, y) - x.flip(-1)) ** 2).flatten(1).mean(1)


class ZeroLoss(OwnDraws):
    """Zero loss: every per-sample gradient is zero, so the update is pure noise."""

    def training_losses(self, model, x, y, draws=None):
        t = torch.zeros(x.shape[0], dtype=torch.long)
        return model(x, t, y).flatten(1).mean(1) * 0.0


class Scale(torch.nn.Module):
    """A layer for which Opacus has neither a grad nor a norm sampler (functorch computes it):
    a parameter used directly."""

    def __init__(self, features=4):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, features))

    def forward(self, x):
        return x * self.weight


def tiny_model(seed=0, **options):
    """A tiny float64 DiT off its zero start; `options`: more DiT settings (long_skips, output_conv)."""
    torch.manual_seed(seed)
    model = DiT(
        input_size=8,
        patch_size=2,
        in_channels=1,
        hidden_size=32,
        depth=2,
        num_heads=2,
        num_classes=3,
        learn_sigma=False,
        **options,
    )
    # Leave adaLN-Zero's zero start so that every parameter has a non-zero gradient.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.double()


def batch(size=BATCH, seed=1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 1, 8, 8, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (size,), generator=generator)  # 3 is the null class
    return images, labels


def run_step(
    privacy,
    physical_batch_size,
    loss=FixedLoss(),
    data=None,
    model=None,
    steps=1,
    precision="64-true",
    **trainer_options,
):
    """`steps` training steps through Lightning; returns (module, minus the update)."""
    model = model or tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    module = DiffusionModule(
        model=model,
        diffusion=loss,
        optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
        privacy=privacy,
        physical_batch_size=physical_batch_size,
        ema_decay=0.9,
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        **trainer_options,
    )
    trainer.fit(module, train_dataloaders=RepeatedBatch(data or batch(), steps))
    return module, [b - whole(p.detach()) for b, p in zip(before, model.parameters())]


def whole(tensor):
    """A tensor, or a sharded one gathered from every rank."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def dp(clipping, max_grad_norm=1.0, noise_multiplier=0.0, dataset_size=BATCH, **settings):
    config = PrivacyConfig(
        clipping=clipping, max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier, **settings
    )
    return DPSGD(config, sample_rate=1.0, dataset_size=dataset_size, noise_multiplier=noise_multiplier)


def per_sample_gradients(images, labels, **options):
    """Each image's gradient, computed alone (micro-batches of one), for `tiny_model(**options)`."""
    model = tiny_model(**options)
    grads = []
    for i in range(images.shape[0]):
        model.zero_grad()
        FixedLoss().training_losses(model, images[i : i + 1], labels[i : i + 1]).sum().backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
    return grads


def clipped_reference(model, images, labels, bound, loss=FixedLoss()):
    """Each image's gradient alone (a copy of `model`, micro-batches of one), its norm, and the
    mean of the gradients clipped to `bound` over the batch: what a DP step without noise
    at sample rate 1 must move the weights by."""
    model = copy.deepcopy(model)
    per_image = []
    for i in range(images.shape[0]):
        model.zero_grad()
        loss.training_losses(model, images[i : i + 1], labels[i : i + 1]).sum().backward()
        per_image.append(
            [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        )
    norms = torch.stack([norm(g) for g in per_image])
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    update = [sum(f * g[k] for f, g in zip(factors, per_image)) / images.shape[0] for k in range(len(per_image[0]))]
    return norms, update


def norm(gradient):
    return torch.sqrt(sum((g**2).sum() for g in gradient))


def pretrained(path, **kwargs):
    kwargs = {"num_classes": 3, "labels": "imagenet", "class_ids": [3, 7, 1], **kwargs}
    return PretrainedDiT.from_pretrained(str(path), **kwargs)


def latent_batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(BATCH, 4, 8, 8, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 1, 0])  # 3 is the null class
    return latents, labels


class EpsilonLoss(OwnDraws):
    """Deterministic per-sample loss on the epsilon half of the output."""

    def training_losses(self, model, x, y, draws=None):
        t = torch.full((x.shape[0],), 300, dtype=torch.long)
        return ((model(x, t, y)[:, :4] - x.flip(-1)) ** 2).flatten(1).mean(1)


def save_tiny_pipeline(directory: Path, num_embeds_ada_norm: int = 1000, seed: int = 0) -> Path:
    """A randomly initialised DiTPipeline (2-block DiT with learned sigma on 8x8x4 latents,
    a VAE for 16x16 RGB images, DDIM), saved like the hub's facebook/DiT-XL-2-256."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=num_embeds_ada_norm,
    )
    # Random adaLN outputs instead of zeros, so that every weight matters in the tests.
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(directory)
    return directory
