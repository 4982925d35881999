"""Training state files: exact round trip, RNG restore, corruption refused, atomic writes."""

from __future__ import annotations

import json
import math
import random
import struct

import numpy as np
import pytest
import torch

from training.train_state import (
    StateError,
    TrainState,
    capture_rng,
    config_differences,
    file_sha256,
    load_train_state,
    restore_rng,
    save_train_state,
)


def _trained_parts(steps: int = 3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()
    return model, opt, sched, scaler


def _state(net, opt, sched, scaler, gen=None, **kw) -> TrainState:
    defaults = dict(epoch=3, best_metric=0.5, best_epoch=2, since_best=1,
                    history=[{"epoch": 1, "loss": 0.25, "val_es_dice": float("nan")}],
                    model=net.state_dict(), optimizer=opt.state_dict(),
                    scheduler=sched.state_dict(), scaler=scaler.state_dict(),
                    rng=capture_rng({"loader": gen} if gen else None),
                    config={"seed": 0, "patch_size": [64, 64, 32]},
                    model_file={"name": "last.safetensors", "sha256": "ab", "epoch": 3})
    defaults.update(kw)
    return TrainState(**defaults)


def test_round_trip_restores_optimizer_scheduler_scaler_exactly(tmp_path):
    model, opt, sched, scaler = _trained_parts()
    path = save_train_state(tmp_path / "s.safetensors", _state(model, opt, sched, scaler))
    loaded = load_train_state(path)
    assert (loaded.epoch, loaded.best_epoch, loaded.since_best) == (3, 2, 1)
    assert loaded.best_metric == 0.5 and math.isnan(loaded.history[0]["val_es_dice"])
    assert loaded.config == {"seed": 0, "patch_size": [64, 64, 32]}
    assert loaded.model_file["sha256"] == "ab"

    # a fresh model/optimizer loaded from the file takes the very same next step
    model2, opt2, sched2, scaler2 = _trained_parts(steps=0)
    model2.load_state_dict(loaded.model)
    opt2.load_state_dict(loaded.optimizer)
    sched2.load_state_dict(loaded.scheduler)
    scaler2.load_state_dict(loaded.scaler)
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert scaler2.get_scale() == 1024.0
    assert set(opt2.state_dict()["state"]) == {0, 1, 2, 3}  # int keys survive JSON
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_file_is_safetensors_with_json_metadata_not_pickle(tmp_path):
    model, opt, sched, scaler = _trained_parts()
    path = save_train_state(tmp_path / "s.safetensors", _state(model, opt, sched, scaler))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    body = json.loads(header["__metadata__"]["napari_dmoe_state"])
    assert body["epoch"] == 3 and body["format_version"] == 1
    assert "optimizer/state/0/exp_avg" in header and "model/0.weight" in header
    assert not raw.startswith(b"PK") and raw[:1] != b"\x80"


def test_rng_capture_and_restore_repeats_every_stream():
    gen = torch.Generator().manual_seed(5)
    state = capture_rng({"loader": gen})
    first = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    restore_rng(state, {"loader": gen})
    again = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    assert first[0] == again[0] and first[1] == again[1]
    assert torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])


def test_rng_survives_the_file(tmp_path):
    model, opt, sched, scaler = _trained_parts()
    gen = torch.Generator().manual_seed(9)
    path = save_train_state(tmp_path / "s.safetensors", _state(model, opt, sched, scaler, gen))
    expected = (random.random(), np.random.randn(3), torch.randn(3),
                torch.randperm(10, generator=gen))
    np.random.seed(1), random.seed(1), torch.manual_seed(1), gen.manual_seed(1)
    restore_rng(load_train_state(path).rng, {"loader": gen})
    got = (random.random(), np.random.randn(3), torch.randn(3), torch.randperm(10, generator=gen))
    assert got[0] == expected[0] and np.array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])


@pytest.mark.parametrize("damage", ["flip_tensor_byte", "truncate", "pickle", "garbage_header"])
def test_damaged_state_is_refused_with_advice(tmp_path, damage):
    model, opt, sched, scaler = _trained_parts()
    path = save_train_state(tmp_path / "s.safetensors", _state(model, opt, sched, scaler))
    raw = bytearray(path.read_bytes())
    if damage == "flip_tensor_byte":
        raw[-10] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) - 100]
    elif damage == "pickle":
        raw = bytearray(b"\x80\x02" + bytes(200))
    else:
        raw[10:40] = b"#" * 30
    path.write_bytes(bytes(raw))
    with pytest.raises(StateError, match="s.safetensors"):
        load_train_state(path)


def test_missing_state_and_foreign_safetensors_are_refused(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(StateError, match="no training state"):
        load_train_state(tmp_path / "none.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(StateError, match="not a napari-dmoe training state"):
        load_train_state(tmp_path / "other.safetensors")


def test_failed_write_leaves_previous_state_intact(tmp_path, monkeypatch):
    import safetensors.torch

    model, opt, sched, scaler = _trained_parts()
    path = save_train_state(tmp_path / "s.safetensors", _state(model, opt, sched, scaler))
    before = file_sha256(path)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_train_state(path, _state(model, opt, sched, scaler, epoch=4))
    assert file_sha256(path) == before and load_train_state(path).epoch == 3
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temp file left


def test_shared_storage_tensors_are_saved(tmp_path):
    model, opt, sched, scaler = _trained_parts()
    w = torch.randn(4, 4)
    sd = {"a": w, "b": w, "c": w[1]}  # tied and partial views
    path = save_train_state(tmp_path / "s.safetensors",
                            _state(model, opt, sched, scaler, model=sd))
    loaded = load_train_state(path).model
    assert torch.equal(loaded["a"], w) and torch.equal(loaded["b"], w)
    assert torch.equal(loaded["c"], w[1])


def test_config_differences_lists_changed_keys():
    saved = {"lr": 0.001, "patch_size": [1, 2, 3], "epochs": 5}
    assert config_differences(saved, {"lr": 0.001, "patch_size": (1, 2, 3), "epochs": 9},
                              ignore={"epochs"}) == []
    diff = config_differences(saved, {"lr": 0.01, "patch_size": [1, 2, 3], "epochs": 5})
    assert diff == ["lr: 0.001 → 0.01"]


def test_resume_point_decisions(tmp_path):
    from training.checkpoint import save_checkpoint
    from training.networks import create_model
    from training.train_state import find_resume_point, save_last_pair, verify_last_pair

    assert find_resume_point(tmp_path).kind == "new"
    net = create_model("resunet", preset="tiny", moe="none")
    # a checkpoint of epoch 1 without state: an older version killed before its first
    # state; the run starts again (nothing was lost but that epoch)
    save_checkpoint(net, tmp_path / "last.safetensors", provenance={"epochs": 1})
    point = find_resume_point(tmp_path)
    assert point.kind == "new" and "epoch 1" in point.message
    save_checkpoint(net, tmp_path / "last.safetensors", provenance={"epochs": 2})
    with pytest.raises(StateError, match="no last.state.safetensors.*--resume-fallback best"):
        find_resume_point(tmp_path)
    assert find_resume_point(tmp_path, "fresh").kind == "fresh"
    with pytest.raises(StateError, match="cannot fall back"):
        find_resume_point(tmp_path, "best")
    with pytest.raises(ValueError, match="--resume-fallback"):
        find_resume_point(tmp_path, "newest")

    opt = torch.optim.AdamW(net.parameters())
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.5)
    state = TrainState(epoch=2, best_metric=0.1, best_epoch=1, since_best=1, history=[],
                       model={}, optimizer=opt.state_dict(), scheduler=sched.state_dict())
    save_last_pair(tmp_path, net, state, provenance={"epochs": 2})
    point = find_resume_point(tmp_path)
    assert point.kind == "state" and point.state.epoch == 2
    assert point.state.model_file["sha256"] == file_sha256(tmp_path / "last.safetensors")
    assert set(point.state.model) == set(net.state_dict())
    # a checkpoint from another epoch that does not match the recorded hash is refused
    save_checkpoint(net, tmp_path / "last.safetensors", provenance={"epochs": 7})
    with pytest.raises(StateError, match="does not match"):
        verify_last_pair(tmp_path)


def test_load_optimisation_replays_schedule_without_scheduler_state():
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.5)
    TrainState(epoch=3, best_metric=0.0, best_epoch=3, since_best=0, history=[],
               model={}).load_optimisation(opt, sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)
