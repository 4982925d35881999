"""napari-dmoe's training package: dMoE networks, data, losses, fairness metrics and CLIs.

Nothing here imports napari or Qt; the plugin (``napari_dmoe``) is a thin UI over this API.
"""

__version__ = "0.1.0"
