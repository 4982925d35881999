"""One training epoch and one fairness validation pass; the loop lives in ``training.fit``."""

from __future__ import annotations

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

    @property
    def samples_per_second(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; training cannot continue from this state."""


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
) -> EpochStats:
    """Run one epoch of optimisation.

    Args:
        loader: yields dicts with ``image (B, C, *S)``, ``label (B, *S)``, ``attr (B,)``.
        autocast: returns a context manager (mixed precision or a no-op).
        use_aux: ask the model for its MoE balancing loss and add it.
        progress: called after each step with ``(samples_done, running means)``.
        should_stop: polled after each step; True ends the epoch early (signal handling).
    """
    model.train()
    loss_fn.train()
    totals = {"loss": 0.0, "seg": 0.0, "aux": 0.0}
    seen = 0
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
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss became {loss.item()} after {seen} samples of this epoch")
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
        if should_stop and should_stop():
            break
    seen = max(seen, 1)
    return EpochStats(totals["loss"] / seen, totals["seg"] / seen, totals["aux"] / seen, seen,
                      time.perf_counter() - start)


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
    for i, (case_id, image, label, value) in enumerate(cases):
        result = segmenter.segment(image, value, channel_axis=0)
        fairness.update(result.labels[None], label[None], [result.attribute_value], ids=[case_id])
        if progress:
            progress(i + 1, len(cases))
    return fairness
