"""Which interventions KL patching runs for one dictionary: the rows of its table block.

For a dictionary :func:`dictionary_rows` lists the full reconstruction and its error, then each
targeted latent subset (ft-only by Δ, the Latent Scaling ν filters and ranks of METHODS.md §4,
user subsets) followed by its random equal-size baselines (one row per seed, drawn from the
subset's candidate pool), and the ft-only steering row. Rows that would compute the same patch
(the same random draw for two subsets) share an ``engine_key`` so the engine runs it once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from sae_diff.analysis.selection import (
    LatentSpec,
    NuLike,
    ft_only_latents,
    latent_indices,
    nu_rank_latents,
    nu_scores,
    nu_threshold_latents,
    random_latents,
)
from sae_diff.dictionaries.geometry import FT_ONLY_MAX
from sae_diff.evaluation.interventions import (
    DictionaryPatcher,
    Intervention,
    error_patch,
    reconstruction_patch,
    steering_patch,
    subset_patch,
)

__all__ = ["PatchRow", "dictionary_rows"]


@dataclass
class PatchRow:
    """One intervention of the table: key, kind, description, size and the patch."""

    key: str
    kind: str
    description: str
    n_latents: int | None
    fn: Intervention | None = None
    random_of: str | None = None
    seed: int | None = None
    engine_key: str | None = None  # rows with the same key share one evaluation


def dictionary_rows(
    name: str,
    patcher: DictionaryPatcher,
    *,
    nu: NuLike | None,
    nu_thresholds: Sequence[float],
    nu_rank_fraction: float | None,
    subsets: Mapping[str, LatentSpec],
    ft_only: bool,
    steering: bool,
    steering_scale: float,
    random_seeds: int,
    random_pool: LatentSpec | None,
) -> list[PatchRow]:
    p = patcher
    rows = [
        PatchRow(
            "reconstruction",
            "reconstruction",
            "x^b + Dhat (full reconstruction)",
            p.d_sae,
            reconstruction_patch(p),
        ),
        PatchRow("error", "error", "x^b + (D - Dhat) (dictionary error)", None, error_patch(p)),
    ]
    targeted: list[tuple[str, str, torch.Tensor, torch.Tensor | None]] = []
    pool_ft: torch.Tensor | None = None
    if p.kind == "crosscoder" and (ft_only or steering or nu is not None):
        pool_ft = ft_only_latents(p.sae)
    if p.kind == "crosscoder" and ft_only:
        assert pool_ft is not None
        targeted.append(("ft_only", f"ft-only latents (Δ<{FT_ONLY_MAX})", pool_ft, None))
    if nu is not None:
        rank_s, thr_s = nu_scores(nu, p.d_sae)
        # candidates: latents with a known ν (ft-only ones for crosscoders); random baselines
        # are drawn from the same pool, so they are alive latents too
        known = (torch.isfinite(rank_s) & torch.isfinite(thr_s)).nonzero().flatten()
        nu_pool = known if pool_ft is None else known[torch.isin(known, pool_ft)]
        where = "ft-only latents with known ν" if p.kind == "crosscoder" else "latents with known ν"
        for t in nu_thresholds:
            targeted.append(
                (
                    f"nu<{t:g}",
                    f"{where} with ν < {t:g}",
                    nu_threshold_latents(thr_s, t, nu_pool),
                    nu_pool,
                )
            )
        if nu_rank_fraction is not None:
            pct = f"{100 * nu_rank_fraction:g}%"
            targeted.append(
                (
                    f"nu_low{pct}",
                    f"lowest-ν {pct} of {where}",
                    nu_rank_latents(rank_s, nu_rank_fraction, nu_pool, lowest=True),
                    nu_pool,
                )
            )
            targeted.append(
                (
                    f"nu_high{pct}",
                    f"highest-ν {pct} of {where}",
                    nu_rank_latents(rank_s, nu_rank_fraction, nu_pool, lowest=False),
                    nu_pool,
                )
            )
    for key, spec in subsets.items():
        targeted.append((key, f"user subset {key!r}", latent_indices(spec, p.d_sae), None))
    user_pool = None if random_pool is None else latent_indices(random_pool, p.d_sae)
    for key, desc, ids, cand in targeted:
        rows.append(
            PatchRow(f"subset:{key}", "subset", desc, int(ids.numel()), subset_patch(p, ids))
        )
        draw_from: torch.Tensor | int = (
            user_pool if user_pool is not None else (cand if cand is not None else p.d_sae)
        )
        size = draw_from if isinstance(draw_from, int) else int(draw_from.numel())
        if random_seeds > 0 and 0 < ids.numel() <= size:
            pool_desc = "all latents" if isinstance(draw_from, int) else f"a pool of {size}"
            pool_id = "all" if isinstance(draw_from, int) else str(hash(tuple(draw_from.tolist())))
            for s in range(random_seeds):
                r = random_latents(int(ids.numel()), draw_from, seed=s)
                rows.append(
                    PatchRow(
                        f"random:{key}",
                        "random",
                        f"random {ids.numel()} latents from {pool_desc} ({random_seeds} seeds)",
                        int(ids.numel()),
                        subset_patch(p, r),
                        random_of=f"subset:{key}",
                        seed=s,
                        engine_key=f"random\0{ids.numel()}\0{pool_id}\0{s}",
                    )
                )
    if steering and p.kind == "crosscoder" and pool_ft is not None:
        rows.append(
            PatchRow(
                "steering:ft_only",
                "steering",
                f"x^b + {steering_scale:g} * sum_(ft-only) f_j d_j^c",
                int(pool_ft.numel()),
                steering_patch(p, pool_ft, steering_scale),
            )
        )
    return rows
