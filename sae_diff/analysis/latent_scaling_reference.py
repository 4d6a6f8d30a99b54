"""The slow reference of Latent Scaling and the cost measurement of the one-pass version.

:func:`latent_scaling_naive` builds every per-latent target ``y_i^(j)`` (what public code does)
and sums it directly: tests check :func:`~sae_diff.analysis.latent_scaling.latent_scaling`
against it, and :func:`latent_scaling_cost_ratio` times the two (``benchmarks/``). Separate from
``latent_scaling.py`` so that the library's one-pass implementation stays one file of its own;
it shares that module's conventions (normalised space, targets, kinds) and helpers.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from sae_diff.analysis.batches import PairedBatch, iter_paired_batches
from sae_diff.analysis.latent_scaling import (
    _SHORT,
    BASE,
    FT,
    _check_ft_decoder,
    _norm_factors,
    _resolve_targets,
    latent_scaling,
)
from sae_diff.analysis.latent_scaling_result import MODELS
from sae_diff.analysis.selection import resolve_latents
from sae_diff.dictionaries import geometry
from sae_diff.dictionaries.codes import SparseCodes
from sae_diff.dictionaries.io import as_inference
from sae_diff.dictionaries.kinds import dictionary_kind
from sae_diff.dictionaries.protocol import PairedDictionary


# --------------------------------------------------------------------------------------
# reference: per-latent targets (what public code does), for tests and benchmarks
# --------------------------------------------------------------------------------------
@torch.no_grad()
def latent_scaling_naive(
    sae: PairedDictionary,
    data: Iterable[Any],
    *,
    kind: str | None = None,
    latents: Sequence[int] | torch.Tensor | None = None,
    targets: Sequence[str] | str | None = None,
    chunk: int = 64,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Slow reference: dense encode/decode and, per latent, the materialised target
    ``y_i^(j)`` (a ``latents x tokens x d`` tensor per chunk), summed directly.

    Returns ``{"beta_<target>_<model>": (L,) float64}`` like ``LatentScalingResult.betas``.
    Same normalised-space conventions as :func:`latent_scaling`.
    """
    sae = as_inference(sae)
    kind = dictionary_kind(sae, kind)
    _check_ft_decoder(sae, kind)
    tgts = _resolve_targets(kind, targets)
    S = resolve_latents(latents, int(sae.cfg.d_sae), sae.W_dec.device)
    rows = geometry.decoder_rows(sae, normalised=True).to(dtype)  # (n, M, d)
    D = rows[:, FT] if kind == "crosscoder" else rows[:, 0]
    factors = _norm_factors(sae) if kind == "crosscoder" else None
    num = {
        f"beta_{_SHORT[t]}_{m}": torch.zeros(S.numel(), dtype=torch.float64)
        for t in tgts
        for m in MODELS
    }
    C = torch.zeros(S.numel(), dtype=torch.float64)
    enc = SparseCodes(sae, kind)
    for batch in iter_paired_batches(data, progress=progress, desc="naive Latent Scaling"):
        x = batch.acts.to(sae.W_dec.device, sae.W_dec.dtype)
        f = sae.encode(enc.encoder_input(x)).to(dtype)
        xn = x.to(dtype)
        if factors is not None:
            xn = xn * factors.to(dtype)[:, None]
        if kind == "crosscoder":
            b = sae.b_dec.detach().to(dtype)
            b = b if factors is None else b * factors.to(dtype)[:, None]
            xhat = torch.einsum("bn,nmd->bmd", f, rows) + b
        for s in range(0, S.numel(), chunk):
            idx = S[s : s + chunk]
            fS = f[:, idx].T  # (L, B)
            C[s : s + chunk] += (fS * fS).sum(1).cpu().double()
            Dl = D[idx]
            for m, name in ((BASE, "base"), (FT, "ft")):
                per_latent: dict[str, torch.Tensor] = {}
                if "activation" in tgts:
                    per_latent["act"] = xn[None, :, m].expand(idx.numel(), -1, -1)
                if "reconstruction" in tgts:
                    per_latent["recon"] = xhat[None, :, m].expand(idx.numel(), -1, -1)
                if "error" in tgts:
                    # y_i^(j) = x_i^m - (xhat_i^m - f_ij d_j^m): a (L, B, d) tensor
                    per_latent["error"] = (xn[:, m] - xhat[:, m])[None] + fS[:, :, None] * rows[
                        idx, m
                    ][:, None, :]
                for short, y in per_latent.items():
                    num[f"beta_{short}_{name}"][s : s + chunk] += (
                        torch.einsum("lb,lbd,ld->l", fS, y, Dl).cpu().double()
                    )
    norm2 = (D[S] * D[S]).sum(-1).double().cpu()
    with torch.no_grad():
        return {
            k: torch.where(C > 0, v / (norm2 * C), torch.full_like(v, math.nan))
            for k, v in num.items()
        }


# --------------------------------------------------------------------------------------
# cost measurement
# --------------------------------------------------------------------------------------
def latent_scaling_cost_ratio(
    sae: PairedDictionary,
    data: Sequence[Any],
    *,
    repeats: int = 3,
    targets: Sequence[str] | str | None = None,
    naive: bool = True,
    naive_latents: int | None = None,
) -> dict[str, float]:
    """Time the one-pass all-target Latent Scaling against encoding the same data alone.

    ``data`` must be re-iterable (e.g. a list of batches already in memory, so that loading
    is not timed). Each of ``repeats`` rounds times, back to back (in rotating order),
    encode-only (``sae.encode`` per batch), Latent Scaling, and Latent Scaling with
    ``sparse_codes=False`` (codes from ``sae.encode``). Ratios are the median over rounds of
    the per-round ratio (robust to other load on a shared machine); times are the minimum. The naive per-latent reference is timed once on all
    latents, or, with ``naive_latents=k < d_sae``, on k and 2k latents and extrapolated
    linearly to all (its per-batch encode/decode is a fixed cost, the per-latent targets scale
    with the number of latents).

    Returns ``encode_s``, ``latent_scaling_s``, ``ratio`` (LS ÷ encode), ``ratio_dense_codes``
    (LS with ``sparse_codes=False`` ÷ encode) and, with ``naive``: ``naive_s`` (all latents),
    ``naive_latents_timed``, ``naive_speedup`` (naive ÷ LS).
    """
    sae = as_inference(sae)
    if not isinstance(data, Sequence) or len(data) == 0:
        raise ValueError(
            "latent_scaling_cost_ratio needs a non-empty list of batches (timed several times)."
        )
    kind = dictionary_kind(sae)
    enc = SparseCodes(sae, kind)
    batches = [PairedBatch(acts=b.acts) for b in iter_paired_batches(data, progress=False)]

    @torch.no_grad()
    def encode_only() -> None:
        for b in batches:
            sae.encode(enc.encoder_input(b.acts.to(sae.W_dec.device, sae.W_dec.dtype)))

    def one_pass(sparse_codes: bool = True) -> None:
        latent_scaling(
            sae,
            batches,
            targets=targets,
            progress=False,
            firing_shift=False,
            sparse_codes=sparse_codes,
        )

    encode_only()  # warm-up
    one_pass()
    runs: dict[str, list[float]] = {"enc": [], "ls": [], "ls_dense": []}
    fns = {"enc": encode_only, "ls": one_pass, "ls_dense": lambda: one_pass(False)}
    for r in range(max(1, repeats)):
        keys = list(fns)[r % 3 :] + list(fns)[: r % 3]  # rotate the order: no phase is always first
        for key in keys:
            t0 = time.perf_counter()
            fns[key]()
            runs[key].append(time.perf_counter() - t0)
    med = statistics.median
    out = {
        "encode_s": min(runs["enc"]),
        "latent_scaling_s": min(runs["ls"]),
        "ratio": med(ls / e for ls, e in zip(runs["ls"], runs["enc"])),
        "ratio_dense_codes": med(ls / e for ls, e in zip(runs["ls_dense"], runs["enc"])),
    }
    if naive:
        n = int(sae.cfg.d_sae)

        def time_naive(k: int) -> float:
            t0 = time.perf_counter()
            latent_scaling_naive(
                sae, batches, targets=targets, latents=torch.arange(k), dtype=sae.W_dec.dtype
            )
            return time.perf_counter() - t0

        k = n if naive_latents is None else max(1, min(int(naive_latents), n))
        if 2 * k > n:
            k, t_naive = n, time_naive(n)
        else:
            t1, t2 = time_naive(k), time_naive(2 * k)
            t_naive = t1 + max(t2 - t1, 0.0) * (n - k) / k
        out.update(
            {
                "naive_s": t_naive,
                "naive_latents_timed": float(k),
                "naive_speedup": t_naive / out["latent_scaling_s"],
            }
        )
    return out


__all__ = ["latent_scaling_cost_ratio", "latent_scaling_naive"]
