"""Book-keeping clipping's own rules against autograd, image by image: norms and clipped
sums for Embeddings (repeated ids, padding), Linears on 2-D to 4-D inputs (ghost norm and
per-image gradient), a Linear called twice, and the layers that fall back to Opacus' grad
samplers (Conv2d, LayerNorm) or functorch, with one and with several noise draws."""

import pytest
import torch
from torch import nn

from dpdit.privacy.clipping import FUNCTORCH, GHOST_NORM, HOOK, OWN_GRADIENT
from dpdit.privacy.clipping.bookkeeping import BookKeeping, bookkeeping_path
from helpers import Scale, norm


class EveryRule(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 4, padding_idx=0)
        self.conv = nn.Conv2d(1, 2, 2)
        self.norm = nn.LayerNorm(4)
        self.shared = nn.Linear(4, 4)
        self.wide = nn.Linear(4, 64, bias=False)
        self.head = nn.Linear(8, 3)
        self.scale = Scale()

    def forward(self, images, ids):
        tokens = torch.cat([images.flatten(2).transpose(1, 2)[..., :4].repeat(1, 1, 4)[..., :4], self.embed(ids)], 1)
        tokens = self.shared(torch.tanh(self.shared(self.norm(tokens))))  # called twice
        wide = self.wide(tokens.unsqueeze(1).expand(-1, 2, -1, -1))  # a 4-D input
        pooled = torch.cat([self.scale(wide[..., :4]).mean((1, 2)), self.conv(images).mean((2, 3)).repeat(1, 2)], 1)
        return self.head(pooled)  # a 2-D input


def losses(model, images, ids, draws):
    per_row = (model(images, ids) - 0.3).pow(2).sum(1)
    return per_row.unflatten(0, (-1, draws)).mean(1)


@pytest.mark.parametrize("draws", [1, 3])
def test_norms_and_clipped_sum_equal_autograd_image_by_image(draws):
    torch.manual_seed(0)
    model = EveryRule().double()
    images = torch.randn(4 * draws, 1, 3, 3, dtype=torch.float64)
    ids = torch.tensor([[1, 1, 0], [2, 3, 2], [4, 4, 4], [0, 1, 2]]).repeat_interleave(draws, 0)
    per_image = []
    for i in range(4):
        model.zero_grad()
        rows = slice(i * draws, (i + 1) * draws)
        losses(model, images[rows], ids[rows], draws).sum().backward()
        per_image.append([p.grad.clone() for p in model.parameters()])
    expected_norms = torch.stack([norm(g) for g in per_image])
    bound = float(expected_norms.median())
    factors = (bound / (expected_norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).any() and (factors == 1).any()

    model.zero_grad()
    bookkeeping = BookKeeping(model, bound)
    norms = bookkeeping.per_image_norms(losses(model, images, ids, draws))
    torch.testing.assert_close(norms, expected_norms, rtol=1e-10, atol=0)
    for k, (name, parameter) in enumerate(model.named_parameters()):
        want = sum(f * g[k] for f, g in zip(factors, per_image))
        torch.testing.assert_close(parameter.grad, want, rtol=1e-10, atol=1e-13, msg=name)


def test_each_layer_takes_the_path_its_shape_and_tokens_make_cheaper():
    model = EveryRule()
    assert bookkeeping_path(model.wide, tokens=7) == GHOST_NORM  # 2 x 49 <= 256 weights
    assert bookkeeping_path(model.wide, tokens=14) == OWN_GRADIENT  # 2 x 196 > 256
    assert bookkeeping_path(model.embed, tokens=3) == GHOST_NORM
    assert bookkeeping_path(model.conv, tokens=1) == HOOK
    assert bookkeeping_path(model.scale, tokens=1) == FUNCTORCH


def test_the_backward_pass_forms_no_parameter_gradient():
    """One backward pass to the layers' outputs: autograd computes no parameter's gradient,
    and `.grad` holds the sum book-keeping formed (the plain gradient under a huge bound)."""
    torch.manual_seed(0)
    model = EveryRule().double()
    bookkeeping = BookKeeping(model, 1e6)
    images, ids = torch.randn(2, 1, 3, 3, dtype=torch.float64), torch.tensor([[1, 2, 3], [3, 2, 1]])
    computed = []
    handles = [p.register_hook(lambda grad, name=name: computed.append(name)) for name, p in model.named_parameters()]
    bookkeeping.per_image_norms(losses(model, images, ids, 1))
    assert computed == []
    summed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    bookkeeping.remove_hooks()
    losses(model, images, ids, 1).sum().backward()
    assert len(computed) == len(summed)
    for handle in handles:
        handle.remove()
    for got, want in zip(summed, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
