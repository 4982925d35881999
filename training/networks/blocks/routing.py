"""Attribute-aware noisy top-k routers (Eq. 3-5 of Oh et al. 2025; Shazeer et al. 2017).

A *router bank* holds one noisy top-k gating network per attribute value, plus optionally
one for patients whose attribute is unknown. Each sample picks its router by attribute
index (mode-switching control); the per-sample weights are gathered into one tensor and
applied with a single batched matrix product, so there is no Python loop over the batch.

*Summed routing* (intersectional, ``num_attributes=(3, 2)`` for race × gender): the bank
holds one router per value of each attribute part (3 + 2, plus one unknown router per part)
and a sample's router is the **sum** of its parts' routers. Logits are linear in the router
weights, so summing weights equals summing the parts' logits ``H^race(x) + H^gender(x)`` (the
same for the noise weights and biases). A combination index is the mixed-radix number of
its part indices, first part most significant (``race * 2 + gender``); ``-1`` (unknown)
uses every part's unknown router.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from .noisy_top_k import noisy_top_k, softmax_top, softplus

UNKNOWN_ATTRIBUTE = -1
"""Attribute index meaning "this patient's attribute is missing"."""


class RouterOutput(NamedTuple):
    """What a router decides for every token.

    indices: ``(B, N, k)`` chosen expert per token, best first.
    gates: ``(B, N, k)`` softmax weights over the chosen experts (rows sum to 1).
    aux_loss: scalar load-balancing loss (zero when its weights are zero).
    """

    indices: torch.Tensor
    gates: torch.Tensor
    aux_loss: torch.Tensor


def _cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation of a 1-D tensor (Shazeer et al. 2017, Eq. 6)."""
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.float().var() / (x.float().mean() ** 2 + 1e-10)


def attribute_parts(num_attributes: int | Sequence[int]) -> tuple[int, ...]:
    """``num_attributes`` as a tuple of part sizes: ``3`` → ``(3,)``, ``[3, 2]`` → ``(3, 2)``
    (checkpoints store tuples as JSON lists).

    Raises:
        ValueError: a size below 1 or an empty sequence.
    """
    if isinstance(num_attributes, Sequence) and not isinstance(num_attributes, str):
        parts = tuple(int(n) for n in num_attributes)
    else:
        parts = (int(num_attributes),)
    if not parts or min(parts) < 1:
        raise ValueError(f"num_attributes must be >= 1 (or a non-empty sequence of part sizes "
                         f">= 1), got {num_attributes!r}")
    return parts


class AttributeRouterBank(nn.Module):
    """Noisy top-k gating, one router per attribute value.

    ``G^a(x) = Softmax(KeepTopK(H^a(x), k))`` with
    ``H^a(x)_i = (x W^a_g)_i + N(0, 1) * Softplus((x W^a_noise)_i)`` while training and
    ``H^a(x) = x W^a_g`` at inference (deterministic; the reference code also adds noise at
    inference, we do not).

    Args:
        embed_dim: token width C.
        num_experts: number of experts E the routers choose from.
        top_k: experts kept per token.
        num_attributes: attribute values with their own router. ``1`` makes the bank
            attribute-blind (the plain MoE baseline): every sample uses router 0. A sequence
            of part sizes (e.g. ``(3, 2)``) makes *summed* routing: ``prod(parts)``
            combination indices, one router per part value, the parts' routers summed (see
            the module docstring); a one-element sequence is the same as its int.
        unknown_router: add one extra router used for ``UNKNOWN_ATTRIBUTE`` (-1) (summed
            routing: one per part). It is trained by attribute dropout (the network replaces
            a sample's attribute by -1 with some probability while training). Without it,
            unknown samples use the mean of the attribute routers' logits (summed: the sum
            over parts of each part's mean).
        importance_weight, load_weight: weights of Shazeer's importance and load losses
            (0 by default, as in the paper).
    """

    def __init__(
        self,
        embed_dim: int,
        num_experts: int = 8,
        top_k: int = 2,
        num_attributes: int | Sequence[int] = 1,
        unknown_router: bool = True,
        importance_weight: float = 0.0,
        load_weight: float = 0.0,
        router_bias: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        parts = attribute_parts(num_attributes)
        num_attributes = math.prod(parts)
        if importance_weight < 0 or load_weight < 0:
            raise ValueError(
                f"loss weights must be >= 0, got importance={importance_weight}, load={load_weight}"
            )
        self.embed_dim = embed_dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_attributes = num_attributes
        self.parts = parts
        self.unknown_router = bool(unknown_router) and num_attributes > 1
        self.importance_weight = float(importance_weight)
        self.load_weight = float(load_weight)
        num_routers = sum(parts) + len(parts) * int(self.unknown_router)
        if len(parts) > 1:
            # (num_attributes + 1, P): per combination (last row: unknown) the router of each
            # part; see _summed_table. Derived from the sizes, so not saved in checkpoints.
            self.register_buffer("part_routers", self._summed_table(), persistent=False)
        # Zero init as in Shazeer et al.: routing starts uniform and noise breaks the ties.
        self.w_gate = nn.Parameter(torch.zeros(num_routers, embed_dim, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(num_routers, embed_dim, num_experts))
        self.router_bias = bool(router_bias)
        if self.router_bias:  # the official dMoE code: nn.Linear routers (bias, default init)
            bound = 1.0 / math.sqrt(embed_dim)
            shape = (num_routers, num_experts)
            self.b_gate = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
            self.b_noise = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
            with torch.no_grad():
                self.w_gate.uniform_(-bound, bound)
                self.w_noise.uniform_(-bound, bound)

    @property
    def num_routers(self) -> int:
        return self.w_gate.shape[0]

    @property
    def summed(self) -> bool:
        """True for summed (intersectional) routing over several attribute parts."""
        return len(self.parts) > 1

    def _summed_table(self) -> torch.Tensor:
        """``(num_attributes + 1, P)`` long: the router of each part for every combination
        index (mixed radix, first part most significant), last row for unknown (-1).

        Router layout: part 0's values, then its unknown router (if any), then part 1's, …
        Without unknown routers, index ``num_routers + p`` stands for part ``p``'s mean.
        """
        P = len(self.parts)
        unknown = int(self.unknown_router)
        offsets = [0]
        for n in self.parts[:-1]:
            offsets.append(offsets[-1] + n + unknown)
        table = torch.empty(self.num_attributes + 1, P, dtype=torch.long)
        for combo in range(self.num_attributes):
            rest = combo
            for p in reversed(range(P)):
                table[combo, p] = offsets[p] + rest % self.parts[p]
                rest //= self.parts[p]
        for p in range(P):
            table[-1, p] = (offsets[p] + self.parts[p] if unknown
                            else offsets[-1] + self.parts[-1] + p)
        return table

    def router_index(self, attr: torch.Tensor) -> torch.Tensor:
        """Map attribute indices ``(B,)`` (``-1`` = unknown) to router indices ``(B,)``.

        Returns -1 where an unknown sample has no dedicated router (the caller then averages).
        """
        if self.num_attributes == 1:
            return torch.zeros_like(attr)
        bad = (attr < UNKNOWN_ATTRIBUTE) | (attr >= self.num_attributes)
        if bool(bad.any()):
            raise ValueError(
                f"attribute indices must be in [-1, {self.num_attributes - 1}], "
                f"got {attr[bad].unique().tolist()}"
            )
        if self.unknown_router:
            return torch.where(attr == UNKNOWN_ATTRIBUTE, self.num_attributes, attr)
        return attr

    def _weights(self, weight: torch.Tensor, routers: torch.Tensor) -> torch.Tensor:
        """Per-sample router weights ``(B, C, E)``; unknown without a router → mean.

        Summed routing: ``routers`` are combination indices (-1 = unknown) and the result is
        the sum of the parts' router weights.
        """
        if self.summed:
            return self._summed_weights(weight, routers)
        if self.unknown_router or self.num_attributes == 1:  # every sample has a router
            return weight[routers]
        mean = weight[: self.num_attributes].mean(0, keepdim=True)
        table = torch.cat([weight, mean], 0)  # index num_routers = the mean router
        return table[torch.where(routers < 0, self.num_routers, routers)]

    def _with_means(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with each part's mean router appended when there are no unknown
        routers (the rows ``_summed_table`` points unknown samples to)."""
        if self.unknown_router:
            return weight
        start, means = 0, []
        for n in self.parts:
            means.append(weight[start:start + n].mean(0, keepdim=True))
            start += n
        return torch.cat([weight, *means], 0)

    def _summed_weights(self, weight: torch.Tensor, combos: torch.Tensor) -> torch.Tensor:
        rows = self.part_routers[torch.where(combos < 0, self.num_attributes, combos)]  # (B, P)
        return self._with_means(weight)[rows].sum(1)

    def part_logits(self, x: torch.Tensor, attr: torch.Tensor) -> torch.Tensor:
        """Clean logits ``(P, B, N, E)`` of each part's router for tokens ``x (B, N, C)``
        (``P = 1`` without summed routing). Their sum over the first axis is the routing
        logit at inference; for inspection and tests."""
        routers = self.router_index(attr.to(device=x.device, dtype=torch.long))
        if not self.summed:
            picked = [(self._weights(self.w_gate, routers),
                       self._weights(self.b_gate, routers) if self.router_bias else None)]
        else:
            rows = self.part_routers[torch.where(routers < 0, self.num_attributes, routers)]
            w, b = self._with_means(self.w_gate), None
            if self.router_bias:
                b = self._with_means(self.b_gate)
            picked = [(w[rows[:, p]], b[rows[:, p]] if b is not None else None)
                      for p in range(len(self.parts))]
        outs = []
        for w_p, b_p in picked:
            out = torch.bmm(x, w_p.to(x.dtype))
            if b_p is not None:
                out = out + b_p.to(x.dtype)[:, None]
            outs.append(out)
        return torch.stack(outs)

    def forward(self, x: torch.Tensor, attr: torch.Tensor,
                noise: torch.Tensor | None = None) -> RouterOutput:
        """Route tokens.

        Args:
            x: tokens ``(B, N, C)``.
            attr: attribute indices ``(B,)``; ``-1`` means unknown.
            noise: standard normal draws ``(B, N, E)`` to use for the routing noise while
                training (tests replay them); None = fresh draws.
        """
        if x.ndim != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"expected tokens (B, N, {self.embed_dim}), got {tuple(x.shape)}")
        if attr.shape != (x.shape[0],):
            raise ValueError(f"expected attr of shape ({x.shape[0]},), got {tuple(attr.shape)}")
        routers = self.router_index(attr.to(device=x.device, dtype=torch.long))
        noisy = self.training and torch.is_grad_enabled()
        E = self.num_experts
        if noise is not None and noise.shape != (*x.shape[:2], E):
            raise ValueError(f"noise must have shape {(*x.shape[:2], E)}, got {tuple(noise.shape)}")
        weights = [self.w_gate, self.w_noise] if noisy else [self.w_gate]
        # Gate and noise logits from one product: (B, N, C) @ (B, C, 2E).
        w = torch.cat([self._weights(v, routers) for v in weights], -1).to(x.dtype)
        b = None
        if self.router_bias:
            biases = [self.b_gate, self.b_noise] if noisy else [self.b_gate]
            b = torch.cat([self._weights(v, routers) for v in biases], -1).to(x.dtype)
        want_aux = self.importance_weight > 0 or self.load_weight > 0
        aux = x.new_zeros((), dtype=torch.float32)
        if noisy and not want_aux:  # the training configuration: one fused function
            indices, gates = noisy_top_k(x, w, b, self.top_k, noise)
            return RouterOutput(indices, gates, aux)
        both = torch.bmm(x, w)
        if b is not None:
            both = both + b[:, None]
        parts = both.split(E, dim=-1)  # split, not slices: its backward needs no zero fill
        clean = parts[0]  # (B, N, E)
        if noisy:
            noise_std = softplus(parts[1])
            draws = torch.randn_like(clean) if noise is None else noise.to(clean.dtype)
            logits = torch.addcmul(clean, draws, noise_std)
        else:
            logits = clean
        k = self.top_k
        k_extra = min(k + 1, self.num_experts) if (want_aux and noisy) else k
        top_logits, top_idx = logits.topk(k_extra, dim=-1)
        gates = softmax_top(top_logits[..., :k], x.dtype)
        indices = top_idx[..., :k]
        if want_aux:
            aux = self._balance_loss(gates, indices, clean, logits, top_logits, noisy and noise_std)
        return RouterOutput(indices, gates, aux)

    def _balance_loss(self, gates, indices, clean, noisy_logits, top_logits, noise_std):
        """Importance + load losses of Shazeer et al. 2017 (Eq. 6-10)."""
        E = self.num_experts
        full = torch.zeros(*gates.shape[:-1], E, dtype=torch.float32, device=gates.device)
        full.scatter_(-1, indices, gates.float())
        importance = full.reshape(-1, E).sum(0)
        loss = self.importance_weight * _cv_squared(importance)
        if self.load_weight > 0:
            if noise_std is not False and self.top_k < E:
                # P(expert i stays in the top k if only its own noise is redrawn).
                k = self.top_k
                thresh_in = top_logits[..., k : k + 1]  # (B, N, 1): (k+1)-th value
                thresh_out = top_logits[..., k - 1 : k]  # k-th value
                is_in = noisy_logits > thresh_in
                std = noise_std.float() + 1e-9
                p_in = 0.5 * (1 + torch.erf((clean - thresh_in) / (std * math.sqrt(2))))
                p_out = 0.5 * (1 + torch.erf((clean - thresh_out) / (std * math.sqrt(2))))
                load = torch.where(is_in, p_in, p_out).reshape(-1, E).sum(0)
            else:
                load = (full > 0).reshape(-1, E).sum(0).float()
            loss = loss + self.load_weight * _cv_squared(load)
        return loss
