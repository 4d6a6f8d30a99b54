"""Thread policy and scratch buffers of the sparse training kernels
(:mod:`sae_diff.dictionaries.kernels` re-exports the public names): why the small ops of a
sparse step run on one thread, and the reused forward workspaces.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------
# Thread policy
# --------------------------------------------------------------------------------------------

_SMALL_OP_THREADS: int | None = 1
_THREAD_STATE = threading.local()


def set_small_op_threads(n: int | None) -> None:
    """Intra-op threads for everything in the sparse step but the encoder matmul (default 1).

    The sparse step is one large matmul plus ~60 small or memory-bound ops (selection passes,
    ``nonzero``, sorts, bag sums, SDDMM). With torch's default of one thread per core, each of
    those is an OpenMP parallel region whose barrier waits for every worker; on a machine whose
    cores are shared with other processes a descheduled worker stalls the region for a whole
    scheduler slice (measured: a stable ``argsort`` of 32k indices, 0.4 ms alone, took 750-800 ms
    with 2 threads at load average 9). The dense step has a handful of regions and degrades far
    less. Running the small ops on one thread removes those barriers and costs little on an idle
    machine (they are a small share of the step; docs/performance.md). ``None`` leaves torch's
    setting everywhere. The matmul always uses ``torch.get_num_threads()`` threads.
    """
    global _SMALL_OP_THREADS
    if n is not None and n < 1:
        raise ValueError(f"set_small_op_threads: n must be >= 1 or None, got {n}.")
    _SMALL_OP_THREADS = n


@contextmanager
def small_op_threads() -> Iterator[None]:
    """Run the enclosed ops on ``set_small_op_threads``'s thread count (process-wide while
    inside: torch's thread setting is global), restoring the previous count after."""
    target = _SMALL_OP_THREADS
    n = torch.get_num_threads()
    if target is None or n <= target:
        yield
        return
    stack = _THREAD_STATE.__dict__.setdefault("saved", [])
    stack.append(n)
    torch.set_num_threads(target)
    try:
        yield
    finally:
        stack.pop()
        torch.set_num_threads(n)


@contextmanager
def _all_threads() -> Iterator[None]:
    """Inside ``small_op_threads``: the caller's full thread count again (for the matmul)."""
    stack = _THREAD_STATE.__dict__.get("saved") or []
    if not stack:
        yield
        return
    current = torch.get_num_threads()
    torch.set_num_threads(stack[-1])
    try:
        yield
    finally:
        torch.set_num_threads(current)


_WORKSPACES: dict[tuple[str, tuple[int, ...], torch.dtype, torch.device], Tensor] = {}
_USE_WORKSPACES = True


def set_workspaces(enabled: bool) -> None:
    """Enable/disable reuse of the forward scratch buffers (``B x n`` pre-activations, mask).

    On CPU every fresh allocation above glibc's mmap threshold (32 MB) is page-faulted in
    again on each step, which on a VM costs about as much as several passes over the buffer;
    reusing one buffer per shape avoids it. The buffers are never saved for backward, so reuse
    is safe for sequential steps (not for concurrent calls from several threads).
    """
    global _USE_WORKSPACES
    _USE_WORKSPACES = enabled
    if not enabled:
        _WORKSPACES.clear()


def _workspace(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Tensor:
    if not _USE_WORKSPACES:
        return torch.empty(shape, dtype=dtype, device=device)
    key = (name, shape, dtype, device)
    buf = _WORKSPACES.get(key)
    if buf is None:
        for k in [k for k in _WORKSPACES if k[0] == name]:  # one buffer per name
            del _WORKSPACES[k]
        buf = torch.empty(shape, dtype=dtype, device=device)
        _WORKSPACES[key] = buf
    return buf


__all__ = ["set_small_op_threads", "set_workspaces", "small_op_threads"]
