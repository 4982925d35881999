"""--loss adv: gradient-reversal discriminator on the encoder bottleneck, attribute-balanced."""

from __future__ import annotations

import pytest
import torch

from training.adversarial import (
    AdversarialLoss,
    bottleneck_channels,
    bottleneck_module,
    grad_reverse,
)
from training.losses import build_loss
from training.networks import create_model

K = 3


def test_grad_reverse_is_identity_forward_and_negated_backward():
    x = torch.randn(4, 5, requires_grad=True)
    y = grad_reverse(x, 0.5)
    assert torch.equal(y, x)
    (g,) = torch.autograd.grad((y * 3).sum(), x)
    assert torch.allclose(g, torch.full_like(x, -1.5))


@pytest.mark.parametrize("arch,kwargs,side", [
    ("transunet", {"img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}, 32),
    ("resunet", {"channels": (4, 8, 8, 16, 16)}, 64),
])
def test_reversed_gradient_reaches_the_encoder(arch, kwargs, side):
    torch.manual_seed(0)
    model = create_model(arch, preset="tiny", in_channels=1, out_channels=K, moe="none",
                         **kwargs).train()
    loss = AdversarialLoss(K, 3, in_features=bottleneck_channels(model), weight=1.0,
                           lam=0.7).attach(model)
    x, groups = torch.randn(4, 1, side, side), torch.tensor([0, 1, 2, 1])
    enc = next(model.encoder.parameters())  # the first encoder layer, far below the bottleneck
    disc = loss.discriminator.net[0].weight

    model(x, None)  # through the reversal layer
    feats = loss.pooled(loss._features)
    g_enc_rev, g_disc_rev = torch.autograd.grad(loss.attribute_loss(feats, groups), [enc, disc])
    model(x, None)  # the same CE without reversal
    feats = loss.pooled(loss._features)
    target = torch.nn.functional.cross_entropy(
        loss.discriminator(feats), groups, weight=torch.full((3,), 1.0) * torch.tensor(
            [4 / 3, 2 / 3, 4 / 3]))
    g_enc, g_disc = torch.autograd.grad(target, [enc, disc])
    assert g_enc.abs().sum() > 0
    assert torch.allclose(g_enc_rev, -0.7 * g_enc, rtol=1e-4, atol=1e-8)  # encoder: reversed
    assert torch.allclose(g_disc_rev, g_disc, rtol=1e-4, atol=1e-8)  # discriminator: not


def test_adv_loss_adds_weighted_attribute_term_and_balances_groups():
    torch.manual_seed(1)
    model = create_model("transunet", preset="tiny", in_channels=1, out_channels=K, moe="none",
                         img_size=32, embed_dim=32, depth=2, num_heads=2).train()
    loss = build_loss("adv", num_classes=K, num_groups=3, in_features=32, weight=0.3,
                      group_counts=[10, 30, 60]).attach(model)
    assert loss.balance.tolist() == pytest.approx([100 / 30, 100 / 90, 100 / 180])
    x, target = torch.randn(4, 1, 32, 32), torch.randint(0, K, (4, 32, 32))
    groups = torch.tensor([0, 1, 2, -1])
    logits = model(x, groups)
    total = loss(logits, target, groups)
    seg = loss.seg(logits, target, groups)
    assert total.item() == pytest.approx(seg.item() + 0.3 * loss.last_attribute_loss, rel=1e-5)
    total.backward()
    assert loss.discriminator.net[0].weight.grad.abs().sum() > 0
    loss.eval()
    assert loss(model(x, groups), target, groups).item() == pytest.approx(
        loss.seg(model(x, groups), target, groups).item())  # evaluation: segmentation only
    with pytest.raises(ValueError, match="group_counts"):
        AdversarialLoss(K, 3, in_features=32, group_counts=[1, 2])


def test_adv_needs_a_bottleneck():
    sep = create_model("separate", preset="tiny", in_channels=1, out_channels=K, moe="none",
                       num_attributes=2, backbone_kwargs={"img_size": 32})
    with pytest.raises(ValueError, match="bottleneck"):
        bottleneck_module(sep)


def test_discriminator_gets_a_gradient_even_without_known_samples():
    """Every sample passes the discriminator (unknown ones with weight 0): a batch of only
    unknown attributes gives a zero term but still a (zero) gradient for every
    discriminator parameter, so under DDP its gradient all-reduce runs on every rank."""
    loss = AdversarialLoss(K, 3, in_features=8, weight=1.0)
    feats = torch.randn(4, 8, requires_grad=True)
    value = loss.attribute_loss(feats, torch.tensor([-1, -1, -1, -1]))
    assert value.item() == 0.0
    value.backward()
    for p in loss.discriminator.parameters():
        assert p.grad is not None and p.grad.abs().sum() == 0
    assert feats.grad.abs().sum() == 0
    # with known samples: the balanced CE equals F.cross_entropy's weighted mean over them
    groups = torch.tensor([0, -1, 2, 2])
    logits = loss.discriminator(feats)
    cw = torch.tensor([1.0, 1.0, 0.5])  # n / (G·n_g): n = 3 known, n_g = 1, 0 (as 1), 2
    expected = torch.nn.functional.cross_entropy(logits[[0, 2, 3]], groups[[0, 2, 3]],
                                                 weight=cw)
    assert loss.attribute_loss(feats, groups).item() == pytest.approx(expected.item(), rel=1e-6)
