"""What ``python -m training.fit`` is made of, cut along MONAI's engine/handler line.

- :mod:`.config` — :class:`FitConfig` (every setting a run depends on) and :class:`FitResult`;
- :mod:`.preparation` — cases, splits, vocabulary and preprocessing; the network, loss and
  optimiser built from a config;
- :mod:`.trainer` — :func:`fit`, the epoch loop (the *engine*);
- :mod:`.handlers` — what the loop calls at epoch ends: checkpoint saving, history, the
  model-selection rule, messages for kept files.

``training.fit`` is the command line over :func:`fit`.
"""

from __future__ import annotations

from .config import FitConfig, FitResult
from .preparation import build_model, prepare_data, seed_everything
from .trainer import fit

__all__ = ["FitConfig", "FitResult", "build_model", "fit", "prepare_data", "seed_everything"]
