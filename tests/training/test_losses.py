"""Tests for training.losses: DiceCE, FEBS (against a transcription of the FairSeg reference)
and GroupDRO."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss as MonaiDiceCE
from monai.losses import DiceLoss

from training.losses import DiceCELoss, FEBSLoss, GroupDROLoss, build_loss

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


@pytest.mark.parametrize("name", ["dicece", "febs", "groupdro"])
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


# -- FEBS: an independent, plain transcription of FairSeg's TransUNet/utils.py febs_loss ----
def _ref_dice(score, target):
    smooth = 1e-5
    intersect = torch.sum(score * target)
    y_sum = torch.sum(target * target)
    z_sum = torch.sum(score * score)
    return 1 - (2 * intersect + smooth) / (z_sum + y_sum + smooth)


def _reference_febs(logits, label, attr, n_classes, n_attr, gamma):
    """0.5·CE + 0.5·febs_loss(logits, label, attr, softmax=True), as the reference trainer."""
    inputs = torch.softmax(logits, dim=1)
    target = torch.cat([(label == i).unsqueeze(1) for i in range(n_classes)], dim=1).float()
    attr = np.asarray(attr)
    tmp_weights = np.zeros(n_attr)
    for x in np.unique(attr):
        tmp_input, tmp_target = inputs[attr == x], target[attr == x]
        tmp_loss = 0.0
        for i in range(n_classes):
            tmp_loss += _ref_dice(tmp_input[:, i], tmp_target[:, i])
        tmp_weights[x] = float(tmp_loss.detach())
    with np.errstate(divide="ignore", invalid="ignore"):
        tmp_weights = (np.min(tmp_weights) / tmp_weights) ** gamma
    w = torch.tanh(torch.tensor(tmp_weights, dtype=torch.float32))
    loss = 0.0
    for i in range(n_classes):
        loss += _ref_dice(inputs[:, i] * w[attr][:, None, None], target[:, i])
    return 0.5 * F.cross_entropy(logits, label) + 0.5 * loss / n_classes


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_febs_matches_reference_loss_and_gradients(seed, gamma):
    gen = torch.Generator().manual_seed(seed)
    B = 6
    if seed % 2:  # a group missing from the batch: the reference weights are all tanh(0)
        groups = torch.randint(0, 2, (B,), generator=gen)
    else:  # every group present
        groups = torch.tensor([0, 1, 2] + torch.randint(0, 3, (B - 3,), generator=gen).tolist())
    logits = (2 * torch.randn(B, K, 10, 12, generator=gen)).requires_grad_(True)
    target = torch.randint(0, K, (B, 10, 12), generator=gen)
    ours = FEBSLoss(num_classes=K, num_groups=3, gamma=gamma)(logits, target, groups)
    (g_ours,) = torch.autograd.grad(ours, logits)
    ref = _reference_febs(logits, target, groups.numpy(), K, 3, gamma)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(g_ours, g_ref, rtol=1e-4, atol=1e-7)


def test_febs_missing_group_zeroes_weights_unless_present_option():
    logits, target, _ = _batch((6, 6), [0, 0, 0, 0], seed=3)
    probs, onehot = logits.softmax(1), F.one_hot(target, K).movedim(-1, 1).float()
    groups = torch.tensor([0, 0, 1, 1])  # group 2 of 3 absent
    ref = FEBSLoss(num_classes=K, num_groups=3).group_weights(probs, onehot, groups)
    assert ref.tolist() == [0.0, 0.0, 0.0, 0.0]
    ours = FEBSLoss(num_classes=K, num_groups=3, missing="present").group_weights(
        probs, onehot, groups)
    assert max(ours.tolist()) == pytest.approx(math.tanh(1.0))
    assert min(ours.tolist()) < math.tanh(1.0)


def test_febs_worst_group_gets_smallest_weight():
    logits, target, groups = _good_bad_batch()
    loss_fn = FEBSLoss(num_classes=K, num_groups=2)
    probs, onehot = logits.softmax(1), F.one_hot(target, K).movedim(-1, 1).float()
    w = loss_fn.group_weights(probs, onehot, groups)
    assert w[0].item() == pytest.approx(math.tanh(1.0))  # best group: ratio 1
    assert w[2].item() < w[0].item()  # the bad group gets the larger error bound
    w2 = FEBSLoss(num_classes=K, num_groups=2, gamma=2.0).group_weights(probs, onehot, groups)
    assert w2[2].item() < w[2].item()  # a larger gamma sharpens it


def test_febs_all_unknown_is_reference_dicece():
    logits, target, _ = _batch((6, 6), [0, 0, 0])
    unknown = torch.tensor([-1, -1, -1])
    febs = FEBSLoss(num_classes=K, num_groups=4)
    probs, onehot = logits.softmax(1), F.one_hot(target, K).movedim(-1, 1).float()
    assert febs.group_weights(probs, onehot, unknown).tolist() == [1.0, 1.0, 1.0]
    dicece = DiceCELoss(K, 4, dice="reference")(logits, target, unknown)
    assert febs(logits, target, unknown).item() == pytest.approx(dicece.item(), rel=1e-6)


def test_reference_dice_form_is_squared_and_batch_pooled():
    logits, target, groups = _batch((5, 7), [0, 1, 0])
    probs = logits.softmax(1)
    onehot = F.one_hot(target, K).movedim(-1, 1).float()
    expected = sum(_ref_dice(probs[:, i], onehot[:, i]) for i in range(K)) / K
    value = DiceCELoss(K, 2, lambda_ce=0.0, lambda_dice=1.0, dice="reference")(
        logits, target, groups)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="dice"):
        DiceCELoss(K, 2, dice="squared")
    with pytest.raises(ValueError, match="missing"):
        FEBSLoss(K, 2, missing="skip")


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


def test_groupdro_pools_its_statistics_in_one_all_reduce(monkeypatch):
    """GroupDRO's group sums, counts and unknown sum/count travel as one stacked tensor:
    one ``global_sum`` (one all-reduce under DDP) per step, not four."""
    import training.losses as losses

    calls = []

    def counting(t):
        calls.append(tuple(t.shape))
        return t

    monkeypatch.setattr(losses, "global_sum", counting)
    loss = build_loss("groupdro", num_classes=3, num_groups=4).train()
    logits = torch.randn(5, 3, 6, 6, requires_grad=True)
    loss(logits, torch.randint(0, 3, (5, 6, 6)), torch.tensor([0, 1, -1, 3, 1]))
    assert calls == [(2 * 4 + 2,)]
