"""BatchTopK over the *global* batch of a data-parallel run (``torchrun``, W processes).

One process keeps the flat top ``K = k * B`` selection scores of its batch; W processes
training on disjoint ``B / W``-row slices of one global batch must keep the same ``K`` entries
of the whole batch, or the dictionary trains differently from one process. :class:`GlobalBatchTopK`
is that selection, installed on a BatchTopK crosscoder through its selection hook
(``BatchTopKCrosscoderTraining.set_batch_selection``, done by
:class:`~sae_diff.training.data_parallel.DataParallel`): each rank takes its local top
``1.5 K / W`` scores (the kernel's exact fast selection), the ranks all-gather them, and each
keeps its entries above the global ``K``-th score (ties: lowest global flat index, the
one-process rule). When a rank's share of the global top-K exceeded what it offered, every
rank repeats with its local top-``K`` (exact always). The threshold EMA is fed the global
batch's smallest kept score, once per step, on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sae_diff.dictionaries.topk import TopKSelection, batch_topk
from sae_diff.process_group import comm_device

#: a local selection with :func:`sae_diff.dictionaries.topk.batch_topk`'s signature
LocalSelection = Callable[..., TopKSelection]


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
    dev = comm_device()
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


class GlobalBatchTopK:
    """A BatchTopK crosscoder's batch selection over the global batch of every rank (module
    docstring); ``k`` is the crosscoder's target L0 (``cfg.k``), ``local`` the per-rank
    selection it builds on. Implements ``sae_diff.dictionaries.topk.BatchSelection``.
    Call :meth:`new_step` before each training step."""

    def __init__(self, k: float, local: LocalSelection = batch_topk) -> None:
        self.k = float(k)
        self.local = local
        self.record = _TopKRecord()

    def new_step(self) -> None:
        """Forget the previous step's selection (its smallest kept score is fed once)."""
        self.record.min_positive, self.record.updated = None, False

    def select(
        self,
        scores: torch.Tensor,
        k_total: int,  # noqa: ARG002 - the global K is k * B_local * W, not the local k_total
        threshold_hint: float | None = None,
        *,
        scale: torch.Tensor | None = None,
        force_slow: bool = False,
    ) -> TopKSelection:
        """The sparse path (``batch_topk``'s signature): this rank's entries of the global
        flat top-``K``, ``K = int(k * B_local * W)`` (what one process computes on the
        concatenated batch)."""
        B, n = scores.shape
        W = dist.get_world_size()
        K = int(self.k * B * W)
        n_offered = _offer(K, W, B * n)
        while True:
            local = self.local(
                scores, n_offered, threshold_hint, scale=scale, force_slow=force_slow
            )
            keep, kth, min_pos, complete = _global_selection(local.scores, K, n_offered)
            if complete:
                break
            n_offered = min(K, B * n)
        self.record.min_positive = min_pos
        return type(local)(
            local.row[keep],
            local.col[keep],
            local.scores[keep],
            kth,
            local.fast_path,
            local.n_candidates,
        )

    def mask(self, scores: torch.Tensor, k_total: int) -> torch.Tensor:  # noqa: ARG002
        """The dense path (``batch_topk_mask``'s signature): a mask of this rank's entries of
        the global flat top-``K``."""
        flat = scores.flatten()
        W = dist.get_world_size()
        K = int(self.k * scores.shape[0] * W)
        n_offered = _offer(K, W, flat.numel())
        while True:
            top = flat.topk(n_offered, sorted=False).indices.sort().values
            keep, _, min_pos, complete = _global_selection(flat[top], K, n_offered)
            if complete:
                break
            n_offered = min(K, flat.numel())
        self.record.min_positive = min_pos
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[top[keep]] = True
        return mask.view_as(scores)

    def min_kept(self, local_min: torch.Tensor | None) -> torch.Tensor | None:  # noqa: ARG002
        """The score the threshold EMA takes this step: the *global* selection's smallest
        positive kept score, on every rank (also one that kept none itself), once per step;
        None when already fed this step or nothing positive was kept anywhere."""
        if self.record.min_positive is None or self.record.updated:
            return None
        self.record.updated = True
        return self.record.min_positive


def global_batch_topk(
    original: LocalSelection, k: float, record: _TopKRecord
) -> Callable[..., TopKSelection]:
    """:meth:`GlobalBatchTopK.select` as a drop-in for ``sae_diff.dictionaries.topk.batch_topk``
    built on ``original``, recording into ``record``."""
    selection = GlobalBatchTopK(k, original)
    selection.record = record
    return selection.select


def global_batch_topk_mask(
    k: float, record: _TopKRecord
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """:meth:`GlobalBatchTopK.mask` as a drop-in for
    ``sae_diff.dictionaries.topk.batch_topk_mask``, recording into ``record``."""
    selection = GlobalBatchTopK(k)
    selection.record = record
    return selection.mask


__all__ = [
    "MARGIN",
    "GlobalBatchTopK",
    "LocalSelection",
    "global_batch_topk",
    "global_batch_topk_mask",
]
