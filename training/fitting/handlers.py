"""What the training loop calls at the end of an epoch: checkpoint saving (best and the
resumable last pair, which also writes ``history.csv``), and messages about the files a
stopped run keeps."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


class CheckpointSaver:
    """Writes best.safetensors and the last pair; only rank 0 writes, every rank takes part
    in gathering the RNG states (each rank's streams are saved for an exact resume)."""

    def __init__(self, out, model, metadata, provenance, optimizer, scheduler, scaler, loss_fn,
                 generators, info) -> None:
        self.out, self.model, self.metadata, self.provenance = out, model, metadata, provenance
        self.parts = (optimizer, scheduler, scaler, loss_fn)
        self.generators, self.info = generators, info

    def best(self, epoch: int, summary: dict[str, Any]) -> None:
        from ..checkpoint import save_checkpoint
        from ..train_state import BEST_NAME

        if self.info.is_main:
            save_checkpoint(self.model, self.out / BEST_NAME, **self.metadata,
                            provenance={**self.provenance, "epochs": epoch,
                                        "validation": summary})

    def last(self, run) -> None:
        """Save the ``TrainState`` ``run`` (bookkeeping) with live optimisation states."""
        from ..distributed import all_gather_objects
        from ..train_state import capture_rng, save_last_pair

        rngs = all_gather_objects(capture_rng(self.generators))
        if not self.info.is_main:
            return
        optimizer, scheduler, scaler, loss_fn = self.parts
        state = dataclasses.replace(
            run, model={}, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else None,
            loss=loss_fn.state_dict() or None, rng={"ranks": rngs},
            world_size=self.info.world_size,
        )  # fmt: skip
        # writes the state, last.safetensors and history.csv (each atomic, in that order)
        save_last_pair(self.out, self.model, state, **self.metadata,
                       provenance={**self.provenance, "epochs": run.epoch})


def kept_message(problem: str, out: Path, completed: int) -> str:
    """The message of a run stopped by ``problem`` after ``completed`` epochs."""
    if completed:
        return (f"{problem}. Stopped; the files of epoch {completed} in {out} are kept "
                "(try a lower --lr or --precision fp32, check the data, then --resume)")
    return f"{problem}. Stopped before any epoch completed (try a lower --lr or --precision fp32)"
