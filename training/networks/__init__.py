"""Networks: the dMoE layer and the segmentation backbones built around it."""

from .blocks import UNKNOWN_ATTRIBUTE, DMoE, MoEOutput, RoutingInfo

__all__ = ["UNKNOWN_ATTRIBUTE", "DMoE", "MoEOutput", "RoutingInfo"]
