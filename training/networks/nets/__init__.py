"""Whole segmentation networks; importing this package registers them by name."""

from .output import LayerRouting, SegmentationOutput
from .resunet import ResUNet
from .separate import SeparateModels
from .transunet import TransUNet

__all__ = ["LayerRouting", "ResUNet", "SegmentationOutput", "SeparateModels",
           "TransUNet"]
