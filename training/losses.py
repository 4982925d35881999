"""Segmentation losses: Dice+CE and the fairness baselines FEBS, GroupDRO and ADV.

Every loss has the same call signature so the training loop can swap them by name::

    loss = build_loss("febs", num_classes=3, num_groups=3)
    value = loss(logits, target, groups)   # scalar tensor

- ``logits``: ``(B, K, H, W[, D])`` raw network outputs,
- ``target``: ``(B, H, W[, D])`` integer labels in ``[0, K)``,
- ``groups``: ``(B,)`` attribute indices in ``[0, num_groups)``, ``-1`` = unknown.

Two soft-Dice forms (``dice=`` of :class:`DiceCELoss`):

- ``"monai"`` (our default): MONAI's ``DiceLoss`` — per sample, non-squared denominator
  ``Σp + Σt``, mean over samples and classes (background included), smoothing 1e-5;
- ``"reference"``: the FairSeg / TransUNet code's ``DiceLoss`` — squared denominator
  ``Σp² + Σt²``, sums **pooled over the whole batch** per class, mean over classes
  (background included), smoothing 1e-5.

Distributed training (``torch.distributed`` initialised, more than one rank): every
quantity pooled over the batch — the reference Dice, FEBS's group losses, GroupDRO's group
losses and its ``q`` — is summed over all ranks (``training.distributed.global_sum``), so a
run on N processes with per-process batch b computes the same loss, weights and gradients
as one process with batch N·b.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import ddp_gradient_scale, global_sum

LOSS_NAMES = ("dicece", "febs", "groupdro", "adv")
DICE_FORMS = ("monai", "reference")
FEBS_MISSING = ("reference", "present")
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


def one_hot(target: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """``(B, *S)`` labels → ``(B, K, *S)`` one-hot."""
    return F.one_hot(target, num_classes).movedim(-1, 1).to(dtype)


def soft_dice_per_sample(probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """MONAI-form soft Dice loss per sample, mean over classes.

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


def pooled_dice_sums(probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Reference-form Dice sufficient statistics, pooled over the batch: ``(3, K)`` rows
    ``Σ p·t``, ``Σ p²``, ``Σ t²`` per class (sum over samples and voxels)."""
    dims = (0,) + tuple(range(2, probs.dim()))
    return torch.stack([(probs * onehot).sum(dims), (probs * probs).sum(dims),
                        (onehot * onehot).sum(dims)])


def dice_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """Per-class reference Dice losses ``1 − (2I + s) / (Z + Y + s)`` from ``(3, K)`` sums."""
    return 1 - (2 * sums[0] + _SMOOTH) / (sums[1] + sums[2] + _SMOOTH)


def reference_dice_loss(probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """FairSeg/TransUNet ``DiceLoss``: squared, batch-pooled (over all ranks), class mean.

    Returns a scalar whose gradient, under DistributedDataParallel, is that of the loss over
    the global batch (see the module docstring).
    """
    return ddp_gradient_scale(dice_from_sums(global_sum(pooled_dice_sums(probs, onehot))).mean())


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


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


class DiceCELoss(_GroupLoss):
    """``λ_ce·CE + λ_dice·soft Dice``; ignores ``groups``.

    Args:
        num_classes: ``K`` including background.
        num_groups: attribute vocabulary size (only used to validate ``groups``).
        lambda_ce: weight of the cross-entropy term.
        lambda_dice: weight of the Dice term.
        dice: ``"monai"`` (per-sample, non-squared; default) or ``"reference"`` (squared,
            batch-pooled, as the FairSeg/dMoE TransUNet code).
    """

    def __init__(self, num_classes: int, num_groups: int, lambda_ce: float = 0.5,
                 lambda_dice: float = 0.5, dice: str = "monai") -> None:
        super().__init__(num_classes, num_groups)
        self.dice = _check_choice("dice", dice, DICE_FORMS)
        self.lambda_ce, self.lambda_dice = float(lambda_ce), float(lambda_dice)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, groups: torch.Tensor
    ) -> torch.Tensor:
        """``logits (B, K, *S)``, ``target (B, *S)``, ``groups (B,)`` → scalar."""
        target = _check_inputs(logits, target, groups, self.num_groups)
        probs = torch.softmax(logits, dim=1)
        onehot = one_hot(target, self.num_classes, probs.dtype)
        if self.dice == "monai":
            dice = soft_dice_per_sample(probs, onehot).mean()
        else:
            dice = reference_dice_loss(probs, onehot)
        return self.lambda_ce * F.cross_entropy(logits, target) + self.lambda_dice * dice


class FEBSLoss(_GroupLoss):
    """Fair error-bound scaling (FEBS; Tian et al., FairSeg, ICLR 2024), as the reference code.

    The FairSeg reference (``TransUNet/utils.py``, ``febs_loss``), transcribed:

    1. per group ``a`` present in the batch, ``L_a = Σ_k DiceLoss_k`` over that group's
       samples, with the reference Dice form (squared denominator, sums pooled over the
       group's samples and voxels, per class ``k``, background included);
    2. ``L`` starts as zeros for **all** ``num_groups`` groups and only present groups are
       filled in; ``w = tanh((min_g L_g / L)^γ)`` (no gradient). With ``missing="reference"``
       (default) a group absent from the batch keeps ``L = 0``, so ``min = 0`` and every
       sample's weight is ``tanh(0) = 0`` for that batch (the Dice term then has no
       gradient; only CE trains). With ``missing="present"`` (ours) the minimum is taken
       over the groups present, so the best present group gets ``tanh(1) ≈ 0.76``;
    3. the weights **scale the predicted probabilities**: ``loss_dice = mean_k
       DiceLoss_k(w_b·p_b, t_b)`` pooled over the batch. With the squared denominator a
       smaller ``w`` lowers the Dice (raises the loss) of that group's samples;
    4. total ``λ_ce·CE + λ_dice·loss_dice`` (0.5/0.5 in the reference trainer), γ = 1
       (the reference ``train_febs.py`` default).

    Unknown samples (group −1; the reference has none) are left out of step 1 and keep
    ``w = 1``. Where the reference would divide 0 by 0 (a group loss of exactly 0, or γ = 0
    with a missing group) the ratio is taken as 1. Under ``torch.distributed`` the group
    losses and the pooled Dice sums are summed over all ranks.

    Args:
        num_classes: ``K`` including background.
        num_groups: attribute vocabulary size.
        gamma: exponent ``γ`` (default 1).
        lambda_ce: weight of the cross-entropy term.
        lambda_dice: weight of the scaled Dice term.
        missing: ``"reference"`` or ``"present"`` (see step 2).
    """

    def __init__(self, num_classes: int, num_groups: int, gamma: float = 1.0,
                 lambda_ce: float = 0.5, lambda_dice: float = 0.5,
                 missing: str = "reference") -> None:
        super().__init__(num_classes, num_groups)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.lambda_ce = float(lambda_ce)
        self.lambda_dice = float(lambda_dice)
        self.missing = _check_choice("missing", missing, FEBS_MISSING)

    @torch.no_grad()
    def group_losses(self, probs: torch.Tensor, onehot: torch.Tensor,
                     groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 1: ``(L (G,), present (G,) bool)``; ``L`` is 0 where a group is absent.

        Args:
            probs: ``(B, K, *S)`` softmax probabilities; onehot: ``(B, K, *S)``;
            groups: ``(B,)`` group indices, −1 = unknown.
        """
        G, K = self.num_groups, self.num_classes
        known = groups >= 0
        idx = groups[known].long()
        sums = probs.new_zeros(G, 3, K)
        if idx.numel():
            dims = tuple(range(2, probs.dim()))
            p, t = probs[known], onehot[known]
            per_sample = torch.stack([(p * t).sum(dims), (p * p).sum(dims),
                                      (t * t).sum(dims)], dim=1)  # (n, 3, K)
            sums.index_add_(0, idx, per_sample)
        counts = torch.bincount(idx, minlength=G).to(probs.dtype)
        pooled = global_sum(torch.cat([sums.flatten(), counts]))  # one all-reduce
        sums, counts = pooled[:-G].view(G, 3, K), pooled[-G:]
        present = counts > 0
        losses = dice_from_sums(sums.transpose(0, 1)).sum(-1)  # (3, G, K) -> (G,)
        return torch.where(present, losses, torch.zeros_like(losses)), present

    @torch.no_grad()
    def weights_from_losses(self, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Step 2: ``(G,)`` group weights ``tanh((min L / L)^γ)``."""
        if not bool(present.any()):
            return torch.ones_like(losses)
        pool = losses if self.missing == "reference" else losses[present]
        best = pool.min()
        ratio = torch.where(losses > 0, best / losses.clamp_min(1e-30),
                            torch.ones_like(losses))  # 0/0 → 1
        return torch.tanh(ratio ** self.gamma)

    @torch.no_grad()
    def group_weights(self, probs: torch.Tensor, onehot: torch.Tensor,
                      groups: torch.Tensor) -> torch.Tensor:
        """Per-sample FEBS weights ``(B,)``: ``w`` of each sample's group, 1 if unknown."""
        w = self.weights_from_losses(*self.group_losses(probs, onehot, groups))
        out = torch.ones(groups.shape[0], dtype=probs.dtype, device=probs.device)
        known = groups >= 0
        out[known] = w[groups[known].long()].to(probs.dtype)
        return out

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, groups: torch.Tensor
    ) -> torch.Tensor:
        """``logits (B, K, *S)``, ``target (B, *S)``, ``groups (B,)`` → scalar."""
        target = _check_inputs(logits, target, groups, self.num_groups)
        probs = torch.softmax(logits, dim=1)
        onehot = one_hot(target, self.num_classes, probs.dtype)
        w = self.group_weights(probs.detach(), onehot, groups)
        w = w.view(-1, *([1] * (probs.dim() - 1)))
        dice = reference_dice_loss(probs * w, onehot)
        return self.lambda_ce * F.cross_entropy(logits, target) + self.lambda_dice * dice


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
    Under ``torch.distributed`` the group sums and counts are summed over all ranks, so
    ``q`` is updated from the global batch and stays identical on every rank.

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
        onehot = one_hot(target, self.num_classes, probs.dtype)
        per_sample = 0.5 * _ce_per_sample(logits, target) + 0.5 * soft_dice_per_sample(
            probs, onehot
        )
        known = groups >= 0
        idx = groups[known].long()
        G = self.num_groups
        # one all-reduce for the (G,) group sums and counts and the unknown sum and count
        stats = global_sum(torch.cat([
            per_sample.new_zeros(G).index_add(0, idx, per_sample[known]),
            torch.bincount(idx, minlength=G).to(per_sample.dtype),
            per_sample[~known].sum().view(1),
            per_sample.new_tensor([float((~known).sum())]),
        ]))
        sums, counts = stats[:G], stats[G:2 * G]
        unknown_sum, n_unknown = stats[2 * G], stats[2 * G + 1]
        n_known = counts.sum()
        group_loss = sums / counts.clamp_min(1)  # absent groups → 0
        if self.training and bool(n_known > 0):
            with torch.no_grad():
                q = self.q.to(group_loss.dtype) * torch.exp(self.eta * group_loss.detach())
                self.q.copy_(q / q.sum())
        total = n_known * (group_loss * self.q.to(group_loss.dtype)).sum() + unknown_sum
        return ddp_gradient_scale(total / (n_known + n_unknown).clamp_min(1))


def build_loss(name: str, *, num_classes: int, num_groups: int, **kwargs) -> nn.Module:
    """Build a loss by name.

    Args:
        name: one of ``"dicece"``, ``"febs"``, ``"groupdro"``, ``"adv"``.
        num_classes: ``K`` including background.
        num_groups: attribute vocabulary size (unknown samples use index −1).
        **kwargs: loss-specific options (``gamma``/``missing`` for febs, ``eta`` for
            groupdro, ``lambda_ce``/``lambda_dice`` for dicece and febs, ``dice`` for
            dicece and adv; ``in_features``, ``weight``, ``group_counts`` for adv, see
            ``training.adversarial.AdversarialLoss``).

    Returns:
        An ``nn.Module`` called as ``loss(logits (B, K, *S), target (B, *S),
        groups (B,)) -> scalar``.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones).
    """
    key = str(name).lower()
    if key == "adv":
        from .adversarial import AdversarialLoss

        return AdversarialLoss(num_classes=num_classes, num_groups=num_groups, **kwargs)
    classes = {"dicece": DiceCELoss, "febs": FEBSLoss, "groupdro": GroupDROLoss}
    if key not in classes:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    return classes[key](num_classes=num_classes, num_groups=num_groups, **kwargs)
