"""Segmentation losses: plain Dice+CE and two fairness-aware baselines (FEBS, GroupDRO).

Every loss has the same call signature so the training loop can swap them by name::

    loss = build_loss("febs", num_classes=3, num_groups=3)
    value = loss(logits, target, groups)   # scalar tensor

- ``logits``: ``(B, K, H, W[, D])`` raw network outputs,
- ``target``: ``(B, H, W[, D])`` integer labels in ``[0, K)``,
- ``groups``: ``(B,)`` attribute indices in ``[0, num_groups)``, ``-1`` = unknown.

Soft Dice here is MONAI's default form (softmax probabilities, background included,
non-squared denominator, ``smooth_nr = smooth_dr = 1e-5``), computed per sample and
averaged over classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSS_NAMES = ("dicece", "febs", "groupdro")
_SMOOTH = 1e-5


def _check_inputs(
    logits: torch.Tensor, target: torch.Tensor, groups: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """Validate shapes; return ``target`` as long ``(B, *S)``."""
    if logits.dim() < 3:
        raise ValueError(f"logits must be (B, K, *spatial), got shape {tuple(logits.shape)}")
    if target.dim() == logits.dim() and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits "
            f"{tuple(logits.shape)}; expected (B, *spatial) = "
            f"{tuple(logits.shape[:1] + logits.shape[2:])}"
        )
    if groups.shape != logits.shape[:1]:
        raise ValueError(f"groups must be (B,) = ({logits.shape[0]},), got {tuple(groups.shape)}")
    if groups.numel() and (groups.min() < -1 or groups.max() >= num_groups):
        raise ValueError(
            f"group indices must lie in [-1, {num_groups}) (-1 = unknown), got "
            f"[{int(groups.min())}, {int(groups.max())}]"
        )
    return target.long()


def _one_hot(target: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """``(B, *S)`` labels → ``(B, K, *S)`` one-hot."""
    return F.one_hot(target, num_classes).movedim(-1, 1).to(dtype)


def _soft_dice_per_sample(probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss per sample, mean over classes.

    Args:
        probs: ``(B, K, *S)`` (possibly scaled) class probabilities.
        onehot: ``(B, K, *S)`` one-hot target.

    Returns:
        ``(B,)`` losses ``1 − (2·Σ p·t + s) / (Σ p + Σ t + s)`` averaged over the K classes.
    """
    dims = tuple(range(2, probs.dim()))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + _SMOOTH) / (denom + _SMOOTH)
    return (1 - dice).mean(dim=1)


def _ce_per_sample(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample, mean over voxels: ``(B,)``."""
    return F.cross_entropy(logits, target, reduction="none").flatten(1).mean(dim=1)


class _GroupLoss(nn.Module):
    """Common constructor validation for the group-aware losses."""

    def __init__(self, num_classes: int, num_groups: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if num_groups < 1:
            raise ValueError(
                f"num_groups must be >= 1 (attribute vocabulary size), got {num_groups}"
            )
        self.num_classes = int(num_classes)
        self.num_groups = int(num_groups)


class DiceCELoss(_GroupLoss):
    """``0.5·CE + 0.5·soft Dice`` (MONAI ``DiceCELoss``); ignores ``groups``.

    Args:
        num_classes: ``K`` including background.
        num_groups: attribute vocabulary size (only used to validate ``groups``).
        lambda_ce: weight of the cross-entropy term.
        lambda_dice: weight of the Dice term.
    """

    def __init__(
        self, num_classes: int, num_groups: int, lambda_ce: float = 0.5, lambda_dice: float = 0.5
    ) -> None:
        super().__init__(num_classes, num_groups)
        from monai.losses import DiceCELoss as _MonaiDiceCE

        self.loss = _MonaiDiceCE(
            to_onehot_y=True, softmax=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce
        )

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, groups: torch.Tensor
    ) -> torch.Tensor:
        """``logits (B, K, *S)``, ``target (B, *S)``, ``groups (B,)`` → scalar."""
        target = _check_inputs(logits, target, groups, self.num_groups)
        return self.loss(logits, target.unsqueeze(1))  # MONAI wants (B, 1, *S) labels


class FEBSLoss(_GroupLoss):
    """Fair error-bound scaling (FEBS; Tian et al., FairSeg, ICLR 2024).

    Within the batch, the soft-Dice loss ``L_a`` of each group present is computed on the
    pooled samples of that group; the group weight is ``w_a = tanh((min_b L_b / L_a)^γ)``
    (detached). As in the FairSeg reference code, ``w_a`` **scales the predicted
    probabilities** of the group's samples inside the soft Dice, ``Dice(w_a·p, t)``. With
    the non-squared denominator ``Dice(w·p) = 2wI / (wP + T)`` grows with ``w``, so the
    worst group (largest ``L_a``) gets the *smallest* ``w_a`` and therefore the largest
    error bound: its Dice loss is inflated the most. The best group gets ``tanh(1) ≈ 0.76``.

    Total: ``0.5·CE + 0.5·mean_b Dice_loss(w_{a_b}·p_b, t_b)`` (per-sample soft Dice).
    Unknown samples (group −1) are left out of the ``L_a``/min computation and keep
    ``w = 1`` (plain soft Dice); groups absent from the batch get no weight at all, so
    no NaN can arise.

    Args:
        num_classes: ``K`` including background.
        num_groups: attribute vocabulary size.
        gamma: exponent ``γ`` (default 1).
        lambda_ce: weight of the cross-entropy term.
        lambda_dice: weight of the scaled Dice term.
    """

    def __init__(
        self,
        num_classes: int,
        num_groups: int,
        gamma: float = 1.0,
        lambda_ce: float = 0.5,
        lambda_dice: float = 0.5,
    ) -> None:
        super().__init__(num_classes, num_groups)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.lambda_ce = float(lambda_ce)
        self.lambda_dice = float(lambda_dice)

    @torch.no_grad()
    def group_weights(
        self, probs: torch.Tensor, onehot: torch.Tensor, groups: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample FEBS weights ``(B,)``: ``w_a`` of each sample's group, 1 if unknown.

        Args:
            probs: ``(B, K, *S)`` softmax probabilities.
            onehot: ``(B, K, *S)`` one-hot target.
            groups: ``(B,)`` group indices, −1 = unknown.
        """
        weights = torch.ones(groups.shape[0], dtype=probs.dtype, device=probs.device)
        present = [g for g in torch.unique(groups).tolist() if g >= 0]
        if not present:
            return weights
        dims = (0,) + tuple(range(2, probs.dim()))  # pool the group's samples
        losses = {}
        for g in present:
            sel = groups == g
            inter = (probs[sel] * onehot[sel]).sum(dims)
            denom = probs[sel].sum(dims) + onehot[sel].sum(dims)
            losses[g] = (1 - (2 * inter + _SMOOTH) / (denom + _SMOOTH)).mean()
        best = torch.stack(list(losses.values())).min()
        for g, loss_g in losses.items():
            ratio = ((best + _SMOOTH) / (loss_g + _SMOOTH)) ** self.gamma
            weights[groups == g] = torch.tanh(ratio)
        return weights

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, groups: torch.Tensor
    ) -> torch.Tensor:
        """``logits (B, K, *S)``, ``target (B, *S)``, ``groups (B,)`` → scalar."""
        target = _check_inputs(logits, target, groups, self.num_groups)
        probs = torch.softmax(logits, dim=1)
        onehot = _one_hot(target, self.num_classes, probs.dtype)
        w = self.group_weights(probs.detach(), onehot, groups)
        w = w.view(-1, *([1] * (probs.dim() - 1)))
        dice = _soft_dice_per_sample(probs * w, onehot).mean()
        ce = F.cross_entropy(logits, target)
        return self.lambda_ce * ce + self.lambda_dice * dice


class GroupDROLoss(_GroupLoss):
    """Online group DRO (Sagawa et al., ICLR 2020, Algorithm 1) over per-sample DiceCE.

    Per batch: ``ℓ_g`` = mean per-sample ``0.5·CE + 0.5·soft Dice`` over the samples of
    group ``g`` (0 for groups absent from the batch). In training mode the adversarial
    distribution is updated first, ``q_g ← q_g·exp(η·ℓ_g)`` then ``q ← q / Σ q`` (absent
    groups thus lose mass relatively), and the robust loss is ``Σ_g q_g ℓ_g``, as in the
    reference code. Unknown samples (−1) take plain DiceCE: with ``n_k`` known and
    ``n_u`` unknown samples the returned loss is
    ``(n_k·Σ_g q_g ℓ_g + n_u·mean_unknown ℓ) / (n_k + n_u)``.
    ``q`` is a registered buffer (saved with the state dict, initialised uniform).

    Args:
        num_classes: ``K`` including background.
        num_groups: attribute vocabulary size (length of ``q``).
        eta: step size ``η`` of the exponentiated-gradient update (default 0.01).
    """

    q: torch.Tensor

    def __init__(self, num_classes: int, num_groups: int, eta: float = 0.01) -> None:
        super().__init__(num_classes, num_groups)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)
        self.register_buffer("q", torch.full((num_groups,), 1.0 / num_groups))

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, groups: torch.Tensor
    ) -> torch.Tensor:
        """``logits (B, K, *S)``, ``target (B, *S)``, ``groups (B,)`` → scalar."""
        target = _check_inputs(logits, target, groups, self.num_groups)
        probs = torch.softmax(logits, dim=1)
        onehot = _one_hot(target, self.num_classes, probs.dtype)
        per_sample = 0.5 * _ce_per_sample(logits, target) + 0.5 * _soft_dice_per_sample(
            probs, onehot
        )
        known = groups >= 0
        n_known, n_unknown = int(known.sum()), int((~known).sum())
        total = per_sample.new_zeros(())
        if n_known:
            idx = groups[known].long()
            sums = per_sample.new_zeros(self.num_groups).index_add(0, idx, per_sample[known])
            counts = torch.bincount(idx, minlength=self.num_groups).to(per_sample.dtype)
            group_loss = sums / counts.clamp_min(1)  # absent groups → 0
            if self.training:
                with torch.no_grad():
                    q = self.q.to(group_loss.dtype) * torch.exp(self.eta * group_loss.detach())
                    self.q.copy_(q / q.sum())
            total = total + n_known * (group_loss * self.q.to(group_loss.dtype)).sum()
        if n_unknown:
            total = total + per_sample[~known].sum()
        return total / (n_known + n_unknown)


def build_loss(name: str, *, num_classes: int, num_groups: int, **kwargs) -> nn.Module:
    """Build a loss by name.

    Args:
        name: one of ``"dicece"``, ``"febs"``, ``"groupdro"``.
        num_classes: ``K`` including background.
        num_groups: attribute vocabulary size (unknown samples use index −1).
        **kwargs: loss-specific options (``gamma`` for febs, ``eta`` for groupdro,
            ``lambda_ce``/``lambda_dice`` for dicece and febs).

    Returns:
        An ``nn.Module`` called as ``loss(logits (B, K, *S), target (B, *S),
        groups (B,)) -> scalar``.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones).
    """
    classes = {"dicece": DiceCELoss, "febs": FEBSLoss, "groupdro": GroupDROLoss}
    key = str(name).lower()
    if key not in classes:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    return classes[key](num_classes=num_classes, num_groups=num_groups, **kwargs)
