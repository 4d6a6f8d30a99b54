"""Equivalence tests: sparse BatchTopK kernels vs the dense reference (outputs and grads)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sae_diff.dictionaries import kernels as K
from sae_diff.dictionaries.kernels import (
    SparseCode,
    batch_topk,
    dense_batchtopk_reference,
    make_adam,
    sparse_batchtopk_encode_decode,
    sparse_decode,
    sparse_encode,
)


def _flat_set(row: torch.Tensor, col: torch.Tensor, n: int) -> set[int]:
    return set((row * n + col).tolist())


def _topk_set(v: torch.Tensor, k_total: int) -> set[int]:
    return set(torch.topk(v.flatten(), k_total).indices.tolist())


# ------------------------------------------------------------------------------- selection


@pytest.mark.parametrize("scaled", [False, True])
def test_batch_topk_matches_flat_topk_fast_path(scaled: bool) -> None:
    B, n, k = 64, 2048, 8  # 131k entries: above the fast-path size
    pre = torch.randn(B, n)
    scale = torch.rand(n) + 0.5 if scaled else None
    v = pre.relu() * scale if scale is not None else pre.relu()
    sel = batch_topk(pre, B * k, scale=scale)
    assert sel.fast_path, "the sampled threshold should succeed on Gaussian scores"
    assert sel.row.numel() == B * k
    assert _flat_set(sel.row, sel.col, n) == _topk_set(v, B * k)
    flat = sel.row * n + sel.col
    assert torch.all(flat[1:] > flat[:-1]), "row-major order"
    assert torch.equal(sel.scores, v.flatten()[flat])
    assert sel.kth_score == float(torch.topk(v.flatten(), B * k).values.min())
    assert sel.n_candidates < 4 * B * k


def test_batch_topk_bad_hints_fall_back_and_stay_exact() -> None:
    B, n, k = 64, 2048, 8
    pre = torch.randn(B, n)
    ref = _topk_set(pre.relu(), B * k)
    kth = float(torch.topk(pre.flatten(), B * k).values.min())
    for hint in [kth * 1.5, kth * 0.999, kth * 0.5, 1e-9, 1e9, -1.0]:
        sel = batch_topk(pre, B * k, threshold_hint=hint)
        assert _flat_set(sel.row, sel.col, n) == ref, hint
    slow = batch_topk(pre, B * k, force_slow=True)
    assert not slow.fast_path
    assert _flat_set(slow.row, slow.col, n) == ref


def test_batch_topk_uses_plausible_hint() -> None:
    B, n, k = 64, 2048, 8
    pre = torch.randn(B, n)
    vals = torch.topk(pre.flatten(), 3 * B * k).values
    hint = float(vals[-1])  # ~3K candidates: plausible, used first
    sel = batch_topk(pre, B * k, threshold_hint=hint)
    assert sel.fast_path and sel.n_candidates == 3 * B * k


@pytest.mark.parametrize("force_slow", [False, True])
def test_batch_topk_ties_lowest_flat_index_wins(force_slow: bool) -> None:
    B, n, k = 32, 4096, 4
    # integer scores in 1..6: massive ties at the boundary
    pre = torch.randint(-6, 7, (B, n)).float()
    k_total = B * k
    sel = batch_topk(pre, k_total, force_slow=force_slow)
    v = pre.relu().flatten()
    top_vals = torch.topk(v, k_total).values
    assert sel.row.numel() == k_total
    assert torch.equal(torch.sort(sel.scores).values, torch.sort(top_vals).values)
    kth = float(top_vals.min())
    flat = sel.row * n + sel.col
    # everything strictly above the boundary is kept ...
    assert _flat_set(sel.row, sel.col, n) >= set(torch.nonzero(v > kth).view(-1).tolist())
    # ... and the tied ones kept are the lowest flat indices among the ties
    tied = torch.nonzero(v == kth).view(-1)
    kept_tied = flat[v[flat] == kth]
    assert torch.equal(kept_tied, tied[: kept_tied.numel()])


def test_batch_topk_fast_equals_slow_with_ties_and_scale() -> None:
    B, n, k = 32, 4096, 4
    pre = torch.randint(-3, 8, (B, n)).float() / 4
    scale = torch.randint(1, 4, (n,)).float()
    a = batch_topk(pre, B * k, scale=scale)
    b = batch_topk(pre, B * k, scale=scale, force_slow=True)
    assert torch.equal(a.row, b.row) and torch.equal(a.col, b.col)


def test_batch_topk_fewer_positive_than_k_keeps_zeros() -> None:
    B, n = 16, 8192
    pre = -torch.rand(B, n)
    pre[0, :5] = 1.0
    sel = batch_topk(pre, 64)
    assert sel.row.numel() == 64
    assert int((sel.scores > 0).sum()) == 5
    assert sel.kth_score == 0.0


def test_batch_topk_scale_zero_latent_never_beats_positive() -> None:
    B, n, k = 64, 2048, 4
    pre = torch.randn(B, n)
    pre[:, 7] = 100.0
    scale = torch.ones(n)
    scale[7] = 0.0
    sel = batch_topk(pre, B * k, scale=scale)
    assert not bool((sel.col == 7).any())


# ------------------------------------------------------------------------- encode/decode


def _problem(dtype: torch.dtype, B: int = 24, D: int = 20, n: int = 3000, scaled: bool = True):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    W_enc = (torch.randn(D, n, generator=g, dtype=dtype) * 0.3).requires_grad_()
    b_enc = (torch.randn(n, generator=g, dtype=dtype) * 0.1).requires_grad_()
    W_dec = (torch.randn(n, D, generator=g, dtype=dtype) * 0.3).requires_grad_()
    b_dec = (torch.randn(D, generator=g, dtype=dtype) * 0.1).requires_grad_()
    scale = W_dec.detach().norm(dim=1) if scaled else None
    return x, W_enc, b_enc, W_dec, b_dec, scale


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("scaled", [False, True])
def test_encode_decode_matches_dense_reference(
    dtype: torch.dtype, tol: float, scaled: bool
) -> None:
    x, W_enc, b_enc, W_dec, b_dec, scale = _problem(dtype, scaled=scaled)
    k = 5.0
    params = [W_enc, b_enc, W_dec, b_dec]
    f_ref, xhat_ref = dense_batchtopk_reference(x, W_enc, b_enc, W_dec, b_dec, k, scale=scale)
    w = torch.randn(f_ref.shape[1], dtype=dtype)  # a loss that also reads the code directly
    loss_ref = (x - xhat_ref).pow(2).sum(-1).mean() + (f_ref * w).sum() * 1e-2
    g_ref = _grads(loss_ref, params)

    out = sparse_batchtopk_encode_decode(x, W_enc, b_enc, W_dec, b_dec, k, scale=scale)
    code = out.code
    assert out.fast_path  # 24 x 3000 entries: the sampled-threshold path is exercised
    assert code.values.numel() == x.shape[0] * int(k)  # B * k entries
    assert torch.equal(code.to_dense().detach() != 0, f_ref.detach() != 0)
    torch.testing.assert_close(code.to_dense(), f_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(out.xhat, xhat_ref, rtol=tol, atol=tol)
    loss = (x - out.xhat).pow(2).sum(-1).mean() + (code.values * w[code.col]).sum() * 1e-2
    torch.testing.assert_close(loss, loss_ref, rtol=tol, atol=tol)
    for a, b in zip(_grads(loss, params), g_ref):
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10)


def test_encode_input_grad_when_required() -> None:
    x, W_enc, b_enc, W_dec, b_dec, scale = _problem(torch.float64)
    x.requires_grad_()
    f_ref, xhat_ref = dense_batchtopk_reference(x, W_enc, b_enc, W_dec, b_dec, 4, scale=scale)
    (gx_ref,) = torch.autograd.grad(xhat_ref.square().sum(), [x])
    out = sparse_batchtopk_encode_decode(x, W_enc, b_enc, W_dec, b_dec, 4, scale=scale)
    (gx,) = torch.autograd.grad(out.xhat.square().sum(), [x])
    torch.testing.assert_close(gx, gx_ref)


def test_relu_gradient_zero_for_kept_zeros() -> None:
    """Kept entries with p == 0 (fewer positives than K) get no gradient, as in the dense path."""
    x, W_enc, b_enc, W_dec, b_dec, _ = _problem(torch.float64, n=200)
    with torch.no_grad():
        b_enc.sub_(50.0)  # almost everything negative
        b_enc[:3] = 5.0
    out = sparse_batchtopk_encode_decode(x, W_enc, b_enc, W_dec, b_dec, 4.0)
    f_ref, xhat_ref = dense_batchtopk_reference(x, W_enc, b_enc, W_dec, b_dec, 4.0)
    params = [W_enc, b_enc, W_dec, b_dec]
    for a, b in zip(
        _grads(out.xhat.square().sum(), params), _grads(xhat_ref.square().sum(), params)
    ):
        torch.testing.assert_close(a, b)


def test_aux_dead_latents_match_dense() -> None:
    """Aux entries: per-row top k_aux dead latents by scaled pre-activation, raw values."""
    x, W_enc, b_enc, W_dec, b_dec, scale = _problem(torch.float64, n=500)
    dead = torch.arange(0, 500, 3)
    k_aux = 6
    out = sparse_batchtopk_encode_decode(
        x, W_enc, b_enc, W_dec, b_dec, 4, scale=scale, aux_latents=dead, k_aux=k_aux
    )
    assert out.aux_code is not None and out.aux_recon is not None
    # dense (SAELens calculate_topk_aux_acts, rescaled then un-rescaled)
    pre = x @ W_enc + b_enc
    mask = torch.zeros(500, dtype=torch.bool)
    mask[dead] = True
    hp = pre * scale
    sel = torch.where(mask[None], hp, -torch.inf).topk(k_aux, sorted=False).indices
    aux_acts = torch.zeros_like(pre).scatter(-1, sel, pre.gather(-1, sel))
    recon_ref = aux_acts @ W_dec
    torch.testing.assert_close(out.aux_recon, recon_ref)
    params = [W_enc, b_enc, W_dec]
    for a, b in zip(
        _grads(out.aux_recon.square().sum(), params), _grads(recon_ref.square().sum(), params)
    ):
        torch.testing.assert_close(a, b)


def test_sparse_decode_variable_counts_and_empty_rows() -> None:
    n, D, B = 50, 7, 5
    W = torch.randn(n, D, dtype=torch.float64, requires_grad=True)
    row = torch.tensor([0, 0, 0, 2, 4, 4])
    col = torch.tensor([1, 5, 9, 5, 0, 49])
    vals = torch.rand(6, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([0, 3, 3, 4, 4])
    code = SparseCode(row, col, vals, offsets, (B, n))
    out = sparse_decode(code, W)
    ref = code.to_dense() @ W
    torch.testing.assert_close(out, ref)
    assert torch.all(out[[1, 3]] == 0)
    gv, gW = torch.autograd.grad((out * torch.arange(D)).sum(), [vals, W])
    gv_r, gW_r = torch.autograd.grad((ref * torch.arange(D)).sum(), [vals, W])
    torch.testing.assert_close(gv, gv_r)
    torch.testing.assert_close(gW, gW_r)
    assert torch.autograd.gradcheck(
        lambda v, w: sparse_decode(SparseCode(row, col, v, offsets, (B, n)), w), (vals, W)
    )


def test_sparse_encode_gradcheck() -> None:
    x, W_enc, b_enc, _, _, scale = _problem(torch.float64, B=6, D=4, n=40)

    def f(W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        code, _, _ = sparse_encode(x, W, b, 12, scale=scale)
        return code.values

    assert torch.autograd.gradcheck(f, (W_enc, b_enc))


def test_autocast_bf16_runs_encoder_in_bf16() -> None:
    x, W_enc, b_enc, W_dec, b_dec, scale = _problem(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse_batchtopk_encode_decode(x, W_enc, b_enc, W_dec, b_dec, 5, scale=scale)
    assert out.xhat.dtype == torch.float32
    ref = sparse_batchtopk_encode_decode(x, W_enc, b_enc, W_dec, b_dec, 5, scale=scale)
    rel = (out.xhat - ref.xhat).detach().norm() / ref.xhat.detach().norm()
    assert 0 < float(rel) < 0.05
    out.xhat.sum().backward()
    assert W_enc.grad is not None and W_enc.grad.dtype == torch.float32


def test_gather_dot_fallback_matches() -> None:
    g = torch.randn(4, 6, dtype=torch.float64)
    W = torch.randn(10, 6, dtype=torch.float64)
    row = torch.tensor([0, 0, 1, 3])
    col = torch.tensor([2, 7, 2, 9])
    offsets = torch.tensor([0, 2, 3, 3])
    got = K._gather_dot(g, W, row, col, offsets, (4, 10))
    torch.testing.assert_close(got, (g @ W.t())[row, col])


def test_make_adam_fused_on_cpu_same_update() -> None:
    p1 = torch.nn.Parameter(torch.randn(5, 3))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1 = make_adam([p1], lr=1e-2)
    o2 = torch.optim.Adam([p2], lr=1e-2)
    for _ in range(3):
        g = torch.randn(5, 3)
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert o1.defaults["fused"] == K.fused_adam_supported("cpu")
    torch.testing.assert_close(p1, p2)


@pytest.mark.parametrize("latent_minor", [False, True])
def test_latent_bag_sum_layouts_and_ignores_garbage(latent_minor: bool) -> None:
    B, D, n = 6, 5, 9
    rows = torch.tensor([0, 1, 1, 5, 3])
    cols = torch.tensor([8, 2, 8, 0, 2])
    w = torch.randn(5, dtype=torch.float64)
    table = torch.randn(B, D, dtype=torch.float64)
    G = torch.zeros(B, n, dtype=torch.float64).index_put((rows, cols), w, accumulate=True)
    out = K._latent_bag_sum(rows, cols, w, table, n, latent_minor=latent_minor)
    torch.testing.assert_close(out, G.t() @ table)
    assert out.t().is_contiguous() == latent_minor
    # beta=0 must not read the (uninitialised) output: NaN garbage stays out
    buf = torch.full((n, D), float("nan"), dtype=torch.float64)
    Gt = (G.t()).to_sparse_csr()
    torch.addmm(buf, Gt, table, beta=0.0, out=buf)
    torch.testing.assert_close(buf, G.t() @ table)


def test_encoder_weight_grad_is_contiguous() -> None:
    x, W_enc, b_enc, W_dec, b_dec, scale = _problem(torch.float32)
    out = sparse_batchtopk_encode_decode(x, W_enc, b_enc, W_dec, b_dec, 4, scale=scale)
    out.xhat.square().sum().backward()
    assert W_enc.grad is not None and W_enc.grad.is_contiguous()


# --------------------------------------------------------------------------- thread policy


def test_small_op_threads_serialise_all_but_the_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sparse step's small ops run on one thread, its encoder matmul on the caller's count;
    the caller's setting is restored, and the result does not depend on the policy."""
    seen: dict[str, list[int]] = {"addmm": [], "argsort": []}
    real_addmm, real_argsort = torch.addmm, torch.argsort

    def addmm(*a: Any, **k: Any) -> torch.Tensor:
        seen["addmm"].append(torch.get_num_threads())
        return real_addmm(*a, **k)

    def argsort(*a: Any, **k: Any) -> torch.Tensor:
        seen["argsort"].append(torch.get_num_threads())
        return real_argsort(*a, **k)

    torch.manual_seed(0)
    B, D, n, k = 32, 24, 4096, 4
    x = torch.randn(B, D)
    W = torch.randn(D, n, requires_grad=True)
    b = torch.zeros(n, requires_grad=True)
    Wd = torch.randn(n, D, requires_grad=True)
    bd = torch.zeros(D, requires_grad=True)
    before = torch.get_num_threads()
    results = []
    try:
        torch.set_num_threads(2)
        for policy in (1, None):
            K.set_small_op_threads(policy)
            seen["addmm"].clear()
            seen["argsort"].clear()
            monkeypatch.setattr(torch, "addmm", addmm)
            monkeypatch.setattr(torch, "argsort", argsort)
            out = sparse_batchtopk_encode_decode(x, W, b, Wd, bd, k)
            out.xhat.pow(2).sum().backward()
            monkeypatch.undo()
            assert torch.get_num_threads() == 2
            assert seen["addmm"][0] == 2  # the encoder matmul: all threads
            expect = 1 if policy == 1 else 2
            assert seen["argsort"] and set(seen["argsort"]) == {expect}  # backward bag sums
            assert W.grad is not None and Wd.grad is not None
            results.append((out.xhat.detach().clone(), W.grad.clone(), Wd.grad.clone()))
            W.grad = b.grad = Wd.grad = bd.grad = None
    finally:
        K.set_small_op_threads(1)
        torch.set_num_threads(before)
    for a, c in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(a, c)
    with pytest.raises(ValueError, match="set_small_op_threads"):
        K.set_small_op_threads(0)
