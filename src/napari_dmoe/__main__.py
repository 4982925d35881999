"""``python -m napari_dmoe`` / ``napari-dmoe``: napari with a sample and the widget docked.

    napari-dmoe                       # synthetic fundus sample + "dMoE segmentation"
    napari-dmoe --sample ct           # the 3D CT sample (fundus, skin, ct, none)
    napari-dmoe --image scan.nii.gz   # your own image (NIfTI, TIFF, FairSeg npz, PNG, ...)
    napari-dmoe --model my.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

SAMPLES = ("fundus", "skin", "ct", "none")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-dmoe",
        description="Open napari with a sample image and the dMoE segmentation widget.")
    group = parser.add_argument_group("what to open")
    group.add_argument("--sample", choices=SAMPLES, default=None,
                       help="synthetic sample to open (default: fundus, or none with --image)")
    group.add_argument("--image", type=Path, action="append", default=[],
                       help="image file to open (repeatable)")
    group.add_argument("--model", type=Path, default=None,
                       help="checkpoint (.safetensors) to select instead of a bundled model")
    return parser


def add_layer_data(viewer: Any, layer_data: list[tuple]) -> list[Any]:
    """Add ``(data, kwargs, layer_type)`` tuples to ``viewer``; returns the new layers."""
    out = []
    for data, kwargs, layer_type in layer_data:
        out.append(getattr(viewer, f"add_{layer_type}")(data, **kwargs))
    return out


def launch(viewer: Any, *, sample: str | None = "fundus", images: list[Path] | None = None,
           model: Path | None = None) -> Any:
    """Open the sample and images in ``viewer`` and dock the widget; returns the widget."""
    from ._reader import napari_get_reader, read_paths
    from ._sample_data import load_sample
    from ._widget import DMoEWidget

    if sample and sample != "none":
        add_layer_data(viewer, load_sample(sample))
    for path in images or []:
        if napari_get_reader(str(path)) is not None:
            add_layer_data(viewer, read_paths(str(path)))
        else:
            viewer.open(str(path))
    image_layers = [layer for layer in viewer.layers if type(layer).__name__ == "Image"]
    if image_layers:
        viewer.layers.selection.active = image_layers[-1]
    widget = DMoEWidget(viewer, model=model)
    viewer.window.add_dock_widget(widget, name="dMoE segmentation", area="right")
    # fit the view once the dock has taken its width (the canvas shrinks after layout)
    from qtpy.QtCore import QTimer

    viewer.reset_view()
    QTimer.singleShot(250, viewer.reset_view)
    return widget


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, open napari and run its event loop; returns the exit code."""
    args = _parser().parse_args(argv)
    for path in args.image:
        if not path.exists():
            print(f"error: no such file: {path}")
            return 2
    if args.model is not None and not args.model.is_file():
        print(f"error: no such checkpoint: {args.model}")
        return 2
    sample = args.sample or ("none" if args.image else "fundus")
    import napari

    viewer = napari.Viewer(title="napari-dmoe")
    launch(viewer, sample=sample, images=args.image, model=args.model)
    napari.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
