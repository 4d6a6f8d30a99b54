"""Sparse training kernels for BatchTopK / TopK dictionaries (pure torch).

A BatchTopK step keeps ``K = B * k`` of the ``B * n`` pre-activations of a batch. The
dense formulation (what public trainers do: dense encode, flat top-k, dense decode, dense
backward) costs about ``10 * D * n`` FLOPs per token. Only the encoder *forward* matmul has to
be dense; everything else touches the ``K`` kept entries only:

==========================  ===========================================  ==============
piece                       how                                          FLOPs / token
==========================  ===========================================  ==============
encoder forward             ``addmm(b_enc, x, W_enc)`` (dense)           ``2 D n``
selection                   :func:`batch_topk` (threshold pre-filter)    ``O(n)`` passes
decode                      ``embedding_bag(sum, per_sample_weights)``   ``2 k D``
d values                    ``sampled_addmm`` (SDDMM on the kept set)    ``2 k D``
d W_dec                     ``embedding_bag`` over latents (bags)        ``2 k D``
d W_enc, d b_enc            ``embedding_bag`` over latents, ``index_add``  ``2 k D``
==========================  ===========================================  ==============

so ``2 D n + 8 k D`` instead of ``10 D n``. ``x`` gets no gradient unless it requires one.

Shapes (crosscoders flatten their model axis: ``D = n_models * d_in``; the crosscoder layouts
``W_enc (n_models, d_in, n)`` and ``W_dec (n, n_models, d_in)`` reshape to these as views):

- ``x``: ``(B, D)``, ``W_enc``: ``(D, n)``, ``b_enc``: ``(n,)``, ``W_dec``: ``(n, D)``,
  ``b_dec``: ``(D,)``, code-normalisation scale ``s``: ``(n,)`` (non-negative, no gradient).

Semantics (METHODS.md section 1): pre-activations ``p = relu(x W_enc + b_enc)``, selection
scores ``v = p * s``, keep the ``K`` largest ``v`` of the whole batch, kept values are the
*unscaled* ``p``. ``s`` only enters the (discrete) selection, so it gets no gradient; this equals
SAELens's ``rescale_acts_by_decoder_norm`` forward, whose gradients through the norm cancel
exactly (``p * s / s``).

Tie rule: the selected set is exactly the set of ``torch.topk(v.flatten(), K)`` except that,
among entries equal to the ``K``-th largest score, the ones with the lowest flat (row-major)
index are kept; ``torch.topk`` leaves that choice unspecified.

Public API:

- :func:`batch_topk`: exact fast flat top-K selection -> :class:`TopKSelection`.
- :func:`sparse_encode`: differentiable ``(values, aux values)`` of the kept entries
  (gradients for ``W_enc``, ``b_enc``, and ``x`` only if it requires grad).
- :func:`sparse_decode`: differentiable ``f @ W_dec`` from CSR triples (gradients for the
  values and ``W_dec``).
- :func:`sparse_batchtopk_encode_decode`: both, plus ``b_dec``; returns a
  :class:`SparseForwardOutput`.
- :func:`make_adam`: Adam with ``fused=True`` where this torch build supports it.

Layout (this module is the public functional API; the names below are re-exported here):
the selection is :mod:`sae_diff.dictionaries.topk`, the thread policy and workspaces
:mod:`sae_diff.dictionaries.kernel_threads`, the autograd functions
:mod:`sae_diff.dictionaries.sparse_autograd`, the CSR / bag-sum products their backward passes
share :mod:`sae_diff.dictionaries.sparse_matmul`, and Adam :mod:`sae_diff.dictionaries.optim`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sae_diff.dictionaries.kernel_threads import (
    set_small_op_threads,
    set_workspaces,
    small_op_threads,
)
from sae_diff.dictionaries.optim import fused_adam_supported, make_adam
from sae_diff.dictionaries.sparse_autograd import _SparseDecode, _SparseEncode
from sae_diff.dictionaries.sparse_matmul import _gather_dot as _gather_dot
from sae_diff.dictionaries.sparse_matmul import _latent_bag_sum as _latent_bag_sum
from sae_diff.dictionaries.sparse_matmul import offsets_from_sorted
from sae_diff.dictionaries.topk import TopKSelection, batch_topk

__all__ = [
    "offsets_from_sorted",
    "SparseCode",
    "SparseForwardOutput",
    "TopKSelection",
    "batch_topk",
    "dense_batchtopk_reference",
    "fused_adam_supported",
    "make_adam",
    "set_small_op_threads",
    "set_workspaces",
    "small_op_threads",
    "sparse_batchtopk_encode_decode",
    "sparse_decode",
    "sparse_encode",
]

_offsets_from_sorted = offsets_from_sorted  # the old private name


@dataclass
class SparseCode:
    """Kept entries of a ``(B, n)`` code in CSR order (rows non-decreasing).

    Attributes:
        row: ``(nnz,)`` int64 row indices.
        col: ``(nnz,)`` int64 latent indices.
        values: ``(nnz,)`` activations (differentiable when produced by :func:`sparse_encode`).
        offsets: ``(B,)`` int64 start of each row in ``row/col/values`` (CSR ``crow[:-1]``).
        shape: ``(B, n)``.
    """

    row: Tensor
    col: Tensor
    values: Tensor
    offsets: Tensor
    shape: tuple[int, int]

    def to_dense(self) -> Tensor:
        """Materialise the dense ``(B, n)`` code (differentiable in ``values``)."""
        flat = self.row * self.shape[1] + self.col
        out = self.values.new_zeros(self.shape[0] * self.shape[1])
        return out.index_put((flat,), self.values, accumulate=True).view(self.shape)

    def to_sparse_coo(self) -> Tensor:
        """A (detached) ``torch.sparse_coo_tensor`` view of the code, e.g. for SAELens stats."""
        idx = torch.stack([self.row, self.col])
        return torch.sparse_coo_tensor(
            idx, self.values.detach(), self.shape, is_coalesced=True, check_invariants=False
        )

    def l0(self) -> Tensor:
        """Number of non-zero activations per row, ``(B,)`` (float)."""
        nz = (self.values.detach() != 0).to(torch.float32)
        return torch.zeros(self.shape[0], device=nz.device).index_add_(0, self.row, nz)


@dataclass
class SparseForwardOutput:
    """Output of :func:`sparse_batchtopk_encode_decode`.

    Attributes:
        code: the kept BatchTopK entries (values differentiable).
        xhat: ``(B, D)`` reconstruction ``f @ W_dec + b_dec``.
        min_kept_score: smallest kept score ``v`` (for the tracked threshold), float.
        min_positive_kept_score: smallest kept score that is > 0 (SAELens's convention), float
            (``nan`` when none is positive).
        aux_code: the auxiliary (dead-latent) entries, or ``None``.
        aux_recon: ``(B, D)`` auxiliary reconstruction ``f_aux @ W_dec`` (no bias), or ``None``.
        fast_path: whether :func:`batch_topk` used its fast path.
    """

    code: SparseCode
    xhat: Tensor
    min_kept_score: float
    min_positive_kept_score: float
    aux_code: SparseCode | None
    aux_recon: Tensor | None
    fast_path: bool


def sparse_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k_total: int,
    *,
    scale: Tensor | None = None,
    threshold_hint: float | None = None,
    aux_latents: Tensor | None = None,
    k_aux: int = 0,
    aux_scaled: bool = True,
    select: Callable[..., TopKSelection] | None = None,
) -> tuple[SparseCode, SparseCode | None, tuple[float, bool, int]]:
    """BatchTopK encode keeping only the selected entries (differentiable values).

    Args:
        x: ``(B, D)`` input (no gradient is computed for it unless it requires grad).
        W_enc: ``(D, n)``; b_enc: ``(n,)``.
        k_total: kept entries for the batch, ``B * k``.
        scale: ``(n,)`` code-normalisation scale ``s`` for the selection (detached).
        threshold_hint: tracked threshold (a guess of the K-th largest score), optional.
        aux_latents: ``(n_dead,)`` int64 dead-latent ids for the auxiliary loss, optional.
        k_aux: number of dead latents kept per row (top by pre-activation).
        aux_scaled: rank the dead latents by ``pre * scale`` (SAELens's rescaled
            ``hidden_pre``) rather than by ``pre``.
        select: the BatchTopK selection, with :func:`batch_topk`'s signature (None:
            :func:`batch_topk`); a data-parallel run passes the global-batch selection.

    Returns:
        ``(code, aux_code, (kth_score, fast_path, n_candidates))``: the BatchTopK entries, the
        auxiliary entries (``None`` if not requested; values are raw pre-activations, may be
        negative) and selection statistics (smallest kept score, whether the fast path was
        used, candidate count).
    """
    B = x.shape[0]
    n = W_enc.shape[1]
    sc = None if scale is None else scale.detach()
    aux = None if aux_latents is None else aux_latents.to(torch.long)
    (values, aux_values, row, col, offsets, aux_row, aux_col, aux_offsets, kth) = (
        _SparseEncode.apply(
            x, W_enc, b_enc, sc, int(k_total), threshold_hint, aux, int(k_aux), aux_scaled, select
        )
    )
    code = SparseCode(row, col, values, offsets, (B, n))
    aux_code = None
    if aux is not None and k_aux > 0 and aux.numel() > 0:
        aux_code = SparseCode(aux_row, aux_col, aux_values, aux_offsets, (B, n))
    stats = kth.tolist()
    return code, aux_code, (stats[0], bool(stats[1]), int(stats[2]))


def sparse_decode(code: SparseCode, W_dec: Tensor) -> Tensor:
    """``f @ W_dec`` for a sparse code without materialising ``f``: ``(B, D)``.

    Gradients flow to ``code.values`` and ``W_dec`` (only the used rows are non-zero).
    """
    if W_dec.dim() != 2 or W_dec.shape[0] != code.shape[1]:
        raise ValueError(f"W_dec must be ({code.shape[1]}, D), got {tuple(W_dec.shape)}")
    return _SparseDecode.apply(code.values, W_dec, code.row, code.col, code.offsets, code.shape[0])


def sparse_batchtopk_encode_decode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    k: float,
    *,
    scale: Tensor | None = None,
    threshold_hint: float | None = None,
    aux_latents: Tensor | None = None,
    k_aux: int = 0,
) -> SparseForwardOutput:
    """The sparse BatchTopK training forward: encode, select, decode (all differentiable).

    ``k`` is the mean number of kept latents per row (``K = round(B * k)``). Gradients:
    ``W_enc``, ``b_enc`` (kept entries only), ``W_dec`` (used rows), ``b_dec``; ``x`` only if it
    requires grad. The auxiliary reconstruction (dead latents, no bias) is returned separately
    so the caller can form its loss against the detached residual.
    """
    B = x.shape[0]
    k_total = int(round(k * B))
    code, aux_code, (kth, fast, _) = sparse_encode(
        x,
        W_enc,
        b_enc,
        k_total,
        scale=scale,
        threshold_hint=threshold_hint,
        aux_latents=aux_latents,
        k_aux=k_aux,
    )
    xhat = sparse_decode(code, W_dec) + b_dec
    aux_recon = sparse_decode(aux_code, W_dec) if aux_code is not None else None
    with torch.no_grad():
        v = code.values.detach()
        if scale is not None:
            v = v * scale.detach()[code.col].to(v.dtype)
        pos = v[v > 0]
        min_pos = float(pos.min()) if pos.numel() else float("nan")
    return SparseForwardOutput(code, xhat, kth, min_pos, aux_code, aux_recon, fast)


def dense_batchtopk_reference(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    k: float,
    *,
    scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The dense reference (as public trainers do it): dense encode, flat top-k, dense decode.

    Returns ``(f, xhat)`` with ``f`` the dense ``(B, n)`` code. Used by the tests and the
    benchmark; the selected set matches :func:`batch_topk` whenever the ``K``-th score is not
    tied (``torch.topk``'s tie-break is unspecified).
    """
    B = x.shape[0]
    k_total = int(round(k * B))
    acts = torch.relu(x @ W_enc + b_enc)
    v = acts if scale is None else acts * scale.detach()
    idx = torch.topk(v.flatten(), k_total, sorted=False).indices
    mask = torch.zeros_like(v.flatten()).scatter_(0, idx, 1.0).view_as(v)
    f = acts * mask
    return f, f @ W_dec + b_dec
