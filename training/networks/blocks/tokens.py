"""Glue between feature maps and token layers, and the MoE mode switch of the networks.

Feature maps ``(B, C, *S)`` (``S`` = ``(H, W)`` or ``(H, W, D)``) become tokens
``(B, N, C)`` with ``N = prod(S)`` in C order (last axis fastest), and back. The networks use
:func:`build_moe` to turn their ``moe="none"|"moe"|"dmoe"`` argument into a layer, and
:func:`drop_attributes` to implement attribute dropout, which trains the dMoE's
unknown-attribute router.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .moe import DMoE, RoutingInfo
from .routing import UNKNOWN_ATTRIBUTE
from .spec import MoESpec

MOE_MODES = ("none", "moe", "dmoe")
"""``none``: no MoE layer; ``moe``: attribute-blind MoE (one router, the attribute is
ignored); ``dmoe``: one router per attribute value plus an unknown-attribute router."""


def feature_to_tokens(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``(B, C, *S)`` → tokens ``(B, N, C)`` and the grid ``S``."""
    grid = tuple(x.shape[2:])
    return x.flatten(2).transpose(1, 2), grid


def tokens_to_feature(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Tokens ``(B, N, C)`` with ``N = prod(grid)`` → ``(B, C, *grid)``."""
    B, N, C = tokens.shape
    if N != math.prod(grid):
        raise ValueError(f"{N} tokens do not fill a grid of shape {tuple(grid)}")
    return tokens.transpose(1, 2).reshape(B, C, *grid)


def routing_on_grid(routing: RoutingInfo, grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape per-token ``indices``/``gates`` ``(B, N, k)`` to ``(B, *grid, k)``."""
    B, _, k = routing.indices.shape
    shape = (B, *grid, k)
    return routing.indices.reshape(shape), routing.gates.reshape(shape)


def apply_moe_to_tokens(
    moe: DMoE, tokens: torch.Tensor, attr: torch.Tensor | None, return_routing: bool
) -> tuple[torch.Tensor, torch.Tensor, RoutingInfo | None]:
    """Run a MoE layer on tokens ``(B, N, C)``: ``(tokens, aux_loss, routing or None)``."""
    out = moe(tokens, attr, return_routing=return_routing)
    return out.output, out.aux_loss, out.routing


def apply_moe_to_feature_map(
    moe: DMoE, x: torch.Tensor, attr: torch.Tensor | None, return_routing: bool
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Run a MoE layer on every position of a feature map.

    Args:
        moe: layer of width ``C``.
        x: feature map ``(B, C, *S)``.
        attr: attribute indices ``(B,)`` (``-1`` = unknown) or ``None``.
        return_routing: also return ``(indices, gates)`` shaped ``(B, *S, k)``.

    Returns:
        ``(y, aux_loss, routing)`` with ``y`` ``(B, C, *S)``.
    """
    tokens, grid = feature_to_tokens(x)
    y, aux, routing = apply_moe_to_tokens(moe, tokens, attr, return_routing)
    grid_routing = routing_on_grid(routing, grid) if routing is not None else None
    return tokens_to_feature(y, grid), aux, grid_routing


def check_moe_mode(moe: str) -> str:
    """Validate a ``moe`` argument (ValueError listing the valid values)."""
    if moe not in MOE_MODES:
        raise ValueError(f"moe must be one of {list(MOE_MODES)}, got {moe!r}")
    return moe


def build_moe(moe: str, embed_dim: int, spec: MoESpec, num_attributes: int = 1) -> DMoE | None:
    """The MoE layer a network's ``moe`` mode asks for (``None`` for ``"none"``).

    ``"moe"`` builds the attribute-blind baseline (``num_attributes=1``, whatever was
    passed); ``"dmoe"`` one router per attribute value (+ the unknown router).

    Args:
        moe: ``"none"``, ``"moe"`` or ``"dmoe"``.
        embed_dim: token width C of the features the layer sees.
        spec: what the layer is made of (:class:`MoESpec`).
        num_attributes: the routing attribute's vocabulary size.
    """
    check_moe_mode(moe)
    if moe == "none":
        return None
    return DMoE(
        embed_dim,
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        num_attributes=dmoe_routers(spec, num_attributes) if moe == "dmoe" else 1,
        mlp_ratio=spec.mlp_ratio,
        dropout=spec.dropout,
        unknown_router=spec.unknown_router,
        importance_weight=spec.importance_weight,
        load_weight=spec.load_weight,
        router_bias=spec.router_bias,
        dropout_position=spec.dropout_position,
    )


def dmoe_routers(spec: MoESpec, num_attributes: int) -> int | tuple[int, ...]:
    """``num_attributes``, or the spec's ``attribute_parts`` (summed routing) after checking
    that their product is ``num_attributes`` (ValueError naming both otherwise)."""
    parts = spec.attribute_parts
    if parts is None:
        return num_attributes
    if math.prod(parts) != num_attributes:
        raise ValueError(f"moe_spec attribute_parts {list(parts)} give {math.prod(parts)} "
                         f"combinations but num_attributes is {num_attributes}; they must "
                         "match (one index per combination of the parts' values)")
    return parts


def drop_attributes(
    attr: torch.Tensor | None, p: float, training: bool
) -> torch.Tensor | None:
    """Attribute dropout: replace each sample's attribute by ``-1`` with probability ``p``.

    Applied once per forward pass, before any MoE layer, so every layer of a sample sees the
    same (possibly dropped) attribute. Only while ``training``; identity otherwise.

    Args:
        attr: ``(B,)`` long attribute indices (``-1`` = unknown) or ``None``.
        p: drop probability in ``[0, 1]``.
        training: the module's training flag.
    """
    if attr is None or not training or p <= 0.0:
        return attr
    drop = torch.rand(attr.shape, device=attr.device) < p
    return torch.where(drop, torch.full_like(attr, UNKNOWN_ATTRIBUTE), attr)


def zero_aux(x: torch.Tensor) -> torch.Tensor:
    """A float32 scalar zero on ``x``'s device (aux loss of a network without MoE)."""
    return x.new_zeros((), dtype=torch.float32)


def prepare_attributes(
    attr: torch.Tensor | None,
    x: torch.Tensor,
    moe: str,
    attribute_dropout: float,
    training: bool,
) -> torch.Tensor | None:
    """The attribute tensor a network hands to its MoE layers.

    ``None`` unless ``moe == "dmoe"`` (the plain MoE ignores attributes). Otherwise
    ``attr`` as a long tensor ``(B,)`` on ``x``'s device, after attribute dropout.

    Raises:
        ValueError: ``attr`` is not of shape ``(B,)`` for a batch ``x`` of ``B`` samples.
    """
    if moe != "dmoe" or attr is None:
        return None
    attr = torch.as_tensor(attr, device=x.device).long()
    if attr.shape != (x.shape[0],):
        raise ValueError(
            f"attr must have shape (B,)=({x.shape[0]},) with one index per sample, "
            f"got {tuple(attr.shape)}"
        )
    return drop_attributes(attr, attribute_dropout, training)


def check_attribute_dropout(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"attribute_dropout must be in [0, 1], got {p}")
    return float(p)
