"""Exact fast flat top-K selection for BatchTopK (pure torch): :func:`batch_topk`.

Keeps the ``K`` largest scores ``v = relu(pre) * s`` of a whole batch with a sampled-threshold
pre-filter (one pass, then an exact top-K over the candidates). Tie rule: among entries equal
to the ``K``-th largest score, the lowest flat (row-major) index wins; ``torch.topk`` leaves
that choice unspecified. Part of the sparse training kernels (:mod:`sae_diff.dictionaries.kernels`,
which re-exports everything here). Also here: the reference dense mask
(:func:`batch_topk_mask`) and :class:`BatchSelection`, the hook through which a data-parallel
run replaces the batch's selection by the global batch's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from sae_diff.dictionaries.kernel_threads import _workspace

# Scores above this many elements use the sampled-threshold fast path; below it a flat
# ``kthvalue`` over everything is already cheap.
_FAST_PATH_MIN_NUMEL = 1 << 16
# Sample size for the quantile estimate of the K-th largest score.
_SAMPLE_SIZE = 1 << 16
# The sampled threshold targets this many candidates per kept entry (2 -> ~2K candidates;
# the relative standard error of the count is ~1/sqrt(2 K S / N), far from a miss).
_CANDIDATE_FACTOR = 2.0
# Relative safety margin of the per-latent candidate threshold t / s_j: covers the rounding
# of ``p * s`` and of ``t / s`` (each <= 1 ulp), so no entry with v >= t is filtered out.
_MARGIN = 1e-5


@dataclass
class TopKSelection:
    """Result of :func:`batch_topk`.

    Attributes:
        row: ``(K,)`` int64 row (token) indices, non-decreasing (row-major order).
        col: ``(K,)`` int64 column (latent) indices, increasing within a row.
        scores: ``(K,)`` the selected scores (``relu(scores) * scale`` when a scale is given).
        kth_score: the ``K``-th largest score (the smallest kept one), a python float.
        fast_path: whether the candidate pre-filter succeeded (False: full-size selection).
        n_candidates: number of candidates the exact selection ran on.
    """

    row: Tensor
    col: Tensor
    scores: Tensor
    kth_score: float
    fast_path: bool
    n_candidates: int


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def _effective_scores(flat_pre: Tensor, flat_idx: Tensor, scale: Tensor | None, n: int) -> Tensor:
    """Exact ``relu(pre) * scale`` at the given flat indices (bitwise equal to the dense op)."""
    vals = flat_pre[flat_idx].relu()
    if scale is None:
        return vals
    return vals * scale[flat_idx % n]


def _exact_topk_of_candidates(idx: Tensor, cv: Tensor, k_total: int) -> tuple[Tensor, Tensor]:
    """Keep the ``k_total`` largest ``cv`` (ties: lowest ``idx``, which is ascending).

    Returns the kept flat indices (ascending) and their scores.
    """
    c = cv.numel()
    if c <= k_total:
        return idx, cv
    kth = torch.kthvalue(cv, c - k_total + 1).values
    gt = cv > kth
    eq = cv == kth
    need = k_total - int(gt.sum())
    keep = gt | (eq & (torch.cumsum(eq, 0) <= need))
    return idx[keep], cv[keep]


def _sample_scores(flat_pre: Tensor, scale: Tensor | None, n: int) -> Tensor:
    """Exact scores of a deterministic strided sample of ``min(_SAMPLE_SIZE, N)`` entries.

    The stride is coprime with ``n`` so every latent is visited; no RNG is used, so the
    training's random stream is untouched.
    """
    N = flat_pre.numel()
    S = min(_SAMPLE_SIZE, N)
    stride = max(1, N // S)
    while math.gcd(stride, n) != 1:
        stride += 1
    idx = (torch.arange(S, device=flat_pre.device) * stride) % N
    return _effective_scores(flat_pre, idx, scale, n)


def _sample_threshold(sample: Tensor, N: int, k_total: int) -> float | None:
    """A score threshold with about ``_CANDIDATE_FACTOR * k_total`` of ``N`` entries above it.

    Returns ``None`` if no useful positive threshold exists (K a large fraction of N, or too
    few positive scores).
    """
    S = sample.numel()
    rank = math.ceil(_CANDIDATE_FACTOR * k_total * S / N)  # rank from the top in the sample
    if rank >= S // 2:
        return None
    t = float(torch.kthvalue(sample.float(), S - rank + 1).values)
    if not t > 0.0 or not math.isfinite(t):
        return None
    return t


def _candidates_above(pre: Tensor, scale: Tensor | None, t: float) -> Tensor:
    """Flat indices (ascending) of entries whose score might be ``>= t`` (conservative)."""
    mask = _workspace("mask", tuple(pre.shape), torch.bool, pre.device)
    if scale is None:
        torch.ge(pre, t, out=mask)
    else:
        # p * s >= t  =>  p >= (t / s) * (1 - margin); s == 0 gives inf (never a candidate,
        # its score is 0 < t).
        dt = torch.float64 if pre.dtype == torch.float64 else torch.float32
        thr = (t / scale.to(dt)) * (1.0 - _MARGIN)
        torch.ge(pre, thr, out=mask)
    return mask.view(-1).nonzero().view(-1)


@torch.no_grad()
def batch_topk(
    scores: Tensor,
    k_total: int,
    threshold_hint: float | None = None,
    *,
    scale: Tensor | None = None,
    force_slow: bool = False,
) -> TopKSelection:
    """Exact flat top-``k_total`` of a ``(B, n)`` score matrix, fast.

    Equivalent to ``torch.topk(v.flatten(), k_total)`` with ``v = relu(scores) * scale``
    (``v = relu(scores)`` when ``scale`` is None; for BatchTopK the scores are the
    pre-activations, so pass them and the code-normalisation scale instead of materialising
    ``v``). Ties at the ``K``-th value: lowest flat index wins (see the module docstring).

    Fast path: pick a threshold ``t`` (``threshold_hint`` if it is plausible, else a quantile of
    a deterministic strided sample, aiming at ~2K candidates), collect the entries that can
    reach ``t`` with one comparison pass + ``nonzero``, and run the exact selection on those.
    It is exact iff the K-th largest candidate score is ``>= t`` (every non-candidate is ``< t``);
    that is checked, and a miss falls back to the next threshold and finally to the exact
    selection over all entries (the slow path).

    Args:
        scores: ``(B, n)`` scores or pre-activations (any float dtype).
        k_total: number of entries to keep, ``B * k``.
        threshold_hint: a guess of the K-th largest score (e.g. the tracked BatchTopK
            threshold); used only if a sample says it yields between 1.1K and 8K candidates.
        scale: optional ``(n,)`` non-negative per-column scale (code normalisation).
        force_slow: skip the fast path (for tests and benchmarks).

    Returns:
        :class:`TopKSelection` (row-major order).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, n), got {tuple(scores.shape)}")
    B, n = scores.shape
    N = B * n
    k_total = int(k_total)
    if k_total < 0:
        raise ValueError("k_total must be >= 0")
    k_total = min(k_total, N)
    flat = scores.reshape(-1)
    if scale is not None:
        scale = scale.detach()
        if scale.shape != (n,):
            raise ValueError(f"scale must be ({n},), got {tuple(scale.shape)}")

    if k_total == 0:
        empty = torch.empty(0, dtype=torch.long, device=scores.device)
        return TopKSelection(empty, empty, flat[:0], float("nan"), False, 0)

    if not force_slow and N >= _FAST_PATH_MIN_NUMEL:
        thresholds: list[float] = []
        sample = _sample_scores(flat, scale, n)
        t_sample = _sample_threshold(sample, N, k_total)
        if threshold_hint is not None and t_sample is not None and threshold_hint > 0:
            # the hint's plausibility on the same sample: expected candidates per kept entry
            frac = float((sample >= threshold_hint).sum()) / sample.numel()
            if 1.1 <= frac * N / k_total <= 8.0:
                thresholds.append(float(threshold_hint))
        if t_sample is not None:
            thresholds.append(t_sample)
        for t in thresholds:
            idx = _candidates_above(scores, scale, t)
            if idx.numel() < k_total:
                continue
            cv = _effective_scores(flat, idx, scale, n)
            kept_idx, kept_v = _exact_topk_of_candidates(idx, cv, k_total)
            kth = float(kept_v.min())
            if kth >= t:  # every non-candidate scores < t <= kth: exact
                return TopKSelection(
                    kept_idx // n, kept_idx % n, kept_v, kth, True, int(idx.numel())
                )

    # slow path: exact selection over every entry
    all_idx = torch.arange(N, device=scores.device)
    v = flat.relu() if scale is None else (scores.relu() * scale).reshape(-1)
    kept_idx, kept_v = _exact_topk_of_candidates(all_idx, v, k_total)
    return TopKSelection(kept_idx // n, kept_idx % n, kept_v, float(kept_v.min()), False, int(N))


def batch_topk_mask(scores: torch.Tensor, k_total: int) -> torch.Tensor:
    """Boolean mask of the ``k_total`` largest entries of ``scores`` (flat top-k, the reference)."""
    flat = scores.flatten()
    k_total = min(k_total, flat.numel())
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.topk(k_total, sorted=False).indices] = True
    return mask.view_as(scores)


class BatchSelection(Protocol):
    """Which entries of a training batch a BatchTopK crosscoder keeps (its selection hook).

    The crosscoder calls :meth:`select` (sparse kernels) or :meth:`mask` (dense path) with the
    batch's selection scores and ``k_total = int(k * B)``, then :meth:`min_kept` with the
    smallest positive kept score of its own batch (None when it kept none); the threshold EMA
    takes what :meth:`min_kept` returns (nothing when None).
    """

    def select(
        self,
        scores: torch.Tensor,
        k_total: int,
        threshold_hint: float | None = None,
        *,
        scale: torch.Tensor | None = None,
        force_slow: bool = False,
    ) -> TopKSelection:
        """The kept entries, as :func:`batch_topk` returns them."""
        ...

    def mask(self, scores: torch.Tensor, k_total: int) -> torch.Tensor:
        """A boolean mask of the kept entries, as :func:`batch_topk_mask` returns it."""
        ...

    def min_kept(self, local_min: torch.Tensor | None) -> torch.Tensor | None:
        """The score the threshold EMA takes this step (None: no update)."""
        ...


__all__ = ["BatchSelection", "TopKSelection", "batch_topk", "batch_topk_mask"]
