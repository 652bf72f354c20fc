"""The clipping modes' registry and what every mode must get right: a mode registered in a
test runs the whole DP step exactly; near-zero per-image gradients give finite norms and the
exact update in every mode; Gram sums that round below zero are clamped; every model
satisfies the declared model contract."""

import pytest
import torch
from torch import nn

from dpdit.inspect import clipping_layers, opacus_layers, trace
from dpdit.models import Denoiser, DiT, PretrainedDiT
from dpdit.privacy import CLIPPING, CLIPPING_MODES, PrivacyConfig, check_precision
from dpdit.privacy.clipping import Clipper, ClippingMode, register_clipping_mode
from dpdit.privacy.clipping.base import trained_bytes
from dpdit.privacy.clipping.bookkeeping import EmbeddingPart, LinearGhostPart
from helpers import batch, clipped_reference, dp, norm, run_step, save_tiny_pipeline, tiny_model


class OneImageAtATime(Clipper):
    """Each image's gradient by its own autograd call, clipped and summed into `.grad`."""

    def __init__(self, model: nn.Module, max_grad_norm: float):
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.max_grad_norm = max_grad_norm

    def per_image_norms(self, loss_per_image, optimizer):
        sums = [torch.zeros_like(p) for p in self.parameters]
        norms = []
        for i, loss in enumerate(loss_per_image):
            keep = i < loss_per_image.shape[0] - 1
            grads = torch.autograd.grad(loss, self.parameters, retain_graph=keep, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.parameters, grads)]
            norms.append(norm(grads))
            factor = (self.max_grad_norm / (norms[-1] + 1e-6)).clamp(max=1.0)
            for total, g in zip(sums, grads):
                total.add_(factor * g)
        for p, total in zip(self.parameters, sums):
            p.grad = total
        return torch.stack(norms)


class Autograd(ClippingMode):
    """A toy mode: one backward pass per image (a mode's whole interface, nothing more)."""

    name = "one_image_at_a_time"
    optimizer = "ghost"  # the clipped sum is left in `.grad`

    def attach(self, model, max_grad_norm, draws, backward):
        return OneImageAtATime(model, max_grad_norm)

    def path(self, layer, tokens=1):
        return "autograd, image by image"

    def memory(self, model, layers, batch_size, draws):
        return {"bytes": 2 * trained_bytes(model)}


@pytest.fixture
def toy_mode():
    register_clipping_mode(Autograd)
    yield Autograd.name
    del CLIPPING[Autograd.name]


def test_a_registered_mode_is_a_clipping_mode_everywhere(toy_mode):
    assert toy_mode in CLIPPING_MODES
    PrivacyConfig(clipping=toy_mode).validate(dataset_size=100)
    check_precision("bf16-mixed", toy_mode)  # it declares no refusal
    model = nn.Sequential(nn.Linear(4, 4))
    layers = opacus_layers(model)
    (row,) = clipping_layers(layers, trace(model, layers, (torch.randn(1, 4),))[0])
    assert row.paths[toy_mode] == "autograd, image by image"

    images, labels = batch()
    model = tiny_model()
    norms, _ = clipped_reference(model, images, labels, bound=1.0)
    bound = float(norms.median())  # half of the images are clipped
    _, expected = clipped_reference(model, images, labels, bound)
    _, update = run_step(dp(toy_mode, max_grad_norm=bound), physical_batch_size=4, data=(images, labels), model=model)
    for got, want in zip(update, expected):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)


def test_an_unregistered_mode_is_refused_with_the_choices():
    with pytest.raises(
        ValueError, match="privacy.clipping='per_layer' is unknown: choose one of hooks, ghost, functorch, bookkeeping"
    ):
        PrivacyConfig(clipping="per_layer").validate(dataset_size=100)


class Gated(nn.Module):
    """Four tokens of 16 features per image, an Embedding of the label added, then two
    Linears on the tokens; the second sees them times a gate by label: 1, 0 or 1e-20, so
    images of labels 1 and 2 have a zero or tiny (1e-20) gradient in that layer."""

    null_class = 3

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(4, 16)
        self.first = nn.Linear(16, 16)
        self.second = nn.Linear(16, 16, bias=False)  # 2 x 4^2 Gram values < 256 weights: the ghost norm
        self.register_buffer("gates", torch.tensor([1.0, 0.0, 1e-20, 1.0]))

    def forward(self, x, t, y):
        tokens = x.reshape(x.shape[0], 4, 16) + self.embed(y).unsqueeze(1)
        gated = tokens * self.gates[y].reshape(-1, 1, 1)
        return (self.first(tokens) + self.second(gated)).reshape(x.shape)


@pytest.mark.parametrize("clipping", CLIPPING_MODES)
def test_zero_and_tiny_gradients_give_finite_norms_and_the_exact_update(clipping):
    torch.manual_seed(0)
    model = Gated().double()
    images, _ = batch()
    labels = torch.tensor([0, 1, 2, 1, 2, 0])
    norms, _ = clipped_reference(model, images, labels, bound=1.0)
    bound = float(norms.median())
    _, expected = clipped_reference(model, images, labels, bound)
    # the gated layer's gradient of the images of labels 1 and 2: exactly zero, and tiny
    assert clipped_reference(model, images[1:3], labels[1:3], bound=1e9)[1][-1].abs().max() < 1e-15
    _, update = run_step(dp(clipping, max_grad_norm=bound), physical_batch_size=3, data=(images, labels), model=model)
    for got, want in zip(update, expected):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-12)


def test_gram_sums_that_round_below_zero_give_zero_not_nan():
    """Two tokens with inputs equal to 1e-12 and opposite output gradients: the gradient is
    almost zero, and the Gram matrices' sum of signed products rounds below zero in about
    four of ten draws."""
    torch.manual_seed(0)
    zeros = torch.zeros(2, 16, dtype=torch.float64)
    cases = []
    for _ in range(20):
        v, w = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
        cases.append((torch.cat([torch.stack([v, v * (1 + 1e-12)]), zeros]), torch.cat([torch.stack([w, -w]), zeros])))
    a, g = (torch.stack(parts) for parts in zip(*cases))
    raw = (a @ a.transpose(1, 2) * (g @ g.transpose(1, 2))).sum((1, 2))
    assert (raw < 0).any()  # what the clamp is for
    linear = LinearGhostPart(nn.Linear(16, 16, bias=False).double(), a, g)
    assert (linear.squared_norms >= 0).all() and torch.isfinite(linear.squared_norms.sqrt()).all()

    ids = torch.tensor([[1, 1, 2, 3]]).expand(20, -1)
    embedding = EmbeddingPart(nn.Embedding(4, 16).double(), ids, g)
    assert (embedding.squared_norms >= 0).all()


def test_every_model_satisfies_the_model_contract(tmp_path):
    pipeline = save_tiny_pipeline(tmp_path / "pipeline")
    for model in (tiny_model(), PretrainedDiT.from_pretrained(str(pipeline), num_classes=3)):
        assert isinstance(model, Denoiser)
        assert model.null_class == model.num_classes and model.vae is None
        assert model.out_channels == model.in_channels * (2 if isinstance(model, PretrainedDiT) else 1)
        x = torch.randn(2, model.in_channels, model.input_size, model.input_size, dtype=next(model.parameters()).dtype)
        y = torch.tensor([0, model.null_class])
        assert model(x, torch.tensor([1, 500]), y).shape == (2, model.out_channels, model.input_size, model.input_size)
    assert not isinstance(nn.Linear(2, 2), Denoiser)
    assert isinstance(
        DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=8, depth=1, num_heads=1, num_classes=2), Denoiser
    )
