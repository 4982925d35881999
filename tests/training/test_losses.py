"""Tests for training.losses: DiceCE, FEBS and GroupDRO."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss as MonaiDiceCE
from monai.losses import DiceLoss

from training.losses import LOSS_NAMES, FEBSLoss, GroupDROLoss, build_loss

K = 3


def _batch(spatial, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(groups)
    logits = torch.randn(b, K, *spatial, generator=g, requires_grad=True)
    target = torch.randint(0, K, (b, *spatial), generator=g)
    return logits, target, torch.tensor(groups)


def _good_bad_batch(n_good=2, n_bad=2, spatial=(6, 6)):
    """Group 0 predicts its labels confidently, group 1 predicts mostly wrong labels."""
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, K, (n_good + n_bad, *spatial), generator=g)
    onehot = F.one_hot(target, K).movedim(-1, 1).float()
    wrong = F.one_hot((target + 1) % K, K).movedim(-1, 1).float()
    logits = torch.cat([4 * onehot[:n_good], 2 * wrong[n_good:] + onehot[n_good:]])
    groups = torch.tensor([0] * n_good + [1] * n_bad)
    return logits.requires_grad_(True), target, groups


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("spatial", [(8, 8), (4, 5, 6)])
def test_losses_scalar_finite_with_gradients(name, spatial):
    loss_fn = build_loss(name, num_classes=K, num_groups=3)
    logits, target, groups = _batch(spatial, [0, 1, -1, 2])
    value = loss_fn(logits, target, groups)
    assert value.shape == ()
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_dicece_matches_half_ce_half_dice():
    logits, target, groups = _batch((8, 8), [0, 1])
    value = build_loss("dicece", num_classes=K, num_groups=2)(logits, target, groups)
    dice = DiceLoss(to_onehot_y=True, softmax=True)(logits, target[:, None])
    expected = 0.5 * F.cross_entropy(logits, target) + 0.5 * dice
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    # a (B, 1, *S) target is accepted too
    same = build_loss("dicece", num_classes=K, num_groups=2)(logits, target[:, None], groups)
    assert same.item() == pytest.approx(value.item())


def test_build_loss_errors():
    with pytest.raises(ValueError, match="dicece, febs, groupdro"):
        build_loss("focal", num_classes=K, num_groups=2)
    with pytest.raises(ValueError, match="num_groups"):
        build_loss("febs", num_classes=K, num_groups=0)
    with pytest.raises(ValueError, match="gamma"):
        build_loss("febs", num_classes=K, num_groups=2, gamma=-1)
    loss_fn = build_loss("groupdro", num_classes=K, num_groups=2)
    logits, target, _ = _batch((4, 4), [0, 1])
    with pytest.raises(ValueError, match=r"\[-1, 2\)"):
        loss_fn(logits, target, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="target shape"):
        loss_fn(logits, target[:, :3], torch.tensor([0, 1]))


def test_febs_weights_follow_fairseg_direction():
    """w_a = tanh(min_b L_b / L_a): the worse group gets the smaller weight, which scales
    its predictions down and so inflates its Dice loss (FairSeg reference code)."""
    logits, target, groups = _good_bad_batch()
    loss_fn = FEBSLoss(num_classes=K, num_groups=2)
    probs = logits.softmax(1)
    onehot = F.one_hot(target, K).movedim(-1, 1).float()
    w = loss_fn.group_weights(probs, onehot, groups)
    assert not w.requires_grad
    pooled = DiceLoss(softmax=False, batch=True)  # soft Dice pooled over a group's samples
    l_good = pooled(probs[:2], onehot[:2]).item()
    l_bad = pooled(probs[2:], onehot[2:]).item()
    assert l_bad > l_good
    assert w[:2].tolist() == pytest.approx([math.tanh(1.0)] * 2, rel=1e-5)
    ratio = (l_good + 1e-5) / (l_bad + 1e-5)  # the ratio carries the Dice smoothing 1e-5
    assert w[2:].tolist() == pytest.approx([math.tanh(ratio)] * 2, rel=1e-4)
    assert w[2] < w[0]
    # the scaled Dice term is larger than the plain one, most of all relative to a
    # group whose weight is larger
    plain = build_loss("dicece", num_classes=K, num_groups=2)(logits, target, groups)
    assert loss_fn(logits, target, groups) > plain
    # gamma sharpens the contrast
    w2 = FEBSLoss(num_classes=K, num_groups=2, gamma=2.0).group_weights(probs, onehot, groups)
    assert w2[2] < w[2]


def test_febs_missing_and_unknown_groups():
    loss_fn = build_loss("febs", num_classes=K, num_groups=4)
    logits, target, _ = _batch((6, 6), [0, 0, 0])
    only_one = loss_fn(logits, target, torch.tensor([2, 2, -1]))
    assert torch.isfinite(only_one)
    # all unknown: every weight is 1, so FEBS reduces exactly to DiceCE
    unknown = torch.tensor([-1, -1, -1])
    probs = logits.softmax(1)
    onehot = F.one_hot(target, K).movedim(-1, 1).float()
    assert loss_fn.group_weights(probs, onehot, unknown).tolist() == [1.0, 1.0, 1.0]
    dicece = build_loss("dicece", num_classes=K, num_groups=4)(logits, target, unknown)
    assert loss_fn(logits, target, unknown).item() == pytest.approx(dicece.item(), rel=1e-5)


def _per_sample_dicece(logits, target):
    fn = MonaiDiceCE(to_onehot_y=True, softmax=True, lambda_ce=0.5, lambda_dice=0.5)
    return torch.stack([fn(logits[i : i + 1], target[i : i + 1, None]) for i in range(len(target))])


def test_groupdro_one_step_by_hand():
    logits, target, groups = _batch((6, 6), [0, 0, 1, -1])
    loss_fn = GroupDROLoss(num_classes=K, num_groups=3, eta=0.5).train()
    assert loss_fn.q.tolist() == pytest.approx([1 / 3] * 3)
    value = loss_fn(logits, target, groups)
    per = _per_sample_dicece(logits, target).detach()
    ell = torch.stack([per[:2].mean(), per[2], torch.tensor(0.0)])  # group 2 absent
    q = torch.full((3,), 1 / 3) * torch.exp(0.5 * ell)
    q = q / q.sum()
    assert loss_fn.q.tolist() == pytest.approx(q.tolist(), rel=1e-5)
    assert loss_fn.q[2] < 1 / 3  # the absent group loses mass
    expected = (3 * (q * ell).sum() + per[3]) / 4  # 3 known samples, 1 unknown
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert "q" in loss_fn.state_dict()


def test_groupdro_q_rises_for_worst_group():
    logits, target, groups = _good_bad_batch()
    loss_fn = build_loss("groupdro", num_classes=K, num_groups=2, eta=0.1).train()
    for _ in range(20):
        loss_fn(logits, target, groups)
        assert loss_fn.q.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert loss_fn.q[1] > 0.6 > loss_fn.q[0]
    frozen = loss_fn.q.clone()
    loss_fn.eval()
    loss_fn(logits, target, groups)
    assert torch.equal(loss_fn.q, frozen)  # no update outside training mode


def test_groupdro_all_unknown_is_dicece_and_keeps_q():
    logits, target, _ = _batch((4, 4, 4), [0, 0])
    unknown = torch.tensor([-1, -1])
    loss_fn = build_loss("groupdro", num_classes=K, num_groups=2).train()
    value = loss_fn(logits, target, unknown)
    dicece = build_loss("dicece", num_classes=K, num_groups=2)(logits, target, unknown)
    assert value.item() == pytest.approx(dicece.item(), rel=1e-5)
    assert loss_fn.q.tolist() == pytest.approx([0.5, 0.5])
