"""training.routing: dataset-level routing statistics, JSON schema and figure; an earlier
report is replaced only with --overwrite."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.training.conftest import write_files
from training import routing as routing_cli
from training.routing import js_divergence


@pytest.fixture(scope="module")
def fundus(tmp_path_factory):
    from training.data import make_synthetic_dataset

    return make_synthetic_dataset("fundus", tmp_path_factory.mktemp("fundus"), n=9, seed=5)


def _checkpoint(path, moe: str, **metadata):
    import torch

    from training.checkpoint import save_checkpoint
    from training.data import Preprocessing
    from training.networks import create_model

    torch.manual_seed(1)
    model = create_model("transunet", preset="tiny", in_channels=1, out_channels=3, moe=moe,
                         num_attributes=3, img_size=32, depth=2)
    with torch.no_grad():  # routers start at zero (all ties): give each one its own weights
        for name, param in model.named_parameters():
            if name.endswith("w_gate"):
                param.normal_(0.0, 1.0)
    race = {"name": "race", "vocabulary": ["Asian", "Black", "White"], "unknown_router": True}
    save_checkpoint(model, path, class_names=["background", "rim", "cup"], attribute=race,
                    preprocessing=Preprocessing(spatial_dims=2, image_size=(32, 32),
                                                in_channels=1).to_dict(), **metadata)
    return path


@pytest.fixture(scope="module", params=["dmoe", "moe"])
def report(request, fundus, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    ckpt = _checkpoint(root / "model.safetensors", request.param)
    out = root / "out"
    result = routing_cli.main(["--checkpoint", str(ckpt), "--data", str(fundus),
                               "--split", "all", "--out", str(out)])
    return request.param, out, result.stats


def test_json_schema_sums_and_symmetry(report):
    _, out, stats = report
    assert (out / "routing.png").stat().st_size > 1000
    on_disk = json.loads((out / "routing.json").read_text())
    assert on_disk == json.loads(json.dumps(stats))
    assert set(on_disk) == {"layers"} and on_disk["layers"]
    for layer in on_disk["layers"].values():
        assert set(layer) == {"groups", "js_divergence"}
        groups = layer["groups"]
        assert len(groups) >= 2
        for name, g in groups.items():
            assert set(g) == {"n_tokens", "top1_usage", "gate_mass", "entropy", "unused",
                              "switch_fraction"}
            assert g["n_tokens"] > 0
            assert sum(g["top1_usage"]) == pytest.approx(1.0)
            assert sum(g["gate_mass"]) == pytest.approx(1.0)
            experts = len(g["top1_usage"])
            assert 0 <= g["entropy"] <= np.log2(experts) + 1e-9
            assert g["unused"] == [e + 1 for e, u in enumerate(g["top1_usage"]) if u == 0]
            assert name not in g["switch_fraction"]
            assert set(g["switch_fraction"]) == {"Asian", "Black", "White", "unknown"} - {name}
            assert all(0 <= x <= 1 for x in g["switch_fraction"].values())
        js = layer["js_divergence"]
        assert len(js) == len(groups) * (len(groups) - 1)
        for key, value in js.items():
            a, b = key.split("|")
            assert js[f"{b}|{a}"] == pytest.approx(value)
            assert 0 <= value <= 1


def test_switch_fraction_is_zero_only_when_the_attribute_cannot_matter(report):
    moe, _, stats = report
    fractions = [x for layer in stats["layers"].values() for g in layer["groups"].values()
                 for x in g["switch_fraction"].values()]
    if moe == "moe":  # one shared router: swapping the attribute changes nothing
        assert max(fractions) == 0.0
    else:  # one router per value: the experts switch somewhere
        assert max(fractions) > 0.0


def test_js_divergence_bounds():
    p = np.array([1.0, 0.0])
    assert js_divergence(p, p) == 0.0
    assert js_divergence(p, np.array([0.0, 1.0])) == pytest.approx(1.0)
    q = np.array([0.3, 0.7])
    assert js_divergence(p, q) == pytest.approx(js_divergence(q, p))


def test_the_figure_leaves_matplotlibs_global_backend_alone(tmp_path, monkeypatch):
    """Inside napari other plugins plot through pyplot on a Qt backend: drawing
    ``routing.png`` must not switch matplotlib's global backend (``matplotlib.use``)."""
    import matplotlib

    calls = []
    monkeypatch.setattr(matplotlib, "use", lambda *args, **kwargs: calls.append(args))
    backend = matplotlib.get_backend()
    group = {"n_tokens": 4, "top1_usage": [0.75, 0.25]}
    stats = {"layers": {"block0": {"groups": {"Asian": group, "Black": group}}}}
    path = routing_cli.plot_routing(stats, tmp_path / "routing.png")
    assert calls == [] and matplotlib.get_backend() == backend
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_an_earlier_report_is_replaced_only_with_overwrite(fundus, tmp_path,
                                                           refused_before_loading):
    ckpt = _checkpoint(tmp_path / "model.safetensors", "dmoe")
    out = tmp_path / "out"
    out.mkdir()
    earlier = write_files(out, {"routing.json": b'{"layers": {}}',
                                "routing.png": b"earlier figure", "notes.txt": b"mine"})
    argv = ["--checkpoint", str(ckpt), "--data", str(fundus), "--split", "all",
            "--out", str(out)]
    err = refused_before_loading(routing_cli.main, argv)
    assert (f"{out} already holds 2 file(s) from an earlier run that this run would "
            "replace: routing.json, routing.png. Nothing was written; pass --overwrite") in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier
    routing_cli.main([*argv, "--overwrite"])
    assert json.loads((out / "routing.json").read_text())["layers"]
    assert (out / "routing.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "notes.txt").read_bytes() == b"mine"


def test_a_run_removes_the_temporary_files_of_its_own_outputs_only(fundus, tmp_path,
                                                                   refused_before_loading,
                                                                   capsys):
    """Temporary files a killed report left (``.routing.json.XXXXXXXX.tmp``): kept by a
    refused run, deleted (and named) by the next run that writes; nothing else touched."""
    ckpt = _checkpoint(tmp_path / "model.safetensors", "dmoe")
    out = tmp_path / "out"
    out.mkdir()
    stale = write_files(out, {".routing.json.abcdef12.tmp": b'{"lay',
                              ".routing.png.0123abcd.tmp": b"\x89PNG torn"})
    others = write_files(out, {".notes.txt.abcdef12.tmp": b"another program's",
                               ".routing.png.tmp": b"not a temporary file of ours",
                               "notes.txt": b"mine"})
    earlier = write_files(out, {"routing.json": b'{"layers": {}}'})
    argv = ["--checkpoint", str(ckpt), "--data", str(fundus), "--split", "all",
            "--out", str(out)]
    refused_before_loading(routing_cli.main, argv)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {**stale, **others, **earlier}
    routing_cli.main([*argv, "--overwrite"])
    assert ("removed 2 temporary file(s) left by killed writes: .routing.json.abcdef12.tmp, "
            ".routing.png.0123abcd.tmp\n") in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted([*others, *routing_cli.OUTPUT_FILES])
    assert {n: (out / n).read_bytes() for n in others} == others


@pytest.mark.parametrize("name", routing_cli.OUTPUT_FILES)
def test_a_report_cut_short_while_writing_keeps_that_earlier_file(fundus, tmp_path, name,
                                                                  disk_fills, capsys):
    """--overwrite, the disk filling up halfway through ``name``: exit 4 naming it; ``name``
    (and the figure, written after the JSON) is the earlier report's byte for byte; no
    temporary file."""
    ckpt = _checkpoint(tmp_path / "model.safetensors", "dmoe")
    out = tmp_path / "out"
    out.mkdir()
    earlier = {"routing.json": b'{"layers": {}}', "routing.png": b"earlier figure"}
    for n, data in earlier.items():
        (out / n).write_bytes(data)
    disk_fills(out / name)
    with pytest.raises(SystemExit) as info:
        routing_cli.main(["--checkpoint", str(ckpt), "--data", str(fundus), "--split", "all",
                          "--out", str(out), "--overwrite"])
    assert info.value.code == 4
    assert (f"error: cannot write {out / name}: no space left on the device" in
            capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == ["routing.json", "routing.png"]
    assert (out / "routing.png").read_bytes() == b"earlier figure"
    if name == "routing.json":
        assert (out / "routing.json").read_bytes() == earlier["routing.json"]
    else:  # the JSON was written first
        assert json.loads((out / "routing.json").read_text())["layers"]


def test_overwrite_with_a_model_without_moe_removes_the_earlier_figure(fundus, tmp_path,
                                                                       capsys):
    """routing.json says there is no routing; the earlier report's routing.png (another
    model's routing) must not stay beside it. Other files are kept."""
    ckpt = _checkpoint(tmp_path / "plain.safetensors", "none")
    out = tmp_path / "out"
    out.mkdir()
    (out / "routing.json").write_text('{"layers": {"block0": {}}}')
    (out / "routing.png").write_bytes(b"\x89PNG an earlier model's figure")
    (out / "notes.txt").write_bytes(b"mine")
    report = routing_cli.main(["--checkpoint", str(ckpt), "--data", str(fundus),
                               "--split", "all", "--out", str(out), "--overwrite"])
    assert json.loads((out / "routing.json").read_text()) == {"layers": {}}
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "routing.json"]
    assert report.stats == {"layers": {}} and report.removed == [out / "routing.png"]
    printed = capsys.readouterr().out
    assert "removed the earlier routing.png" in printed
    assert "the model has no dMoE/MoE layer: nothing to report" in printed
    assert printed.splitlines()[-1] == f"wrote {out}/routing.json"  # no routing.png claimed


def _trained_on(fundus, tmp_path):
    """A checkpoint recording ``fundus``'s manifest hash, and a copy of the manifest with
    two cases fewer: ``(checkpoint, number of cases, changed manifest)``."""
    from training.data import assign_splits, combine_attributes, load_cases
    from training.fitting.preparation import manifest_hash

    cases = assign_splits(combine_attributes(load_cases(fundus), "race"), 0.15, 0.15, seed=0)
    ckpt = _checkpoint(tmp_path / "model.safetensors", "dmoe", provenance={
        "data_manifest_hash": manifest_hash(cases), "data_cases": len(cases),
        "config": {"seed": 0, "val_fraction": 0.15, "test_fraction": 0.15}})
    lines = fundus.read_text().splitlines()
    changed = fundus.with_name("changed.csv")  # two training cases fewer
    changed.write_text("\n".join(lines[:-2]) + "\n")
    return ckpt, len(cases), changed


def test_changed_data_are_refused_unless_allow_changed_data(fundus, tmp_path, capsys):
    """As training.evaluate: a checkpoint records its data's manifest hash; data whose hash
    differs are refused for a split other than all (exit 2, nothing written) unless
    --allow-changed-data; the training data themselves are accepted."""
    ckpt, n, changed = _trained_on(fundus, tmp_path)

    def run(data, out, *extra):
        return routing_cli.main(["--checkpoint", str(ckpt), "--data", str(data),
                                 "--split", "test", "--out", str(tmp_path / out), *extra])

    with pytest.raises(SystemExit) as info:
        run(changed, "refused")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "these data are not the data" in err and "--allow-changed-data" in err
    assert f"{n - 2} cases" in err and f"{n} cases" in err
    assert not (tmp_path / "refused").exists()
    assert run(changed, "allowed", "--allow-changed-data").stats["layers"]
    assert run(fundus, "same").stats["layers"]


def test_data_change_says_why_without_running_anything(fundus, tmp_path, monkeypatch):
    """training.evaluate.data_change, for a caller that asks before allow_changed_data:
    the refusal's sentence for changed data, None for the training data and for a
    checkpoint that recorded no data hash; no image is read."""
    from training.checkpoint import read_header
    from training.evaluate import data_change

    ckpt, n, changed = _trained_on(fundus, tmp_path)
    metadata = read_header(ckpt)[0]
    monkeypatch.setattr("training.data.read_image", lambda *a, **k: 1 / 0)
    assert data_change(metadata, ckpt, fundus) is None
    text = data_change(metadata, ckpt, changed)
    assert text.startswith(f"{changed}: these data are not the data {ckpt} was trained on "
                           "(manifest hash ")
    assert f", {n - 2} cases; the checkpoint's " in text and f", {n} cases)" in text
    assert text.endswith("Cases, files, splits or attributes changed")
    plain = _checkpoint(tmp_path / "plain.safetensors", "dmoe")  # no hash recorded
    assert data_change(read_header(plain)[0], plain, changed) is None


@pytest.mark.parametrize(("moe", "expected"), [("none", False), ("moe", True), ("dmoe", True)])
def test_has_routing_tells_a_model_with_moe_layers(tmp_path, moe, expected):
    from training.inference import Segmenter

    seg = Segmenter.from_checkpoint(_checkpoint(tmp_path / "m.safetensors", moe), "cpu")
    assert seg.has_routing is expected
