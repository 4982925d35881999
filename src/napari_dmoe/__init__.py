"""napari-dmoe: fair medical image segmentation with a distribution-aware Mixture of Experts."""

__version__ = "0.1.0"
