"""Regenerate docs/dicom_screenshot.png: a DICOM CT series segmented and saved as RTSTRUCT.

A synthetic pelvic CT is written as a DICOM series (one file per slice, shuffled names),
opened as a folder with the plugin's reader, segmented by the widget with the bundled CT
model, saved through the plugin's RTSTRUCT writer, and the RT Structure Set's contours are
read back and drawn (yellow) over the prediction, so the picture shows what a planning
system would receive. Run with a display, or headless:
``xvfb-run -a -s "-screen 0 1920x1080x24" python scripts/dicom_screenshot.py``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from napari_dmoe._compat import prepare_torch

prepare_torch()  # before any canvas exists (see napari_dmoe._compat)

import napari  # noqa: E402
import numpy as np  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

from napari_dmoe._widget import DMoEWidget  # noqa: E402
from napari_dmoe._writer import write_labels_rtstruct  # noqa: E402
from training.data.dicom import read_series, write_ct_series  # noqa: E402
from training.data.synthetic import CT_SHAPE, CT_SPACING, GROUPS, ct_affine  # noqa: E402
from training.data.synthetic_images import draw_ct  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "src" / "napari_dmoe" / "models"


def _wait(predicate, timeout: float = 300.0) -> None:
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            sys.exit("timed out waiting for the widget")
        QApplication.processEvents()
        time.sleep(0.05)


def _rtstruct_paths(path: str, folder: Path) -> list[np.ndarray]:
    """Contours of ROI 1 as napari (z, y, x) data coordinates of the series layer."""
    import pydicom

    volume = read_series(folder, pixels=False)
    inverse = np.linalg.inv(volume.affine_lps)
    out = []
    for contour in pydicom.dcmread(path).ROIContourSequence[0].get("ContourSequence", []):
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        ijk = (inverse @ np.c_[points, np.ones(len(points))].T).T[:, :3]
        out.append(np.r_[ijk, ijk[:1]][:, ::-1])  # closed, (k, j, i) = layer (z, y, x)
    return out


def main(out: str = "docs/dicom_screenshot.png") -> None:
    tmp = Path(tempfile.mkdtemp())
    folder = tmp / "CT_pelvis"
    _, look, cut = GROUPS["ct"]["T3"]
    hu, _ = draw_ct(np.random.default_rng(12), look, cut, CT_SHAPE, CT_SPACING)
    names = [f"IM{v:04d}" for v in np.random.default_rng(0).permutation(CT_SHAPE[2])]
    write_ct_series(hu.astype(np.float32), folder, ct_affine(), description="Pelvis CT 2.5 mm",
                    file_names=names)
    viewer = napari.Viewer()
    viewer.window._qt_window.resize(1500, 950)
    [image] = viewer.open(str(folder), plugin="napari-dmoe")
    widget = DMoEWidget(viewer)
    viewer.window.add_dock_widget(widget, name="dMoE segmentation", area="right")
    _wait(lambda: widget.loader is None and widget.worker is None)
    if widget.segmenter is None or widget.segmenter.spatial_dims != 3:
        widget.load_model(str(MODELS / "ct_tstage_dmoe.safetensors"))
        _wait(lambda: widget.loader is None and widget.worker is None)
    index = widget.attribute_combo.findText("T3")
    if index >= 0:
        widget.attribute_combo.setCurrentIndex(index)
    widget.routing_check.setChecked(False)
    widget.run()
    _wait(lambda: widget.worker is None)
    labels = next(layer for layer in viewer.layers
                  if isinstance(layer, napari.layers.Labels) and layer is not image)
    rt = write_labels_rtstruct(str(tmp / "contours.rtstruct.dcm"), labels.data,
                               {"name": labels.name, "metadata": labels.metadata})[0]
    paths = _rtstruct_paths(rt, folder)
    viewer.add_shapes(paths, shape_type="path", edge_color="yellow", edge_width=0.6,
                      name="RTSTRUCT contours (read back)", scale=image.scale,
                      translate=image.translate, affine=image.affine, units=image.units)
    for layer in viewer.layers:  # the CT, its segmentation and the contours only
        layer.visible = layer is image or layer is labels or layer.name.startswith("RTSTRUCT")
    middle = int(np.median([p[0, 0] for p in paths]))
    viewer.dims.set_point(0, image.data_to_world([middle, 0, 0])[0])
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.05)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(out, canvas_only=False)
    print(f"wrote {out} (RTSTRUCT: {rt}, {len(paths)} contours)")
    viewer.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
