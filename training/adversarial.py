"""ADV baseline: adversarial debiasing with a gradient-reversal discriminator.

Madras et al. 2018 (LAFTR) / Ganin & Lempitsky 2015: a small discriminator predicts the
patient attribute from the encoder's bottleneck features; between the features and the
discriminator sits a gradient-reversal layer, so the discriminator learns to predict the
attribute while the encoder receives ``−λ`` times that gradient and learns features from
which the attribute cannot be predicted.

:class:`AdversarialLoss` keeps the discriminator (its parameters must be optimised with
the network's: ``optimizer = AdamW([*model.parameters(), *loss.parameters()])``) and
reads the bottleneck through a forward hook set by :meth:`AdversarialLoss.attach`::

    loss = build_loss("adv", num_classes=3, num_groups=3, in_features=bottleneck_channels(model))
    loss.attach(model)
    value = loss(model(x, attr), target, attr)   # segmentation + weight · attribute CE

Bottleneck: TransUNet — the tokens after the encoder's final LayerNorm ``(B, N, C)``;
ResUNet — the output of the last encoder stage ``(B, C, *S)``; both mean-pooled to
``(B, C)``. The attribute cross-entropy is *attribute-balanced*: class weights
``n / (G · n_g)`` from the training-set counts ``group_counts`` (or from the batch when not
given), so the rare groups count as much as the majority. Unknown samples (−1) are left
out of the adversarial term.

Under DistributedDataParallel the discriminator (outside the DDP wrapper) has its gradients
averaged by hooks, and the balanced CE is a weighted mean over the *global* batch, so N
processes train the network and the discriminator as one process with the N batches
(tested in ``tests/training/test_distributed.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import ddp_gradient_scale, global_sum
from .losses import DiceCELoss

__all__ = ["GradientReversal", "AttributeDiscriminator", "AdversarialLoss",
           "bottleneck_module", "bottleneck_channels", "grad_reverse"]


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Identity forward; gradient multiplied by ``−lam`` backward."""
    return _Reverse.apply(x, float(lam))


class GradientReversal(nn.Module):
    """Module form of :func:`grad_reverse` (Ganin & Lempitsky 2015)."""

    def __init__(self, lam: float = 1.0) -> None:
        super().__init__()
        self.lam = float(lam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.lam)


class AttributeDiscriminator(nn.Module):
    """Pooled features ``(B, C)`` → attribute logits ``(B, G)``: Linear-ReLU-Linear."""

    def __init__(self, in_features: int, num_groups: int, hidden: int = 64) -> None:
        super().__init__()
        if in_features < 1 or num_groups < 1 or hidden < 1:
            raise ValueError(f"in_features, num_groups and hidden must be >= 1, got "
                             f"{in_features}, {num_groups}, {hidden}")
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, num_groups))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats)


def bottleneck_module(model: nn.Module) -> tuple[nn.Module, str]:
    """The module whose output is the network's bottleneck, and its layout.

    Returns:
        ``(module, "tokens")`` for TransUNet (output ``(B, N, C)``) or
        ``(module, "channels")`` for ResUNet (output ``(B, C, *S)``).

    Raises:
        ValueError: the network has no known bottleneck (e.g. ``separate``).
    """
    from .distributed import unwrap

    model = unwrap(model)
    name = getattr(model, "model_name", type(model).__name__.lower())
    encoder = getattr(model, "encoder", None)
    if encoder is not None and hasattr(encoder, "norm") and hasattr(encoder, "blocks"):
        return encoder.norm, "tokens"
    if isinstance(encoder, nn.ModuleList) and len(encoder):
        return encoder[-1], "channels"
    raise ValueError(f"--loss adv needs a network with an encoder bottleneck (transunet or "
                     f"resunet), got {name!r}; train it with another --loss")


def bottleneck_channels(model: nn.Module) -> int:
    """Channels ``C`` of :func:`bottleneck_module`'s output."""
    module, layout = bottleneck_module(model)
    if layout == "tokens":
        return int(module.normalized_shape[0])
    convs = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    return int(convs[-1].out_channels)


class AdversarialLoss(nn.Module):
    """Segmentation DiceCE ``+ weight ·`` attribute-balanced CE of a reversed-gradient
    discriminator on the bottleneck (see the module docstring).

    Args:
        num_classes: ``K`` segmentation classes including background.
        num_groups: attribute vocabulary size ``G``.
        in_features: bottleneck channels ``C`` (:func:`bottleneck_channels`).
        weight: weight of the adversarial term (``--adv-weight``, default 0.1).
        lam: gradient-reversal strength (the encoder gets ``−lam ×`` the gradient).
        group_counts: training samples per group (length ``G``) for the balanced CE;
            ``None``: balance on each batch's counts.
        hidden: discriminator hidden width.
        dice: Dice form of the segmentation term (``"monai"`` or ``"reference"``).
    """

    def __init__(self, num_classes: int, num_groups: int, in_features: int,
                 weight: float = 0.1, lam: float = 1.0,
                 group_counts: Sequence[float] | None = None, hidden: int = 64,
                 dice: str = "monai") -> None:
        super().__init__()
        if weight < 0 or lam < 0:
            raise ValueError(f"adv weight and lam must be >= 0, got {weight}, {lam}")
        self.seg = DiceCELoss(num_classes, num_groups, dice=dice)
        self.num_groups = int(num_groups)
        self.weight, self.lam = float(weight), float(lam)
        self.discriminator = AttributeDiscriminator(in_features, num_groups, hidden)
        if group_counts is not None:
            counts = torch.as_tensor(list(group_counts), dtype=torch.float32)
            if counts.shape != (num_groups,) or bool((counts < 0).any()):
                raise ValueError(f"group_counts must be {num_groups} counts >= 0, got "
                                 f"{list(group_counts)}")
            balance = counts.sum() / (num_groups * counts.clamp_min(1))
        else:
            balance = torch.zeros(0)
        self.register_buffer("balance", balance, persistent=False)
        self._features: torch.Tensor | None = None
        self._layout = "tokens"
        self._handle = None
        self._grad_hooks: list = []
        self._last_attribute_loss: torch.Tensor | None = None

    def attach(self, model: nn.Module) -> AdversarialLoss:
        """Read ``model``'s bottleneck on every forward from now on (replaces a previous one)."""
        if self._handle is not None:
            self._handle.remove()
        module, self._layout = bottleneck_module(model)

        def keep(_module, _inputs, output):
            self._features = output

        self._handle = module.register_forward_hook(keep)
        from .distributed import get_world_size, is_distributed

        if is_distributed() and not self._grad_hooks:
            # the discriminator is not inside DistributedDataParallel: average its gradients
            # as DDP does (attribute_loss scales them by the world size, so the average
            # is the global batch's gradient; it runs on every rank at every step)
            world = get_world_size()

            def average(grad: torch.Tensor) -> torch.Tensor:
                import torch.distributed as dist

                grad = grad.clone()
                dist.all_reduce(grad)
                return grad / world

            self._grad_hooks = [p.register_hook(average) for p in self.discriminator.parameters()]
        return self

    @property
    def last_attribute_loss(self) -> float:
        """The adversarial term of the last training step (NaN before the first)."""
        t = self._last_attribute_loss
        return float("nan") if t is None else float(t)

    def pooled(self, feats: torch.Tensor) -> torch.Tensor:
        """Bottleneck output → ``(B, C)`` mean over tokens or voxels."""
        if self._layout == "tokens":
            return feats.mean(dim=1)
        return feats.flatten(2).mean(dim=2)

    def attribute_loss(self, feats: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Balanced CE of the discriminator on reversed pooled features ``(B, C)``.

        The weighted mean ``Σ w_i·CE_i / Σ w_i`` (``w_i`` the balance weight of sample
        ``i``'s group, 0 for unknown samples) is taken over the **global** batch under
        ``torch.distributed``: numerator and denominator are summed over all ranks
        (``training.distributed.global_sum``) and the gradient scaled for DDP's averaging,
        so N processes train the discriminator and the encoder exactly as one process with
        the N batches. Every sample goes through the discriminator (unknown ones with
        weight 0), so its gradient hooks fire on every rank at every step even when a
        rank's batch holds no known sample (otherwise the ranks' collectives would differ).
        """
        known = groups >= 0
        target = groups.clamp_min(0).long()
        logits = self.discriminator(grad_reverse(feats.float(), self.lam))
        ce = F.cross_entropy(logits, target, reduction="none")
        if self.balance.numel():
            cw = self.balance.to(ce.dtype)
        else:  # balance on the (global) batch's counts
            counts = global_sum(torch.bincount(groups[known].long(),
                                               minlength=self.num_groups).to(ce.dtype))
            cw = counts.sum() / (self.num_groups * counts.clamp_min(1))
        w = cw[target] * known.to(ce.dtype)
        total = global_sum((w * ce).sum())
        weight_sum = global_sum(w.sum())
        # no known sample anywhere: the numerator is exactly 0 and so is the loss
        return ddp_gradient_scale(total / weight_sum.clamp_min(1e-12))

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                groups: torch.Tensor) -> torch.Tensor:
        """``logits (B, K, *S)``, ``target (B, *S)``, ``groups (B,)`` → scalar.

        Raises:
            RuntimeError: :meth:`attach` was not called, or no forward ran since the last call.
        """
        seg = self.seg(logits, target, groups)
        if not self.training or self.weight == 0:
            return seg
        if self._features is None:
            raise RuntimeError("AdversarialLoss: no bottleneck features; call "
                               "loss.attach(model) before training")
        feats, self._features = self.pooled(self._features), None
        adv = self.attribute_loss(feats, groups)
        self._last_attribute_loss = adv.detach()  # no device sync on the training step
        return seg + self.weight * adv
