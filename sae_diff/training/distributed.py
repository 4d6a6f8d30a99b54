"""Data-parallel runs on ``torch.distributed`` (launched with ``torchrun``).

``sae_diff`` does not run a process pool of its own: ``torchrun`` starts one process per
device and sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR``; :func:`init`
joins the process group (NCCL for CUDA devices, gloo for CPU) and everything else keys off
:func:`world`. With one process every helper here is a no-op, so single-process code paths
are unchanged.

What a distributed run does (``docs/training.md``, "Distributed runs"):

- **Sharded harvest** (``sae_diff.data.harvest``): rank ``r`` computes shards
  ``i = r, r + W, ...`` of the one cache folder; rank 0 commits the single manifest after a
  barrier, merging the shards' statistics in shard order (the same sums, bit for bit, as a
  one-process harvest).
- **Data-parallel training** (:class:`~sae_diff.training.data_parallel.DataParallel`): every rank builds the same *global*
  batch sequence (a function of the seed and the global step only) and trains on its own
  disjoint ``1/W`` row slice of each batch (``PairedActivationsStore(rank=, world_size=)``).
  Gradients are averaged with one all-reduce per parameter before SAELens clips them, so the
  clipped update, Adam's state and the weights stay identical on every rank and equal to a
  one-process step on the global batch (to float rounding). SAELens's dead-latent statistics
  are reduced across ranks, and the BatchTopK selection of ``sae_diff``'s crosscoders is the
  flat top-``k * B`` over the *global* batch (set through the crosscoder's selection hook:
  :class:`~sae_diff.training.global_topk.GlobalBatchTopK`), so the selected latents and the
  threshold EMA equal the one-process run's.
- **Checkpoints** are written by rank 0 only (atomically, as before) between two barriers;
  their data position is the global one, so any world size resumes them exactly.

Semantics that differ from one process (documented, tested where they matter):

- the aux-K loss of the BatchTopK crosscoder normalises by the residual variance of each
  rank's *local* batch (an average of per-rank losses, not the global-batch loss; it is only
  active once latents are dead);
- logged losses are rank 0's local values;
- SAELens's own ``batchtopk`` / ``batchtopk_diff_sae`` (top-k inside SAELens's activation
  function) would select per rank; those architectures are refused for ``W > 1``.

The process group itself (joining it, this process's place in it, barriers, agreement
between ranks) is :mod:`sae_diff.process_group`, shared with the sharded harvest; its names
are re-exported here, the module users of distributed training import.
:mod:`~sae_diff.training.data_parallel` (``DataParallel``) and
:mod:`~sae_diff.training.global_topk` (the global BatchTopK) build on it; their names still
resolve here, with a ``DeprecationWarning``, for one release.
"""

from __future__ import annotations

from sae_diff.moved import moved_names, to
from sae_diff.process_group import (
    DistributedError,
    World,
    any_rank,
    backend_for,
    barrier,
    comm_device,
    init,
    launched_by_torchrun,
    local_device,
    on_main,
    shutdown,
    world,
)


def check_batch_size(batch_size: int, world_size: int) -> int:
    """Tokens per rank: ``batch_size`` (the global batch) must split evenly."""
    if batch_size % world_size:
        raise DistributedError(
            f"train_batch_size_tokens ({batch_size}) is the global batch and must be divisible by the "
            f"number of processes ({world_size}); each process trains on batch_size / {world_size} "
            "tokens of every batch. Pick a multiple of the process count."
        )
    return batch_size // world_size


#: name -> module it moved to (one release; see sae_diff.moved)
__getattr__ = moved_names(
    __name__,
    {
        **to(
            "sae_diff.training.data_parallel",
            ("DataParallel", "BUCKET_ELEMENTS", "UNSUPPORTED_ARCHITECTURES"),
        ),
        **to(
            "sae_diff.training.global_topk",
            (
                "global_batch_topk",
                "global_batch_topk_mask",
                "MARGIN",
                "_TopKRecord",
                "_global_selection",
                "_offer",
            ),
        ),
    },
)


__all__ = [
    "DistributedError",
    "World",
    "shutdown",
    "any_rank",
    "backend_for",
    "barrier",
    "check_batch_size",
    "comm_device",
    "init",
    "launched_by_torchrun",
    "local_device",
    "on_main",
    "world",
]
