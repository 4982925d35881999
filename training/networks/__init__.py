"""Networks: the dMoE layer and the segmentation backbones built around it."""

from .blocks import UNKNOWN_ATTRIBUTE, DMoE, MoEOutput, MoESpec, RoutingInfo
from .nets import LayerRouting, ResUNet, SegmentationOutput, TransUNet
from .registry import create_model, list_models, list_presets, register_model

__all__ = [
    "UNKNOWN_ATTRIBUTE",
    "DMoE",
    "LayerRouting",
    "MoEOutput",
    "MoESpec",
    "ResUNet",
    "RoutingInfo",
    "SegmentationOutput",
    "TransUNet",
    "create_model",
    "list_models",
    "list_presets",
    "register_model",
]
