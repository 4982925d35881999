"""Multi-process training with PyTorch's own engine (``torchrun`` + DistributedDataParallel).

``torchrun --nproc_per_node=N -m training.fit ...`` starts ``N`` copies of the script with
the environment variables ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` set. :func:`setup_distributed` reads them and joins the process group
(``gloo`` on CPU, ``nccl`` on CUDA); without them it returns a single-process
:class:`DistInfo` and touches nothing, so plain ``python -m training.fit`` is unchanged.

Helpers here are no-ops in a single process: :func:`all_gather_objects` returns
``[obj]``, :func:`any_flag` returns its input. Validation is sharded with
:func:`shard` (case ``i`` goes to rank ``i % world_size``) and put back in the original
case order by :func:`gather_in_order`, so metrics computed on the gathered records are
the ones a single process computes.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
DEFAULT_TIMEOUT_MINUTES = 30


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 writes files and logs).
        world_size: number of processes in the job.
        local_rank: rank on this node (selects the CUDA device).
        backend: ``"gloo"``, ``"nccl"`` or ``None`` when not distributed.
        device: the device this process trains on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun(env: dict[str, str] | None = None) -> bool:
    """True when ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` are all set (torchrun does)."""
    env = os.environ if env is None else env
    return all(k in env for k in _ENV)


def _env_int(env: dict[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer; "
                         "launch with torchrun or unset it") from None


def setup_distributed(device: torch.device, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
                      env: dict[str, str] | None = None) -> DistInfo:
    """Join the torchrun process group if launched by torchrun, else return a 1-process info.

    Args:
        device: the device asked for (already resolved); with CUDA each process takes
            ``cuda:LOCAL_RANK`` and the backend is ``nccl``, otherwise ``gloo``.
        timeout_minutes: collective timeout (a rank that dies makes the others fail after it).
        env: environment to read (default ``os.environ``).

    Raises:
        ValueError: inconsistent torchrun variables, or more local ranks than CUDA devices.
    """
    env = os.environ if env is None else env
    if not launched_by_torchrun(env):
        return DistInfo(device=device)
    rank, world, local = (_env_int(env, k) for k in _ENV)
    if not (0 <= rank < world and 0 <= local <= rank):
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, "
                         f"LOCAL_RANK={local}")
    if world == 1:
        return DistInfo(device=device)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA "
                             "device(s) here; lower --nproc_per_node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=_dt.timedelta(minutes=timeout_minutes))
    return DistInfo(rank, world, local, backend, device)


def teardown_distributed() -> None:
    """Leave the process group (safe to call when none exists)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable Python object), in rank order; ``[obj]`` in one process.

    Objects travel between the job's own processes only (never read from disk).
    """
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank; ``obj`` itself in one process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _flag_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_flag(*flags: bool) -> tuple[bool, ...]:
    """Element-wise OR of boolean flags over all ranks (one small all-reduce).

    Used once per training step so that every rank stops (signal) or raises (non-finite
    loss) at the same step; a rank acting alone would leave the others waiting forever in
    the next gradient all-reduce.
    """
    if not is_distributed():
        return tuple(bool(f) for f in flags)
    t = torch.tensor([float(bool(f)) for f in flags], device=_flag_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def sum_floats(*values: float) -> tuple[float, ...]:
    """Sum of float values over all ranks, in float64 (identity in one process)."""
    if not is_distributed():
        return tuple(float(v) for v in values)
    t = torch.tensor(values, dtype=torch.float64, device=_flag_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return tuple(float(v) for v in t.tolist())


def max_float(value: float) -> float:
    """Maximum of ``value`` over all ranks (identity in one process)."""
    if not is_distributed():
        return float(value)
    t = torch.tensor([value], dtype=torch.float64, device=_flag_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def shard(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This rank's share of ``items``: indices ``rank, rank + W, rank + 2W, ...``."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size} processes")
    return list(items[rank::world_size])


def gather_in_order(local: Sequence[T], total: int) -> list[T]:
    """Undo :func:`shard`: gather every rank's results and restore the original order.

    Args:
        local: this rank's results, one per item of ``shard(items)``, in that order.
        total: ``len(items)``.

    Returns:
        ``total`` results in the order of ``items`` (on every rank).

    Raises:
        RuntimeError: the ranks returned a different number of results than sharded.
    """
    parts = all_gather_objects(list(local))
    world = len(parts)
    out: list[Any] = [None] * total
    for r, part in enumerate(parts):
        expected = len(range(r, total, world))
        if len(part) != expected:
            raise RuntimeError(f"rank {r} returned {len(part)} results for {expected} items")
        out[r::world] = part
    return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain network inside DistributedDataParallel and/or ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# -- losses that pool over the whole (global) batch ------------------------------------------
def global_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over all ranks, differentiable through this rank's ``t`` only.

    The value is ``Σ_ranks t``; the gradient flows to the local ``t`` (the other ranks'
    shares are constants here, each rank differentiates its own share). Combined with
    :func:`ddp_gradient_scale`, a loss built from global sums gives DistributedDataParallel
    the gradient of the one-process loss over the global batch. Identity in one process.
    """
    if not is_distributed():
        return t
    total = t.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return t + (total - t.detach())


def ddp_gradient_scale(loss: torch.Tensor) -> torch.Tensor:
    """Same value, gradient × world size (identity in one process).

    DistributedDataParallel *averages* the ranks' gradients. A loss whose value is already
    global (built with :func:`global_sum`) must contribute the *sum* of the ranks' partial
    gradients, so each rank's gradient is multiplied by the number of ranks.
    """
    world = get_world_size()
    if world == 1:
        return loss
    return loss + (world - 1) * (loss - loss.detach())
