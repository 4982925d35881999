"""The distribution-aware Mixture-of-Experts layer (Eq. 2-5 of Oh et al. 2025).

``y = x + sum_{i in TopK} G^attr_i(x) * E_i(x)`` on tokens ``(B, N, C)``: experts are shared
by every patient; the router ``G^attr`` is chosen by the patient's attribute. With
``num_attributes=1`` the same layer is the attribute-blind MoE baseline.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .experts import ExpertBank
from .routing import AttributeRouterBank


class RoutingInfo(NamedTuple):
    """Per-token routing decisions of one MoE layer.

    indices: ``(B, N, k)`` chosen experts, best first.
    gates: ``(B, N, k)`` their softmax weights.
    """

    indices: torch.Tensor
    gates: torch.Tensor


class MoEOutput(NamedTuple):
    """output: ``(B, N, C)``; aux_loss: scalar (zero unless enabled); routing: or None."""

    output: torch.Tensor
    aux_loss: torch.Tensor
    routing: RoutingInfo | None


class DMoE(nn.Module):
    """Residual distribution-aware Mixture of Experts.

    Args:
        embed_dim: token width C.
        num_experts: shared experts (8 in the paper).
        top_k: experts per token (2 in the paper).
        num_attributes: attribute values, one router each. ``1`` = attribute-blind MoE. A
            tuple of part sizes (e.g. ``(3, 2)``) = summed intersectional routing, see
            :class:`AttributeRouterBank`.
        mlp_ratio: expert hidden width over C (4).
        dropout: expert dropout (0.1).
        unknown_router: extra router for patients whose attribute is unknown (index -1),
            trained by attribute dropout; see :class:`AttributeRouterBank`.
        importance_weight, load_weight: Shazeer et al.'s balancing losses (0 = off, as in
            the paper); the loss is returned in :class:`MoEOutput`, never stored.
        chunk_rows: assignment rows computed at once; bounds memory on large 3D maps
            (``None``: at least ``DEFAULT_CHUNK_ROWS``, more for narrow experts).
        router_bias: routers with a bias and PyTorch's default (nn.Linear) init, as the
            official code; default: no bias, zero init.
        dropout_position: expert dropout ``"hidden"`` (after the ReLU) or ``"output"``
            (after the second linear layer, as the official code).
    """

    def __init__(
        self,
        embed_dim: int,
        num_experts: int = 8,
        top_k: int = 2,
        num_attributes: int | tuple[int, ...] = 1,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        unknown_router: bool = True,
        importance_weight: float = 0.0,
        load_weight: float = 0.0,
        chunk_rows: int | None = None,
        router_bias: bool = False,
        dropout_position: str = "hidden",
    ) -> None:
        super().__init__()
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.router = AttributeRouterBank(
            embed_dim,
            num_experts=num_experts,
            top_k=top_k,
            num_attributes=num_attributes,
            unknown_router=unknown_router,
            importance_weight=importance_weight,
            load_weight=load_weight,
            router_bias=router_bias,
        )
        self.experts = ExpertBank(embed_dim, num_experts, mlp_ratio=mlp_ratio, dropout=dropout,
                                  dropout_position=dropout_position)
        self.chunk_rows = chunk_rows

    @property
    def embed_dim(self) -> int:
        return self.experts.embed_dim

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def num_attributes(self) -> int:
        return self.router.num_attributes

    def forward(
        self, x: torch.Tensor, attr: torch.Tensor | None = None, return_routing: bool = False
    ) -> MoEOutput:
        """Apply the layer.

        Args:
            x: tokens ``(B, N, C)``.
            attr: attribute indices ``(B,)`` (long); ``-1`` = unknown. ``None`` = all unknown.
            return_routing: also return per-token expert indices and gates (no extra cost
                when False).

        Returns:
            :class:`MoEOutput` with ``output`` ``(B, N, C)``.
        """
        B, N, C = x.shape
        if attr is None:
            attr = torch.full((B,), -1, dtype=torch.long, device=x.device)
        route = self.router(x, attr)
        mixed = self.experts(
            x.reshape(B * N, C),
            route.indices.reshape(B * N, -1),
            route.gates.reshape(B * N, -1),
            chunk_rows=self.chunk_rows,
        )
        routing = RoutingInfo(route.indices, route.gates) if return_routing else None
        return MoEOutput(x + mixed.reshape(B, N, C), route.aux_loss, routing)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"num_attributes={self.num_attributes}, unknown_router={self.router.unknown_router}"
        )
