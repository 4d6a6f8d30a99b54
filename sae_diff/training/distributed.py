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
- **Data-parallel training** (:class:`DataParallel`): every rank builds the same *global*
  batch sequence (a function of the seed and the global step only) and trains on its own
  disjoint ``1/W`` row slice of each batch (``PairedActivationsStore(rank=, world_size=)``).
  Gradients are averaged with one all-reduce per parameter before SAELens clips them, so the
  clipped update, Adam's state and the weights stay identical on every rank and equal to a
  one-process step on the global batch (to float rounding). SAELens's dead-latent statistics
  are reduced across ranks, and the BatchTopK selection of ``sae_diff``'s crosscoders is the
  flat top-``k * B`` over the *global* batch (:func:`global_batch_topk`), so the selected
  latents and the threshold EMA equal the one-process run's.
- **Checkpoints** are written by rank 0 only (atomically, as before) between two barriers;
  their data position is the global one, so any world size resumes them exactly.

Semantics that differ from one process (documented, tested where they matter):

- the aux-K loss of the BatchTopK crosscoder normalises by the residual variance of each
  rank's *local* batch (an average of per-rank losses, not the global-batch loss; it is only
  active once latents are dead);
- logged losses are rank 0's local values;
- SAELens's own ``batchtopk`` / ``batchtopk_diff_sae`` (top-k inside SAELens's activation
  function) would select per rank; those architectures are refused for ``W > 1``.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from sae_diff.errors import SaeDiffError

T = TypeVar("T")

#: parameters smaller than this (elements) are all-reduced together in one flat bucket;
#: larger ones in place, each as soon as backward has produced its gradient
BUCKET_ELEMENTS = 1 << 22

#: architectures whose batch coupling lives inside SAELens (not reducible from here)
UNSUPPORTED_ARCHITECTURES = frozenset({"batchtopk", "batchtopk_diff_sae"})


class DistributedError(SaeDiffError, RuntimeError):
    """A distributed run is misconfigured (world size, batch size, architecture, ...)."""


# ---------------------------------------------------------------------- process group
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


def _comm_device() -> torch.device:
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
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# ---------------------------------------------------------------------- BatchTopK
@dataclass
class _TopKRecord:
    """The global selection's smallest positive kept score of the current step (feeds the
    threshold EMA on every rank)."""

    min_positive: torch.Tensor | None = None
    updated: bool = False


#: each rank first offers ``MARGIN * K / W`` candidates (its expected share of the global
#: top-K with room for imbalance); the full ``K`` only when a rank's share did not fit
MARGIN = 1.5


def _global_selection(
    scores: torch.Tensor, K: int, n_offered: int
) -> tuple[torch.Tensor, float, torch.Tensor | None, bool]:
    """Which of this rank's candidates belong to the global flat top-``K``.

    ``scores`` are this rank's ``n_offered`` (or, when it has fewer entries, all) largest
    scores in ascending flat-index order. Ties at the ``K``-th value go to the lowest global
    flat index: rank order, then local index (the global batch is the ranks' slices in rank
    order), the one-process rule. The selection is exact when every rank that offered a full
    list offered a score below the global ``K``-th (so nothing it held back could be kept);
    ``complete`` says so, identically on every rank (else: call again with ``n_offered = K``).
    Returns (keep mask over ``scores``, the global K-th score, smallest positive kept score,
    complete).
    """
    W, r = dist.get_world_size(), dist.get_rank()
    dev = _comm_device()
    buf = torch.full((n_offered,), float("-inf"), dtype=scores.dtype, device=dev)
    buf[: scores.numel()] = scores.to(dev)
    gathered = [torch.empty_like(buf) for _ in range(W)]
    dist.all_gather(gathered, buf)
    allv = torch.stack(gathered)  # (W, n_offered)
    flat = allv.reshape(-1)
    work = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat
    kth_t = torch.kthvalue(work, work.numel() - K + 1).values.to(flat.dtype)
    full = torch.isfinite(allv).sum(1) == n_offered
    complete = bool((~full | (allv.min(1).values < kth_t)).all()) or n_offered >= K
    n_gt = int((flat > kth_t).sum())
    eq_per_rank = (allv == kth_t).sum(1)
    need = K - n_gt
    take = max(0, min(int(eq_per_rank[r]), need - int(eq_per_rank[:r].sum())))
    s = scores.to(dev)
    eq = s == kth_t
    keep = (s > kth_t) | (eq & (torch.cumsum(eq, 0) <= take))
    kth = float(kth_t)
    kept_global = flat[flat >= kth_t] if kth > 0 else flat[flat > 0]
    pos = kept_global[kept_global > 0]
    min_pos = pos.min().to(torch.float64) if pos.numel() else None
    return keep.to(scores.device), kth, min_pos, complete


def _offer(K: int, W: int, n_entries: int) -> int:
    return min(n_entries, K, max(1, -(-int(MARGIN * K) // W)))


def global_batch_topk(
    original: Callable[..., Any], k: float, record: _TopKRecord
) -> Callable[..., Any]:
    """A drop-in for ``sae_diff.dictionaries.kernels.batch_topk`` selecting the flat top-``K``
    of the *global* batch, ``K = int(k * B_local * W)`` (what one process computes on the
    concatenated batch): each rank takes its local top ``1.5 K / W`` scores (the kernel's exact
    fast selection), the ranks all-gather them, and each keeps its entries above the global
    ``K``-th score (ties: lowest global flat index). When a rank's share of the global top-K
    exceeded what it offered, every rank repeats with its local top-``K`` (exact always)."""

    def batch_topk(
        scores: torch.Tensor,
        k_total: int,
        threshold_hint: float | None = None,
        *,  # noqa: ARG001
        scale: torch.Tensor | None = None,
        force_slow: bool = False,
    ) -> Any:
        B, n = scores.shape
        W = dist.get_world_size()
        K = int(k * B * W)
        n_offered = _offer(K, W, B * n)
        while True:
            local = original(scores, n_offered, threshold_hint, scale=scale, force_slow=force_slow)
            keep, kth, min_pos, complete = _global_selection(local.scores, K, n_offered)
            if complete:
                break
            n_offered = min(K, B * n)
        record.min_positive = min_pos
        return type(local)(
            local.row[keep],
            local.col[keep],
            local.scores[keep],
            kth,
            local.fast_path,
            local.n_candidates,
        )

    return batch_topk


def global_batch_topk_mask(
    k: float, record: _TopKRecord
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The dense-path twin of :func:`global_batch_topk`, for
    ``sae_diff.dictionaries.batchtopk_crosscoder.batch_topk_mask``."""

    def batch_topk_mask(scores: torch.Tensor, k_total: int) -> torch.Tensor:  # noqa: ARG001
        flat = scores.flatten()
        W = dist.get_world_size()
        K = int(k * scores.shape[0] * W)
        n_offered = _offer(K, W, flat.numel())
        while True:
            top = flat.topk(n_offered, sorted=False).indices.sort().values
            keep, _, min_pos, complete = _global_selection(flat[top], K, n_offered)
            if complete:
                break
            n_offered = min(K, flat.numel())
        record.min_positive = min_pos
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[top[keep]] = True
        return mask.view_as(scores)

    return batch_topk_mask


# ---------------------------------------------------------------------- data parallel
class DataParallel:
    """Makes a SAELens ``SAETrainer`` train data-parallel across the process group.

    Use as a context manager around ``trainer.fit()`` and call :meth:`after_step` after each
    ``trainer.step`` (``ResumableSAETrainer`` does both). While active:

    - the dictionary's parameters are broadcast from rank 0 once, then every gradient is
      averaged across ranks as soon as backward has accumulated it (post-accumulate-grad
      hooks: large parameters in place, the small ones in one flat bucket when the last
      arrives; the hooks fire in the same order on every rank because every rank runs the
      same graph), i.e. before SAELens's gradient clipping;
    - for ``sae_diff``'s BatchTopK crosscoders the module-level BatchTopK selections are
      replaced by their global-batch versions, and the threshold EMA is fed the global
      batch's smallest kept score.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.world = world()
        self.record = _TopKRecord()
        self._handles: list[Any] = []
        self._stack = contextlib.ExitStack()
        arch = trainer.sae.cfg.architecture()
        if self.world.distributed and arch in UNSUPPORTED_ARCHITECTURES:
            raise DistributedError(
                f"architecture {arch!r} selects its top-k inside SAELens, per process, so {self.world.size} "
                "processes would not train what one process trains. Run it with one process, or use "
                "'batchtopk_crosscoder' (its BatchTopK is reduced across processes) or 'topk' / 'jumprelu'."
            )

    # -- setup
    def __enter__(self) -> DataParallel:
        if not self.world.distributed:
            return self
        sae = self.trainer.sae
        with torch.no_grad():
            for t in [*sae.parameters(), *sae.buffers()]:
                dist.broadcast(t.data, src=0)
        W = self.world.size
        params = [p for p in sae.parameters() if p.requires_grad]
        small = [p for p in params if p.numel() < BUCKET_ELEMENTS]
        small_ids = {id(p) for p in small}
        self._pending = 0
        self._n_small = len(small)

        def average(p: torch.Tensor) -> None:
            if p.grad is None:
                return
            if id(p) not in small_ids:  # large: in place, as soon as it is ready
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(W)
                return
            self._pending += 1
            if self._pending == self._n_small:  # the last small gradient: one bucketed call
                self._pending = 0
                grads = [q.grad for q in small]
                if any(g is None for g in grads):
                    raise DistributedError(
                        "a parameter got no gradient this step; its all-reduce cannot run."
                    )
                flat = torch.cat([g.reshape(-1) for g in grads if g is not None])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                flat.div_(W)
                offset = 0
                for g in grads:
                    assert g is not None
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()

        for p in params:
            self._handles.append(p.register_post_accumulate_grad_hook(average))
        if hasattr(sae, "_update_threshold_from_min"):
            self._patch_batchtopk(sae)
        return self

    def _patch_batchtopk(self, sae: Any) -> None:
        from sae_diff.dictionaries import batchtopk_crosscoder as btc
        from sae_diff.dictionaries import kernels

        k = float(sae.cfg.k)
        record = self.record
        orig_update = sae._update_threshold_from_min

        def update(min_kept: torch.Tensor, step: int | None = None) -> None:  # noqa: ARG001
            if record.min_positive is not None and not record.updated:
                record.updated = True
                orig_update(record.min_positive.to(min_kept.device), step)

        self._stack.enter_context(
            _patched(kernels, "batch_topk", global_batch_topk(kernels.batch_topk, k, record))
        )
        self._stack.enter_context(
            _patched(btc, "batch_topk_mask", global_batch_topk_mask(k, record))
        )
        self._stack.enter_context(_patched(sae, "_update_threshold_from_min", update))
        self._orig_update = orig_update

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._stack.close()

    # -- per step
    def before_step(self) -> dict[str, Any]:
        """Snapshot what :meth:`after_step` reduces."""
        self.record.min_positive, self.record.updated = None, False
        return {
            "act_freq_scores": self.trainer.act_freq_scores.clone(),
            "n_forward_passes_since_fired": self.trainer.n_forward_passes_since_fired.clone(),
        }

    def after_step(self, snapshot: dict[str, Any]) -> None:
        """Reduce SAELens's dead-latent statistics of the step across ranks: a latent fired
        if it fired on any rank; firing counts are summed (exact: they are integers)."""
        if not self.world.distributed:
            return
        tr = self.trainer
        if self.record.min_positive is not None and not self.record.updated:
            # this rank kept no positive score itself (so the model did not update the
            # threshold), but the global batch did: update it as the other ranks did
            self.record.updated = True
            self._orig_update(
                self.record.min_positive.to(tr.sae.topk_threshold.device), tr.n_training_steps
            )
        if self._pending:
            raise DistributedError(
                f"only {self._pending} of {self._n_small} gradients arrived this step, so they were not "
                "averaged across processes; this dictionary leaves a parameter unused."
            )
        before = snapshot["act_freq_scores"]
        delta = (
            tr.act_freq_scores - before
        )  # this rank's firing counts (integers: the sum is exact)
        dist.all_reduce(delta, op=dist.ReduceOp.SUM)
        tr.act_freq_scores = before + delta
        # SAELens: +1 for every latent, 0 for those that fired (here: on any rank)
        passes = snapshot["n_forward_passes_since_fired"] + 1
        passes[delta > 0] = 0
        tr.n_forward_passes_since_fired = passes


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``obj.name = value`` for the duration (restored afterwards)."""
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


def check_batch_size(batch_size: int, world_size: int) -> int:
    """Tokens per rank: ``batch_size`` (the global batch) must split evenly."""
    if batch_size % world_size:
        raise DistributedError(
            f"train_batch_size_tokens ({batch_size}) is the global batch and must be divisible by the "
            f"number of processes ({world_size}); each process trains on batch_size / {world_size} "
            "tokens of every batch. Pick a multiple of the process count."
        )
    return batch_size // world_size


__all__ = [
    "DataParallel",
    "DistributedError",
    "World",
    "shutdown",
    "any_rank",
    "backend_for",
    "barrier",
    "check_batch_size",
    "global_batch_topk",
    "global_batch_topk_mask",
    "init",
    "launched_by_torchrun",
    "local_device",
    "on_main",
    "world",
]
