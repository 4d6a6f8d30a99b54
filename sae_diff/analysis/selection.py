"""Latent selection: which latents of a dictionary an analysis, a patch or the report looks at.

One module for every rule that turns a dictionary and its latent table into a set or an order
of latent ids, so KL patching (:mod:`sae_diff.evaluation.patching`), the intervention hooks
and the diffing-game report (:mod:`sae_diff.report.scoreboard`) select the same latents the same way:

- :func:`latent_indices`: ids from a mask, a list of ids or a pandas Series;
- :func:`resolve_latents`: the ``latents=`` argument of the analysis passes (order kept);
- :func:`ft_only_latents`: crosscoder latents with Δ < 0.1 (METHODS §1);
- :func:`nu_scores`, :func:`nu_threshold_latents`, :func:`nu_rank_latents`: Latent Scaling
  filters (METHODS §2);
- :func:`random_latents`: the random baselines' draws;
- :func:`ft_specific_ranking`, :func:`nu_filter`: the report's ranking and ν filter over a
  latent table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import pandas as pd
import torch

from sae_diff.dictionaries.geometry import FT_ONLY_MAX, relative_norm
from sae_diff.dictionaries.io import as_inference
from sae_diff.dictionaries.protocol import PairedDictionary

LatentSpec: TypeAlias = torch.Tensor | Sequence[int] | np.ndarray | pd.Series
#: Latent Scaling ratios as :func:`nu_scores` reads them: per-latent values or a ν DataFrame
NuLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[float] | pd.Series | pd.DataFrame


def latent_indices(spec: LatentSpec, d_sae: int) -> torch.Tensor:
    """Latent ids ``(k,)`` from a bool mask over latents, ids, or a pandas Series (bool values,
    or ids as values). Raises on ids out of range."""
    if isinstance(spec, pd.Series):
        if spec.dtype == bool:
            spec = spec.reindex(range(d_sae), fill_value=False)
        spec = spec.to_numpy()
    if isinstance(spec, torch.Tensor):
        t = spec.detach().cpu()
    else:
        t = torch.as_tensor(np.array(spec))
    if t.dtype == torch.bool:
        if t.numel() != d_sae:
            raise ValueError(f"a boolean latent mask needs {d_sae} entries, got {t.numel()}")
        return t.nonzero().flatten()
    t = t.flatten().long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= d_sae):
        raise ValueError(f"latent ids must lie in [0, {d_sae}); got {int(t.min())}..{int(t.max())}")
    return t.unique()


def resolve_latents(
    latents: Sequence[int] | torch.Tensor | None, n: int, device: torch.device
) -> torch.Tensor:
    """The latents an analysis pass reads, in the caller's order: ids ``(k,)`` on ``device``.

    ``None`` = all ``n``; a bool mask of ``n`` entries; or ids. Unlike :func:`latent_indices`
    (a set, sorted) the order is kept and an empty or repeated subset is an error, since the
    per-latent results are aligned with it.
    """
    if latents is None:
        return torch.arange(n, device=device)
    t = torch.as_tensor(latents, device=device)
    if t.dtype == torch.bool:
        if t.numel() != n:
            raise ValueError(f"A boolean latent mask needs {n} entries (d_sae), got {t.numel()}.")
        t = t.nonzero().squeeze(1)
    t = t.reshape(-1).long()
    if t.numel() == 0:
        raise ValueError("The latent subset is empty: pass None for all latents or some indices.")
    if (t < 0).any() or (t >= n).any():
        raise ValueError(
            f"Latent indices must lie in [0, {n}) (d_sae), got min {int(t.min())}, max {int(t.max())}."
        )
    if t.unique().numel() != t.numel():
        raise ValueError("The latent subset has repeated indices; pass each latent once.")
    return t


def ft_only_latents(sae: PairedDictionary, max_delta: float = FT_ONLY_MAX) -> torch.Tensor:
    """Crosscoder latents with relative decoder norm Δ < ``max_delta`` (ft-only, METHODS §1)."""
    # function-level: sae_diff.evaluation's package __init__ imports patching, which imports
    # this module, so a module-level import here fails at runtime when selection loads first
    from sae_diff.evaluation.stitching import patchable_kind

    sae = as_inference(sae)
    if patchable_kind(sae) != "crosscoder":
        raise ValueError("ft-only latents by Δ need a crosscoder (a decoder per model).")
    return (relative_norm(sae).cpu() < max_delta).nonzero().flatten()


def nu_scores(nu: NuLike, d_sae: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank score, threshold score) per latent from Latent Scaling ratios; NaN = unknown.

    ``nu`` may be a tensor ``(d_sae,)`` / array / pandas Series indexed by latent id (used for
    both), or a DataFrame (e.g. ``LatentScalingResult.to_frame()`` or the latent table) with
    columns ``nu_eps`` and ``nu_r`` or ``nu_error`` and ``nu_recon`` (rank by ν_ε + ν_r,
    threshold on max(ν_ε, ν_r)), ``nu_act``, or ``nu``; a
    ``latent`` column, if present, gives the latent ids, else the index does.
    """

    def full(s: pd.Series) -> torch.Tensor:
        s = s.astype(float).reindex(range(d_sae))
        return torch.tensor(s.to_numpy(), dtype=torch.float64)

    if isinstance(nu, pd.DataFrame):
        df = nu.set_index("latent") if "latent" in nu.columns else nu
        for eps_col, r_col in (("nu_eps", "nu_r"), ("nu_error", "nu_recon")):
            if {eps_col, r_col} <= set(df.columns):
                e, r = full(df[eps_col]), full(df[r_col])
                return e + r, torch.maximum(e, r)
        for col in ("nu_act", "nu"):
            if col in df.columns:
                t = full(df[col])
                return t, t
        raise ValueError(
            "a ν DataFrame needs columns 'nu_eps' and 'nu_r' (or 'nu_error' and 'nu_recon'), "
            "or 'nu_act', or 'nu'; got "
            f"{list(df.columns)}"
        )
    if isinstance(nu, pd.Series):
        t = full(nu)
        return t, t
    t = (
        torch.as_tensor(np.asarray(nu) if not isinstance(nu, torch.Tensor) else nu)
        .double()
        .flatten()
    )
    if t.numel() != d_sae:
        raise ValueError(f"ν needs one value per latent ({d_sae}), got {t.numel()}")
    return t.cpu(), t.cpu()


def nu_threshold_latents(
    score: torch.Tensor, threshold: float, pool: torch.Tensor | None = None
) -> torch.Tensor:
    """Latents in ``pool`` (ids; default all) with a finite ν score ``< threshold``."""
    ok = torch.isfinite(score) & (score < threshold)
    if pool is not None:
        keep = torch.zeros_like(ok)
        keep[pool] = True
        ok &= keep
    return ok.nonzero().flatten()


def nu_rank_latents(
    score: torch.Tensor,
    fraction: float = 0.5,
    pool: torch.Tensor | None = None,
    lowest: bool = True,
) -> torch.Tensor:
    """The ``fraction`` of ``pool``'s latents (with a finite score) with the lowest (or highest)
    ν score: "rank by Latent Scaling"."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    ids = torch.arange(score.numel()) if pool is None else pool
    ids = ids[torch.isfinite(score[ids])]
    k = int(math.ceil(fraction * ids.numel()))
    order = torch.argsort(score[ids], descending=not lowest, stable=True)
    return ids[order[:k]].sort().values


def random_latents(k: int, pool: torch.Tensor | int, seed: int) -> torch.Tensor:
    """``k`` distinct latents drawn uniformly from ``pool`` (ids, or ``range(pool)``)."""
    ids = torch.arange(pool) if isinstance(pool, int) else pool
    if k > ids.numel():
        raise ValueError(f"cannot draw {k} latents from a pool of {ids.numel()}")
    g = torch.Generator().manual_seed(seed)
    return ids[torch.randperm(ids.numel(), generator=g)[:k]].sort().values


def ft_specific_ranking(table: pd.DataFrame, kind: str) -> torch.Tensor:
    """Latents ordered by how ft-specific they look; never-active latents are dropped.

    Crosscoders: Δ ascending (0 = ft-only), ties by firing count descending. Diff-SAE: every
    latent is a piece of the difference, so Latent Scaling's ν_act says how much of it the ft
    activation explains alone: |ν_act| ascending (missing ν last), then firing count
    descending. Chat-SAE (ft SAE): |ν_act| ascending (ν near 0 = the base cannot explain the
    latent's activation, i.e. ft-specific), missing ν last, then firing count descending."""
    live = table[table.get("count_active", pd.Series(1, index=table.index)) > 0]
    if kind == "crosscoder":
        order = live.sort_values(
            ["delta", "count_active"], ascending=[True, False], kind="mergesort"
        )
    else:
        order = live.assign(_nu=live["nu_act"].abs().fillna(math.inf)).sort_values(
            ["_nu", "count_active"], ascending=[True, False], kind="mergesort"
        )
    return torch.tensor(order.index.to_numpy(), dtype=torch.long)


def nu_filter(table: pd.DataFrame, kind: str, nu_eps_max: float, nu_r_max: float) -> pd.Series:
    """Latents of a latent table that survive the ν filter (genuinely ft-specific per Latent
    Scaling): crosscoders keep ``ft_only`` latents with ``nu_error < nu_eps_max`` and
    ``nu_recon < nu_r_max``; other dictionaries latents with ``|nu_act| < nu_eps_max``."""
    if kind == "crosscoder":
        return (
            (table["tag"] == "ft_only")
            & (table["nu_error"] < nu_eps_max)
            & (table["nu_recon"] < nu_r_max)
        )
    return table["nu_act"].abs() < nu_eps_max


__all__ = [
    "LatentSpec",
    "NuLike",
    "ft_only_latents",
    "ft_specific_ranking",
    "latent_indices",
    "nu_filter",
    "nu_rank_latents",
    "nu_scores",
    "nu_threshold_latents",
    "random_latents",
    "resolve_latents",
]
