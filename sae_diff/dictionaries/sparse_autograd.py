"""The two autograd functions of the sparse BatchTopK step (see :mod:`sae_diff.dictionaries.kernels`).

``_SparseEncode``: dense encoder matmul into a reused workspace, exact BatchTopK selection,
kept values and (optionally) the auxiliary dead-latent entries; its backward touches the kept
entries only. ``_SparseDecode``: ``f @ W_dec`` as an ``embedding_bag`` over CSR triples; its
backward is an SDDMM for the values and bag sums for ``W_dec``. The public, documented entry
points (``sparse_encode``, ``sparse_decode``, ...) live in :mod:`~sae_diff.dictionaries.kernels`;
this module is the forward/backward pairs only, each read together with its backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_diff.dictionaries.kernel_threads import _all_threads, _workspace, small_op_threads
from sae_diff.dictionaries.sparse_matmul import (
    _csr_add_times_dense_t,
    _gather_dot,
    _latent_bag_sum,
    offsets_from_sorted,
)
from sae_diff.dictionaries.topk import TopKSelection, batch_topk


def _encoder_preacts(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """Dense pre-activations ``x @ W_enc + b_enc`` into a reused workspace.

    Autocast-aware: under ``torch.autocast`` the matmul runs in the autocast dtype (bf16 /
    fp16) and the pre-activations are stored in it.
    """
    dev = x.device.type
    B, n = x.shape[0], W_enc.shape[1]
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        out = _workspace("pre", (B, n), dt, x.device)
        with torch.autocast(dev, enabled=False), _all_threads():
            return torch.addmm(b_enc.to(dt), x.to(dt), W_enc.to(dt), out=out)
    dt = torch.promote_types(x.dtype, W_enc.dtype)
    out = _workspace("pre", (B, n), dt, x.device)
    with _all_threads():
        return torch.addmm(b_enc, x, W_enc, out=out)


class _SparseEncode(torch.autograd.Function):
    """Dense encoder forward + BatchTopK selection; backward touches kept entries only.

    Everything but the encoder matmul runs under :func:`small_op_threads`.
    """

    @staticmethod
    def forward(ctx: Any, *args: Any) -> tuple[Tensor, ...]:  # type: ignore[override]
        with small_op_threads():
            return _SparseEncode._forward(ctx, *args)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        with small_op_threads():
            return _SparseEncode._backward(ctx, *grads)

    @staticmethod
    def _forward(
        ctx: Any,
        x: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        scale: Tensor | None,
        k_total: int,
        threshold_hint: float | None,
        aux_latents: Tensor | None,
        k_aux: int,
        aux_scaled: bool,
        select: Callable[..., TopKSelection] | None = None,
    ) -> tuple[Tensor, ...]:
        B = x.shape[0]
        n = W_enc.shape[1]
        pre = _encoder_preacts(x, W_enc, b_enc)
        sel = (batch_topk if select is None else select)(pre, k_total, threshold_hint, scale=scale)
        flat = pre.view(-1)
        row, col = sel.row, sel.col
        values = flat[row * n + col].relu().to(x.dtype)
        offsets = offsets_from_sorted(row, B)

        if aux_latents is not None and k_aux > 0 and aux_latents.numel() > 0:
            # per-row top-k_aux of the dead latents by scaled pre-activation (no relu, as in
            # SAELens / EleutherAI); values are the unscaled pre-activations.
            kk = min(int(k_aux), aux_latents.numel())
            sub = pre.index_select(1, aux_latents)
            sub_scores = sub
            if aux_scaled and scale is not None:
                sub_scores = sub * scale[aux_latents].to(sub.dtype)
            top = torch.topk(sub_scores, kk, dim=1, sorted=False).indices
            top, _ = torch.sort(top, dim=1)  # CSR: columns increasing within a row
            aux_col = aux_latents[top].reshape(-1)
            aux_row = torch.arange(B, device=x.device).repeat_interleave(kk)
            aux_values = sub.gather(1, top).reshape(-1).to(x.dtype)
            aux_offsets = torch.arange(B, device=x.device) * kk
        else:
            aux_col = torch.empty(0, dtype=torch.long, device=x.device)
            aux_row = aux_col
            aux_values = x.new_empty(0)
            aux_offsets = torch.zeros(B, dtype=torch.long, device=x.device)
        del pre, flat

        ctx.save_for_backward(x, W_enc, row, col, values, aux_row, aux_col)
        ctx.n = n
        ctx.b_enc_dtype = b_enc.dtype
        kth = torch.tensor(
            [sel.kth_score, float(sel.fast_path), float(sel.n_candidates)], dtype=torch.float64
        )
        ctx.mark_non_differentiable(row, col, offsets, aux_row, aux_col, aux_offsets, kth)
        return values, aux_values, row, col, offsets, aux_row, aux_col, aux_offsets, kth

    @staticmethod
    def _backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        x, W_enc, row, col, values, aux_row, aux_col = ctx.saved_tensors
        n: int = ctx.n
        g_values, g_aux = grads[0], grads[1]
        rows_parts, cols_parts, g_parts = [], [], []
        if g_values is not None:
            g_main = torch.where(values > 0, g_values, torch.zeros_like(g_values))  # relu'
            rows_parts.append(row)
            cols_parts.append(col)
            g_parts.append(g_main)
        if g_aux is not None and aux_row.numel() > 0:
            rows_parts.append(aux_row)
            cols_parts.append(aux_col)
            g_parts.append(g_aux)
        if not g_parts:
            return (None,) * 10
        rows_all = torch.cat(rows_parts) if len(rows_parts) > 1 else rows_parts[0]
        cols_all = torch.cat(cols_parts) if len(cols_parts) > 1 else cols_parts[0]
        g_all = torch.cat(g_parts) if len(g_parts) > 1 else g_parts[0]

        needs = ctx.needs_input_grad
        d_x = d_W = d_b = None
        if needs[1]:
            # dW_enc^T (n, D) = G^T x, written straight into a (D, n)-contiguous buffer:
            # no dense B x n gradient and no transpose copy.
            d_W = _latent_bag_sum(
                rows_all, cols_all, g_all, x.to(W_enc.dtype), n, latent_minor=True
            ).t()
        if needs[2]:
            d_b = torch.zeros(n, dtype=ctx.b_enc_dtype, device=g_all.device)
            d_b.index_add_(0, cols_all, g_all.to(d_b.dtype))
        if needs[0]:
            # dx = G @ W_enc^T (sparse @ dense); only when the input requires grad (e.g.
            # apply_b_dec_to_input). One row-major CSR product per part (each part's rows are
            # sorted), accumulated into one output.
            B = x.shape[0]
            out = W_enc.new_zeros(B, W_enc.shape[0])
            for r, c, gp in zip(rows_parts, cols_parts, g_parts, strict=True):
                _csr_add_times_dense_t(out, r, c, gp.to(W_enc.dtype), W_enc)
            d_x = out.to(x.dtype)
        return d_x, d_W, d_b, None, None, None, None, None, None, None


class _SparseDecode(torch.autograd.Function):
    """``f @ W_dec`` from CSR triples; backward: d values (SDDMM) and d W_dec (bag sums).
    Both run under :func:`small_op_threads`."""

    @staticmethod
    def forward(ctx: Any, *args: Any) -> Tensor:  # type: ignore[override]
        with small_op_threads():
            return _SparseDecode._forward(ctx, *args)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        with small_op_threads():
            return _SparseDecode._backward(ctx, g)

    @staticmethod
    def _forward(
        ctx: Any,
        values: Tensor,
        W_dec: Tensor,
        row: Tensor,
        col: Tensor,
        offsets: Tensor,
        n_rows: int,
    ) -> Tensor:
        if col.numel() == 0:
            out = W_dec.new_zeros(n_rows, W_dec.shape[1])
        else:
            out = F.embedding_bag(
                col, W_dec, offsets, mode="sum", per_sample_weights=values.to(W_dec.dtype)
            )
        ctx.save_for_backward(values, W_dec, row, col, offsets)
        ctx.n_rows = n_rows
        return out

    @staticmethod
    def _backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        values, W_dec, row, col, offsets = ctx.saved_tensors
        needs = ctx.needs_input_grad
        n_rows: int = ctx.n_rows
        g = g.contiguous()
        d_values = d_W = None
        if needs[0]:
            d_values = _gather_dot(g, W_dec, row, col, offsets, (n_rows, W_dec.shape[0])).to(
                values.dtype
            )
        if needs[1]:
            d_W = _latent_bag_sum(row, col, values, g.to(W_dec.dtype), W_dec.shape[0])
        return d_values, d_W, None, None, None, None
