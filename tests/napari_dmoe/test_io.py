"""Readers and writers: NIfTI (affine kept), TIFF 2D/RGB/3D, Harvard-FairSeg npz."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import tifffile

from napari_dmoe._reader import META, napari_get_reader, read_paths
from napari_dmoe._writer import write_labels_nifti, write_labels_tiff


def _oblique_affine() -> np.ndarray:
    """Flipped, anisotropic, slightly rotated: a realistic scanner affine."""
    theta = np.deg2rad(10)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0],
                    [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-0.8, -0.8, 2.5])
    affine[:3, 3] = [30.0, -12.5, 44.0]
    return affine


def _write_nifti(path, data, affine) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))


def test_nifti_reader_uses_reversed_axes_spacing_and_origin(tmp_path):
    affine = _oblique_affine()
    volume = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)  # (X, Y, Z)
    path = tmp_path / "scan.nii.gz"
    _write_nifti(path, volume, affine)
    assert napari_get_reader(str(path)) is read_paths
    (data, kwargs, kind), = read_paths(str(path))
    assert kind == "image"
    assert data.shape == (7, 6, 5)  # (Z, Y, X)
    np.testing.assert_array_equal(data, volume.transpose(2, 1, 0))
    np.testing.assert_allclose(kwargs["scale"], [2.5, 0.8, 0.8], rtol=1e-6)
    np.testing.assert_allclose(kwargs["translate"], [44.0, -12.5, 30.0], rtol=1e-6)
    assert kwargs["units"] == ["mm"] * 3
    meta = kwargs["metadata"][META]
    assert meta["axes"] == "zyx"
    np.testing.assert_allclose(meta["affine"], affine, atol=1e-5)


def test_nifti_labels_round_trip_keeps_the_source_affine(tmp_path):
    affine = _oblique_affine()
    source = tmp_path / "scan.nii.gz"
    _write_nifti(source, np.zeros((5, 6, 7), np.float32), affine)
    (_, kwargs, _), = read_paths(str(source))
    labels = np.zeros((7, 6, 5), np.uint8)  # layer order (Z, Y, X)
    labels[2, 1:3, 4] = 2
    labels[5, 0, 0] = 1
    out = write_labels_nifti(str(tmp_path / "mask"), labels, {"metadata": kwargs["metadata"]})
    assert out == [str(tmp_path / "mask.nii.gz")]
    img = nib.load(out[0])
    np.testing.assert_allclose(img.affine, nib.load(str(source)).affine)
    np.testing.assert_array_equal(np.asarray(img.dataobj), labels.transpose(2, 1, 0))
    assert img.header.get_intent()[0] == "label"
    (back, back_kwargs, kind), = read_paths(out[0])
    assert kind == "labels"
    np.testing.assert_array_equal(back, labels)
    np.testing.assert_allclose(back_kwargs["scale"], kwargs["scale"])


def test_nifti_writer_without_metadata_uses_scale_and_translate(tmp_path):
    labels = np.zeros((4, 5, 6), np.int32)
    labels[1, 2, 3] = 300  # needs 16 bits
    out, = write_labels_nifti(str(tmp_path / "m.nii"), labels,
                              {"scale": [3.0, 2.0, 1.0], "translate": [7.0, 8.0, 9.0],
                               "units": ("millimeter",) * 3})
    img = nib.load(out)
    np.testing.assert_allclose(np.diag(img.affine)[:3], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(img.affine[:3, 3], [9.0, 8.0, 7.0])
    assert np.asarray(img.dataobj)[3, 2, 1] == 300
    assert img.header.get_xyzt_units()[0] == "mm"


def test_2d_nifti_stored_as_x_y_1_round_trips(tmp_path):
    source = tmp_path / "slice.nii.gz"
    _write_nifti(source, np.random.rand(8, 9, 1).astype(np.float32), np.diag([0.5, 0.6, 1, 1]))
    (data, kwargs, _), = read_paths(str(source))
    assert data.shape == (9, 8)
    out, = write_labels_nifti(str(tmp_path / "s.nii.gz"), np.ones((9, 8), np.uint8),
                              {"metadata": kwargs["metadata"]})
    assert nib.load(out).shape == (8, 9, 1)


def test_writers_refuse_negative_or_float_labels(tmp_path):
    with pytest.raises(ValueError, match="negative"):
        write_labels_nifti(str(tmp_path / "a.nii.gz"), -np.ones((3, 3), np.int8), {})
    with pytest.raises(ValueError, match="integer"):
        write_labels_tiff(str(tmp_path / "a.tif"), np.ones((3, 3), np.float32), {})


@pytest.mark.parametrize("shape,rgb", [((20, 30), False), ((20, 30, 3), True),
                                       ((4, 20, 30), False)])
def test_tiff_reader_2d_rgb_3d(tmp_path, shape, rgb):
    data = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    path = tmp_path / "image.tif"
    tifffile.imwrite(path, data, photometric="rgb" if rgb else "minisblack")
    (out, kwargs, kind), = read_paths(str(path))
    assert kind == "image"
    assert kwargs["rgb"] is rgb
    np.testing.assert_array_equal(out, data)
    assert len(kwargs["scale"]) == (2 if rgb else len(shape))
    assert ("axes" in kwargs["metadata"][META]) == (len(shape) == 3 and not rgb)


def test_tiff_labels_round_trip_keeps_pixel_size(tmp_path):
    labels = np.zeros((3, 10, 12), np.int32)
    labels[1, 2:5, 3:7] = 4
    out, = write_labels_tiff(str(tmp_path / "seg"), labels,
                             {"scale": [2.5, 0.5, 0.25], "units": ("millimeter",) * 3})
    assert out.endswith("seg.tif")
    (back, kwargs, kind), = read_paths(out)
    assert kind == "labels"  # tagged by the writer, even without "label" in the name
    np.testing.assert_array_equal(back, labels)
    np.testing.assert_allclose(kwargs["scale"], [2.5, 0.5, 0.25], rtol=1e-6)
    assert kwargs["units"] == ["mm"] * 3


def _fairseg_npz(path, **keys) -> None:
    rng = np.random.default_rng(1)
    mask = np.zeros((32, 32), np.int8)
    mask[8:24, 8:24] = -1
    mask[12:20, 12:20] = -2
    arrays = {"slo_fundus": rng.integers(0, 255, (32, 32), dtype=np.uint8),
              "disc_cup_mask": mask, "race": np.array(1), "gender": np.array(0),
              "ethnicity": np.array(-1), "age": np.array(63.0)}
    arrays.update(keys)
    np.savez(path, **arrays)


def test_fairseg_npz_gives_image_ground_truth_and_attributes(tmp_path):
    path = tmp_path / "data_000113.npz"
    _fairseg_npz(path)
    assert napari_get_reader(str(path)) is read_paths
    (image, image_kwargs, k1), (truth, truth_kwargs, k2) = read_paths(str(path))
    assert (k1, k2) == ("image", "labels")
    assert image.shape == (32, 32) and image_kwargs["name"] == "data_000113"
    assert truth_kwargs["name"] == "data_000113 ground truth"
    assert set(np.unique(truth)) == {0, 1, 2}  # rim = 1, cup = 2
    assert truth[16, 16] == 2 and truth[9, 9] == 1 and truth[0, 0] == 0
    attributes = image_kwargs["metadata"][META]["attributes"]
    assert attributes["race"] == "Black"
    assert attributes["gender"] == "Female"
    assert attributes["ethnicity"] == "unknown"
    assert attributes["age"] == "63"
    assert truth_kwargs["metadata"][META]["role"] == "ground_truth"
    assert list(truth_kwargs["features"]["class"]) == ["background", "rim", "cup"]


def test_old_fairseg_key_names_and_foreign_files(tmp_path):
    old = tmp_path / "old.npz"
    np.savez(old, fundus_slo=np.zeros((16, 16), np.uint8),
             disc_cup=np.full((16, 16), -2, np.int8), race=np.array(2))
    layers = read_paths(str(old))
    assert len(layers) == 2 and int(layers[1][0].max()) == 2
    assert layers[0][1]["metadata"][META]["attributes"]["race"] == "White"
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    assert napari_get_reader(str(other)) is None
    assert napari_get_reader(str(tmp_path / "photo.png")) is None


# -- scanner placement (issue 8) ----------------------------------------------------------
def _world(kwargs, index):
    """World point napari gives a layer index, built from the reader's kwargs."""
    from napari.layers import Image

    layer = Image(np.zeros([2] * len(kwargs["scale"]), np.float32),
                  **{k: kwargs[k] for k in ("scale", "translate", "affine") if k in kwargs})
    return np.asarray(layer.data_to_world(index), dtype=float)


@pytest.mark.parametrize("codes", ["LPS", "RAS", "SRA", "ILP", "PIR", "oblique"])
def test_3d_layers_are_placed_in_scanner_millimetres(tmp_path, codes):
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    affine = _oblique_affine() if codes == "oblique" else np.diag([-0.9, -0.9, 2.5, 1.0])
    affine[:3, 3] = [30.0, -12.5, 44.0]
    volume = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    img = nib.Nifti1Image(volume, affine)
    if codes != "oblique":
        img = img.as_reoriented(ornt_transform(io_orientation(affine), axcodes2ornt(tuple(codes))))
    path = tmp_path / "scan.nii.gz"
    stored = np.asarray(img.dataobj)
    _write_nifti(path, stored, img.affine)
    (data, kwargs, _), = read_paths(str(path))
    order = kwargs["metadata"][META]["axis_order"]
    assert data.shape == tuple(stored.shape[i] for i in order)[::-1]
    affine = nib.load(str(path)).affine
    for ijk in ([0, 0, 0], [4, 1, 2], [1, 3, 0]):
        ijk = [min(v, s - 1) for v, s in zip(ijk, stored.shape)]
        index = [ijk[i] for i in order][::-1]  # layer (z, y, x) of stored voxel (i, j, k)
        assert data[tuple(index)] == stored[tuple(ijk)]
        ras = affine @ [*ijk, 1]
        np.testing.assert_allclose(_world(kwargs, index), ras[2::-1], atol=1e-4)
    # the mask written back is in the file's own voxel order, with its affine
    labels = (data % 3).astype(np.uint8)
    out, = write_labels_nifti(str(tmp_path / "mask"), labels, {"metadata": kwargs["metadata"]})
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), stored % 3)
    np.testing.assert_allclose(nib.load(out).affine, affine, atol=1e-5)


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz"])
def test_nibabel_test_files_open_with_their_scanner_placement(name):
    from nibabel.testing import data_path

    path = f"{data_path}/{name}"
    img = nib.load(path)
    (data, kwargs, kind), = read_paths(path)
    extra = img.ndim - 3  # example4d: (X, Y, Z, T) -> layer (T, Z, Y, X)
    assert kind == "image" and data.shape == (*img.shape[3:], *img.shape[2::-1])
    for ijk in ([0, 0, 0], [10, 20, 5], [img.shape[0] - 1, 3, img.shape[2] - 1]):
        ras = img.affine @ [*ijk, 1]
        world = _world(kwargs, [0] * extra + ijk[::-1])
        np.testing.assert_allclose(world[extra:], ras[2::-1], atol=1e-3)


def test_nifti_writer_without_metadata_uses_the_layer_rotation(tmp_path):
    source = tmp_path / "scan.nii.gz"
    _write_nifti(source, np.zeros((5, 6, 7), np.float32), _oblique_affine())
    (_, kwargs, _), = read_paths(str(source))
    labels = np.zeros((7, 6, 5), np.uint8)
    out, = write_labels_nifti(str(tmp_path / "mask"), labels,
                              {k: kwargs[k] for k in ("scale", "translate", "affine")})
    np.testing.assert_allclose(nib.load(out).affine, _oblique_affine(), atol=1e-4)


def test_tiff_labels_round_trip_keeps_scale_origin_and_rotation(tmp_path):
    source = tmp_path / "scan.nii.gz"
    _write_nifti(source, np.zeros((5, 6, 7), np.float32), _oblique_affine())
    (_, kwargs, _), = read_paths(str(source))
    labels = np.zeros((7, 6, 5), np.uint8)
    labels[2, 1:3, 4] = 1
    attributes = {k: kwargs[k] for k in ("scale", "translate", "affine", "units")}
    out, = write_labels_tiff(str(tmp_path / "seg.tif"), labels, attributes)
    (back, again, kind), = read_paths(out)
    assert kind == "labels"
    np.testing.assert_array_equal(back, labels)
    np.testing.assert_allclose(again["scale"], kwargs["scale"], rtol=1e-6)
    np.testing.assert_allclose(again["translate"], [44.0, -12.5, 30.0], rtol=1e-6)
    np.testing.assert_allclose(again["affine"], kwargs["affine"], atol=1e-9)
    np.testing.assert_allclose(_world(again, [2, 1, 4]), _world(kwargs, [2, 1, 4]), atol=1e-4)


def test_2d_tiff_round_trip_keeps_translate(tmp_path):
    out, = write_labels_tiff(str(tmp_path / "seg.tif"), np.ones((8, 9), np.uint8),
                             {"scale": [0.5, 0.25], "translate": [-3.0, 40.0]})
    (_, kwargs, _), = read_paths(out)
    np.testing.assert_allclose(kwargs["translate"], [-3.0, 40.0])
    np.testing.assert_allclose(kwargs["scale"], [0.5, 0.25])


def _failing_write(*args, **kwargs):
    """A writer (``nibabel.save(image, path)``, ``tifffile.imwrite(path, …)``) that stores
    half a file, then fails as a full disk does."""
    import errno
    from pathlib import Path

    path = next(a for a in args if isinstance(a, str))
    Path(path).write_bytes(b"half a mask")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize(("writer", "name", "library"), [
    (write_labels_nifti, "mask.nii.gz", "nibabel.save"),
    (write_labels_tiff, "mask.tif", "tifffile.imwrite"),
])
def test_a_save_that_fails_keeps_the_earlier_file(tmp_path, monkeypatch, writer, name,
                                                  library):
    earlier = tmp_path / name
    earlier.write_bytes(b"the earlier mask")
    monkeypatch.setattr(library, _failing_write)
    with pytest.raises(OSError, match=f"no space left.*the previous {name} is unchanged. "
                                      "Free some space or choose another folder") as err:
        writer(str(earlier), np.ones((4, 5), np.uint8), {})
    assert "--out" not in str(err.value)  # no command-line advice in the plugin
    assert earlier.read_bytes() == b"the earlier mask"
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left


@pytest.mark.parametrize("link", [False, True])
@pytest.mark.parametrize("writer", [write_labels_nifti, write_labels_tiff])
def test_writers_refuse_the_file_the_layer_was_read_from(tmp_path, writer, link):
    """Also through napari's File › Save (the npe2 writers), not only the widget's Save…."""
    suffix = ".nii.gz" if writer is write_labels_nifti else ".tif"
    source = tmp_path / f"scan{suffix}"
    source.write_bytes(b"the user's scan")
    target = source
    if link:  # another name for the same file
        target = tmp_path / f"alias{suffix}"
        target.symlink_to(source)
    with pytest.raises(ValueError, match="is the file this layer's image was read from"):
        writer(str(target), np.ones((4, 5), np.uint8),
               {"metadata": {META: {"source": str(source)}}})
    assert source.read_bytes() == b"the user's scan"
