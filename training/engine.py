"""One training epoch and one fairness validation pass; the loop lives in ``training.fit``.

Also here: the mixed-precision choices (:func:`autocast_for`, :func:`grad_scaler_for`) and
:class:`StopOnSignal`, which turns SIGTERM/SIGINT into a flag that ``train_one_epoch``
polls after each step, so an interrupted run stops between two optimiser steps.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .inference import Segmenter
from .metrics import RunningFairness


@dataclass
class EpochStats:
    """Mean losses over an epoch and its throughput."""

    loss: float
    seg_loss: float
    aux_loss: float
    samples: int
    seconds: float
    stopped: bool = False

    @property
    def samples_per_second(self) -> float:
        return self.samples / max(self.seconds, 1e-9)

    def over_ranks(self) -> EpochStats:
        """Sample-weighted mean losses and total samples over all ranks, slowest rank's time
        (``self`` unchanged in one process)."""
        from .distributed import is_distributed, max_float, sum_floats

        if not is_distributed():
            return self
        n = self.samples
        loss, seg, aux, total = sum_floats(self.loss * n, self.seg_loss * n, self.aux_loss * n, n)
        total = max(total, 1.0)
        return EpochStats(loss / total, seg / total, aux / total, int(total),
                          max_float(self.seconds), self.stopped)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; training cannot continue from this state."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT stopped training; the last completed epoch is on disk for ``--resume``.

    Attributes:
        signal_name: ``"SIGTERM"``, ``"SIGINT"`` or ``"stop request"``.
        completed_epochs: epochs saved (0: nothing saved, a rerun starts from scratch).
        exit_code: ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT), else 1.
    """

    def __init__(self, signal_name: str, epoch: int | None, completed_epochs: int,
                 out: Any) -> None:
        self.signal_name = signal_name
        self.completed_epochs = completed_epochs
        sig = getattr(signal.Signals, signal_name, None) if signal_name.startswith("SIG") else None
        self.exit_code = 128 + int(sig) if sig is not None else 1
        where = f"during epoch {epoch}" if epoch is not None else f"after epoch {completed_epochs}"
        if completed_epochs:
            saved = (f"epoch {completed_epochs} is saved in {out} (last.safetensors + "
                     "last.state.safetensors); the same command with --resume continues "
                     f"from there" + (f", redoing epoch {epoch}" if epoch is not None else ""))
        else:
            saved = "no epoch was completed, so nothing was saved; rerun to start again"
        super().__init__(f"{signal_name}: training stopped {where}; {saved}.")


class TrainingLog:
    """One-line summaries on stdout; a tqdm bar per epoch on stderr when it is a terminal
    (``quiet``, e.g. on every torchrun rank but 0, silences both)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)

    def bar(self, total: int, desc: str) -> _Bar | None:
        if self.quiet or not sys.stderr.isatty():
            return None
        return _Bar(total, desc)


class _Bar:
    """tqdm bar fed with ``(samples_done, running means)``."""

    def __init__(self, total: int, desc: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True)

    def update(self, done: int, means: dict[str, float]) -> None:
        self._bar.update(done - self._bar.n)
        self._bar.set_postfix(loss=f"{means['loss']:.4f}")

    def close(self) -> None:
        self._bar.close()


PRECISIONS = ("fp32", "bf16", "fp16")


def default_precision(device: torch.device) -> str:
    """``"bf16"`` on a CUDA device that supports it, else ``"fp32"``."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast_for(precision: str, device: torch.device) -> Callable[[], Any]:
    """A factory of autocast contexts for ``precision`` (``fp32``: no autocast at all)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def grad_scaler_for(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (small gradients would underflow without one), else None."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


class StopOnSignal:
    """Context manager: SIGTERM/SIGINT set :attr:`signal_name` instead of killing the process.

    Inside the block, the first SIGTERM or SIGINT is recorded and the training loop (which
    polls :meth:`is_set` after each step) stops after the current step; a second SIGINT
    raises KeyboardInterrupt at once. Handlers can only be installed from the main thread;
    elsewhere (e.g. a napari worker thread) this does nothing and :meth:`is_set` stays False
    unless :meth:`request` is called.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def request(self, name: str = "stop request") -> None:
        self.signal_name = self.signal_name or name

    def is_set(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.request(signal.Signals(signum).name)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def train_one_epoch(
    model: nn.Module,
    loader: Any,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    autocast: Callable[[], Any],
    scaler: torch.amp.GradScaler | None = None,
    use_aux: bool = False,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    sync: bool = False,
) -> EpochStats:
    """Run one epoch of optimisation.

    Args:
        loader: yields dicts with ``image (B, C, *S)``, ``label (B, *S)``, ``attr (B,)``.
        autocast: returns a context manager (mixed precision or a no-op).
        use_aux: ask the model for its MoE balancing loss and add it.
        progress: called after each step with ``(samples_done, running means)``.
        should_stop: polled after each step; True ends the epoch early (signal handling)
            and the returned stats have ``stopped=True``.
        sync: multi-process training: each step, the ranks agree (one tiny all-reduce)
            on whether any rank saw a non-finite loss (all raise) or wants to stop (all
            stop after this step), so that no rank is left waiting in a collective.
    """
    model.train()
    loss_fn.train()
    totals = {"loss": 0.0, "seg": 0.0, "aux": 0.0}
    seen, stopped = 0, False
    start = time.perf_counter()
    for batch in loader:
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        attr = batch["attr"].to(device, non_blocking=True)
        with autocast():
            out = model(image, attr, return_aux=use_aux)
            logits, aux = (out.logits, out.aux_loss) if use_aux else (out, None)
            seg = loss_fn(logits.float(), label, attr)
            loss = seg + aux if aux is not None else seg
        bad, stop_after = not torch.isfinite(loss), False
        if sync:
            from .distributed import any_flag

            bad, stop_after = any_flag(bad, bool(should_stop and should_stop()))
        if bad:
            raise NonFiniteLoss(f"loss became {loss.item()} after {seen} samples of this epoch"
                                + (" (on at least one rank)" if sync else ""))
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        n = image.shape[0]
        seen += n
        totals["loss"] += loss.item() * n
        totals["seg"] += seg.item() * n
        totals["aux"] += (aux.item() if aux is not None else 0.0) * n
        if progress:
            progress(seen, {k: v / seen for k, v in totals.items()})
        if stop_after or (not sync and should_stop and should_stop()):
            stopped = True
            break
    seen = max(seen, 1)
    return EpochStats(totals["loss"] / seen, totals["seg"] / seen, totals["aux"] / seen, seen,
                      time.perf_counter() - start, stopped)


def evaluate_cases(
    segmenter: Segmenter,
    cases: Sequence[tuple[str, np.ndarray, np.ndarray, str]],
    attribute: str | None,
    progress: Callable[[int, int], None] | None = None,
) -> RunningFairness:
    """Segment ``(id, image (C, *S), label (*S), attribute value)`` cases; collect scores.

    Predictions are compared with the masks on the images' own grids. Values outside the
    model's vocabulary go through the unknown path and are reported as ``"unknown"``.
    """
    fairness = RunningFairness(segmenter.class_names, attribute or "attribute")
    for i, (case_id, image, label, value, *affine) in enumerate(cases):
        # optional 5th item: the 3D volume's affine (mask mapped back onto its grid)
        result = segmenter.segment(image, value, channel_axis=0,
                                   affine=affine[0] if affine else None)
        fairness.update(result.labels[None], label[None], [result.attribute_value], ids=[case_id])
        if progress:
            progress(i + 1, len(cases))
    return fairness


def evaluate_sharded(
    segmenter: Segmenter,
    cases: Sequence[tuple[str, np.ndarray, np.ndarray, str]],
    attribute: str | None,
    total: int,
) -> RunningFairness:
    """:func:`evaluate_cases` on this rank's share of the cases, then gather every rank's
    records in the original case order, so the summary equals a one-process evaluation.

    Args:
        cases: ``training.distributed.shard(all_cases)`` for this rank.
        total: number of cases over all ranks.
    """
    from .distributed import gather_in_order, is_distributed

    fairness = evaluate_cases(segmenter, cases, attribute)
    if is_distributed():
        fairness.records = gather_in_order(fairness.records, total)
    return fairness
