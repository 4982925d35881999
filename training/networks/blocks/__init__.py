"""Reusable network pieces: routers, experts, the dMoE layer, 2D/3D building blocks."""

from .experts import ExpertBank
from .moe import DMoE, MoEOutput, RoutingInfo
from .routing import UNKNOWN_ATTRIBUTE, AttributeRouterBank, RouterOutput
from .spec import MoESpec, fold_moe_kwargs

__all__ = [
    "UNKNOWN_ATTRIBUTE",
    "AttributeRouterBank",
    "DMoE",
    "ExpertBank",
    "MoEOutput",
    "MoESpec",
    "RouterOutput",
    "RoutingInfo",
    "fold_moe_kwargs",
]
