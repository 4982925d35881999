"""Fault tolerance of training.fit: SIGTERM + --resume is exact, damaged files are refused,
a non-finite loss keeps the last good files; mixed-precision and stop-signal plumbing."""

from __future__ import annotations

import csv
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from training import fit as fit_cli
from training.data import make_synthetic_dataset
from training.train_state import file_sha256, load_train_state, verify_last_pair

FAST = ["--attribute", "race", "--classes", "background,rim,cup", "--image-size", "32",
        "--batch-size", "8", "--lr", "3e-3", "--quiet",
        "--model-kwargs", '{"embed_dim": 32, "depth": 2, "num_heads": 2}']
EPOCHS = 2
STEPS_PER_EPOCH = 4  # 28 training cases of 40, batches of 8

# Runs training.fit with a progress callback that prints one line per optimisation step.
_REPORTING_FIT = """
import sys
import training.engine as e
import training.fit as f

class _Steps:
    def update(self, done, means):
        print("STEP", done, flush=True)
    def close(self):
        pass

e.TrainingLog.bar = lambda self, total, desc: _Steps()
f.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def fundus(tmp_path_factory):
    return make_synthetic_dataset("fundus", tmp_path_factory.mktemp("fundus"), n=40, seed=3)


@pytest.fixture(scope="module")
def straight(fundus, tmp_path_factory):
    """An uninterrupted seeded run: the reference every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("straight")
    return fit_cli.main(["--data", str(fundus), "--epochs", str(EPOCHS), "--out", str(out),
                         *FAST])


def _args(fundus, out, *extra) -> list[str]:
    return ["--data", str(fundus), "--epochs", str(EPOCHS), "--out", str(out), *FAST, *extra]


def _assert_same_run(result, reference, out, ref_out) -> None:
    assert [r["epoch"] for r in result.history] == [r["epoch"] for r in reference.history]
    for got, want in zip(result.history, reference.history):
        for key in ("loss", "val_dice", "val_es_dice", "val_iou", "lr"):
            assert got[key] == pytest.approx(want[key], abs=1e-4), (got["epoch"], key)
    assert result.best_metric == pytest.approx(reference.best_metric, abs=1e-4)
    from safetensors.torch import load_file

    a, b = load_file(out / "last.safetensors"), load_file(ref_out / "last.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_sigterm_at_a_random_step_then_resume_matches_uninterrupted(fundus, straight, tmp_path):
    out = tmp_path / "killed"
    kill_at = random.randint(2, (EPOCHS - 1) * STEPS_PER_EPOCH + 1)
    proc = subprocess.Popen([sys.executable, "-c", _REPORTING_FIT, *_args(fundus, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    steps = 0
    for line in proc.stdout:
        steps += line.startswith("STEP")
        if steps == kill_at:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, (kill_at, err[-2000:])
    assert "SIGTERM: training stopped" in err and "--resume" in err, err
    # the signal lands in the step after the reported one, or (at an epoch's last step) in
    # that epoch's validation/saving, which then completes before the run stops
    if (out / "last.state.safetensors").exists():
        done = verify_last_pair(out).epoch
        assert done in ((kill_at - 1) // STEPS_PER_EPOCH, kill_at // STEPS_PER_EPOCH), kill_at
        assert f"epoch {done} is saved" in err
    else:
        assert kill_at <= STEPS_PER_EPOCH and "nothing was saved" in err
    resumed = fit_cli.main(_args(fundus, out, "--resume"))
    _assert_same_run(resumed, straight, out, straight.out)


def test_kill_between_state_and_checkpoint_write_still_resumes_exactly(
        fundus, straight, tmp_path, monkeypatch):
    import training.train_state as ts

    out = tmp_path / "torn"
    real = ts.save_train_state

    def die_at_epoch_2(path, state):
        result = real(path, state)
        if state.epoch == 2:
            raise KeyboardInterrupt  # as if killed right after the state was replaced
        return result

    monkeypatch.setattr(ts, "save_train_state", die_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        fit_cli.main(_args(fundus, out))
    monkeypatch.setattr(ts, "save_train_state", real)
    from training.checkpoint import read_header

    assert read_header(out / "last.safetensors")[0]["provenance"]["epochs"] == 1
    assert verify_last_pair(out).epoch == 2  # newer state + older checkpoint: accepted
    # the state rebuilds epoch 2's last.safetensors bit for bit and the full history
    _assert_same_run(fit_cli.main(_args(fundus, out, "--resume")), straight, out, straight.out)
    assert file_sha256(out / "last.safetensors") == \
        load_train_state(out / "last.state.safetensors").model_file["sha256"]
    assert [int(r["epoch"]) for r in csv.DictReader(open(out / "history.csv"))] == [1, 2]


@pytest.mark.parametrize("damage", ["flip_weight_bytes", "truncate"])
def test_corrupted_last_checkpoint_is_refused_and_fallback_only_on_request(
        fundus, straight, tmp_path, capsys, damage):
    out = tmp_path / "run"
    shutil.copytree(straight.out, out)
    last = out / "last.safetensors"
    raw = bytearray(last.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[-64:-32] = bytes(b ^ 0xFF for b in raw[-64:-32])
    last.write_bytes(bytes(raw))
    state_before = file_sha256(out / "last.state.safetensors")
    with pytest.raises(SystemExit) as err:
        fit_cli.main(_args(fundus, out, "--resume", "--epochs", str(EPOCHS + 1)))
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "last.safetensors" in message and "--resume-fallback best" in message, message
    assert file_sha256(out / "last.state.safetensors") == state_before  # nothing overwritten

    res = fit_cli.main(_args(fundus, out, "--resume", "--resume-fallback", "best", "--epochs",
                             str(EPOCHS + 1)))
    assert [r["epoch"] for r in res.history] == list(range(1, EPOCHS + 2))
    for got, want in zip(res.history[:straight.best_epoch], straight.history):
        assert got["loss"] == want["loss"] and got["val_es_dice"] == want["val_es_dice"]
    assert verify_last_pair(out).epoch == EPOCHS + 1


def test_corrupted_state_is_refused_and_fresh_fallback_starts_over(fundus, straight, tmp_path,
                                                                   capsys):
    out = tmp_path / "run"
    shutil.copytree(straight.out, out)
    state = out / "last.state.safetensors"
    raw = bytearray(state.read_bytes())
    raw[-16:] = b"\xff" * 16
    state.write_bytes(bytes(raw))
    with pytest.raises(SystemExit) as err:
        fit_cli.main(_args(fundus, out, "--resume"))
    assert err.value.code == 2
    assert "checksum" in capsys.readouterr().err
    res = fit_cli.main(_args(fundus, out, "--resume", "--resume-fallback", "fresh",
                             "--epochs", "1"))
    assert [r["epoch"] for r in res.history] == [1]
    assert res.history[0]["loss"] == pytest.approx(straight.history[0]["loss"], abs=1e-12)


def test_resume_refuses_changed_settings_and_starts_new_run_in_empty_folder(
        fundus, straight, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight.out, out)
    with pytest.raises(SystemExit) as err:
        fit_cli.main(_args(fundus, out, "--resume", "--lr", "0.1"))
    assert err.value.code == 2
    assert "lr: 0.003 → 0.1" in capsys.readouterr().err
    fresh = fit_cli.main(_args(fundus, tmp_path / "empty", "--resume", "--epochs", "1"))
    assert fresh.history[0]["loss"] == pytest.approx(straight.history[0]["loss"], abs=1e-12)


def test_non_finite_loss_stops_and_keeps_last_good_files(fundus, tmp_path, monkeypatch, capsys):
    import training.losses as losses

    real = losses.build_loss

    class NaNAfter(torch.nn.Module):
        def __init__(self, inner, calls):
            super().__init__()
            self.inner, self.calls = inner, calls

        def forward(self, logits, label, attr):
            self.calls -= 1
            loss = self.inner(logits, label, attr)
            return loss * float("nan") if self.calls < 0 else loss

    monkeypatch.setattr(losses, "build_loss",
                        lambda *a, **k: NaNAfter(real(*a, **k), STEPS_PER_EPOCH + 1))
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as err:
        fit_cli.main(_args(fundus, out))
    assert err.value.code == 3
    message = capsys.readouterr().err
    assert "non-finite loss" in message and "epoch 2" in message and "nan" in message
    assert "files of epoch 1" in message
    assert verify_last_pair(out).epoch == 1
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [r["epoch"] for r in rows] == ["1"]


# -- precision and stop plumbing -------------------------------------------------------------
def test_precision_choices():
    from training.engine import autocast_for, default_precision, grad_scaler_for

    cpu = torch.device("cpu")
    assert default_precision(cpu) == "fp32"
    with autocast_for("bf16", cpu)():
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast_for("fp32", cpu)():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert grad_scaler_for("fp16", cpu) is not None and grad_scaler_for("bf16", cpu) is None
    with pytest.raises(ValueError, match="--precision"):
        autocast_for("fp8", cpu)


def test_fp16_fit_on_cpu_uses_and_saves_a_grad_scaler(fundus, tmp_path):
    res = fit_cli.main(_args(fundus, tmp_path, "--epochs", "1", "--precision", "fp16"))
    assert torch.isfinite(torch.tensor(res.history[0]["loss"]))
    state = load_train_state(tmp_path / "last.state.safetensors")
    assert state.scaler is not None and state.scaler["scale"] > 0
    assert all(t.dtype == torch.float32 for t in state.model.values() if t.is_floating_point())


def test_stop_on_signal_finishes_the_step():
    from training.engine import StopOnSignal, train_one_epoch

    model = torch.nn.Conv2d(1, 2, 1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = model

        def forward(self, x, attr, return_aux=False):
            return self.conv(x)

    batches = [{"image": torch.rand(2, 1, 4, 4), "label": torch.zeros(2, 4, 4).long(),
                "attr": torch.zeros(2).long()} for _ in range(5)]
    loss = torch.nn.Module()
    loss.forward = lambda logits, label, attr: logits.square().mean()
    previous = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        stats = train_one_epoch(
            Net(), batches, loss, torch.optim.SGD(model.parameters(), lr=0.1),
            torch.device("cpu"), autocast=lambda: torch.autocast("cpu", enabled=False),
            progress=lambda done, means: done == 4 and os.kill(os.getpid(), signal.SIGTERM),
            should_stop=stop.is_set)
    assert stop.signal_name == "SIGTERM" and stats.stopped and stats.samples == 4
    assert signal.getsignal(signal.SIGTERM) == previous
