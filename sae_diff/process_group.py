"""The ``torch.distributed`` process group of a ``torchrun`` launch: joining it, this process's
place in it, barriers and agreement between ranks.

``sae_diff`` does not run a process pool of its own: ``torchrun`` starts one process per
device and sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR``; :func:`init`
joins the process group (NCCL for CUDA devices, gloo for CPU) and everything else keys off
:func:`world`. With one process every helper here is a no-op, so single-process code paths
are unchanged. Shared by the sharded harvest (``sae_diff.data``) and data-parallel training
(``sae_diff.training``), so it sits below both; ``sae_diff.training.distributed`` describes
what a distributed run does and re-exports these names.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from sae_diff.errors import SaeDiffError

T = TypeVar("T")


class DistributedError(SaeDiffError, RuntimeError):
    """A distributed run is misconfigured (world size, batch size, architecture, ...)."""


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes, ``local_rank`` on
    its node (the CUDA device index)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """The current process group (``World()`` when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return World(
            dist.get_rank(),
            dist.get_world_size(),
            int(os.environ.get("LOCAL_RANK", dist.get_rank())),
        )
    return World()


def backend_for(device: str | torch.device) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` otherwise (CPU)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def launched_by_torchrun() -> bool:
    """Whether the environment describes a multi-process launch (``WORLD_SIZE > 1``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str | torch.device = "cpu", *, timeout_s: float = 1800.0) -> World:
    """Join the process group described by the environment (``torchrun`` sets it), once.

    Without a multi-process environment nothing happens and ``World()`` is returned. The
    backend is NCCL for CUDA devices and gloo for CPU; on CUDA each process uses device
    ``cuda:LOCAL_RANK``.
    """
    if dist.is_available() and dist.is_initialized():
        return world()
    if not launched_by_torchrun():
        return World()
    if not dist.is_available():  # pragma: no cover - every supported torch build has it
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed.")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise DistributedError(
                f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {key} is not set: launch with "
                "`torchrun --nproc_per_node=N -m sae_diff.cli ...` (it sets RANK, LOCAL_RANK, "
                "MASTER_ADDR and MASTER_PORT), or unset WORLD_SIZE for one process."
            )
    backend = backend_for(device)
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    # leave the group before interpreter teardown: a gloo/NCCL group still alive then can abort
    # the process ("terminate called without an active exception") after all work is done
    atexit.register(shutdown)
    return world()


def shutdown() -> None:
    """Leave the process group if this process joined one (idempotent; registered at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: str) -> str:
    """``"cuda"`` -> ``"cuda:LOCAL_RANK"`` in a distributed run; anything else unchanged."""
    w = world()
    if w.distributed and device == "cuda":
        return f"cuda:{w.local_rank}"
    return device


def barrier() -> None:
    """Wait for every rank (no-op with one process)."""
    if world().distributed:
        dist.barrier()


def comm_device() -> torch.device:
    """The device collectives run on: this process's GPU under NCCL, else the CPU."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only and make every rank agree on its outcome: rank 0's exception
    is raised on every rank (as :class:`DistributedError` naming it, on the others), so no
    rank is left waiting at the next collective. Returns ``fn()`` on rank 0, None elsewhere."""
    w = world()
    if not w.distributed:
        return fn()
    result: T | None = None
    error: BaseException | None = None
    if w.is_main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    msg = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(msg, src=0)
    if error is not None:
        raise error
    if msg[0] is not None:
        raise DistributedError(f"rank 0 failed: {msg[0]}")
    return result


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank (e.g. a stop request)."""
    w = world()
    if not w.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


__all__ = [
    "DistributedError",
    "World",
    "any_rank",
    "backend_for",
    "barrier",
    "comm_device",
    "init",
    "launched_by_torchrun",
    "local_device",
    "on_main",
    "shutdown",
    "world",
]
