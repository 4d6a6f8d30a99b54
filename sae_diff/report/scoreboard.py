"""The scoreboard: each method's figures per seed (FVE, L0, dead latents, KL gap closed, ...)
and their summary over seeds, plus how a method's candidate latents are chosen and encoded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch

from sae_diff.analysis import selection
from sae_diff.data.store import select_mode
from sae_diff.dictionaries.protocol import PairedDictionary
from sae_diff.dictionaries.specs import StoreMode
from sae_diff.report.config import DemoConfig
from sae_diff.report.methods import METHODS
from sae_diff.training.evaluator import fraction_of_variance_explained


def encode_tokens(sae: PairedDictionary, kind: str, acts: torch.Tensor) -> torch.Tensor:
    """Codes ``(N, S, d_sae)`` of paired activations ``(N, S, 2, d)`` for any method."""
    with torch.no_grad():
        if kind == "ft_sae":
            return sae.encode(acts[..., 1, :])
        return sae.encode(acts)


def ft_specific_ranking(table: pd.DataFrame, kind: str) -> torch.Tensor:
    """:func:`sae_diff.analysis.selection.ft_specific_ranking` (latents ordered by how
    ft-specific they look; never-active latents dropped)."""
    return selection.ft_specific_ranking(table, kind)


def nu_filter(table: pd.DataFrame, kind: str, cfg: DemoConfig) -> pd.Series:
    """Latents that survive the ν filter (:func:`sae_diff.analysis.selection.nu_filter` with
    the demo's thresholds)."""
    return selection.nu_filter(table, kind, cfg.nu_eps_max, cfg.nu_r_max)


def method_rows(
    cfg: DemoConfig,
    dictionaries: Mapping[str, PairedDictionary],
    tables: Mapping[str, pd.DataFrame],
    gap: pd.DataFrame,
    sample: torch.Tensor,
) -> list[dict[str, Any]]:
    """One seed's per-method figures: FVE, L0, dead fraction, ft-only counts, KL gap closed."""
    rows = []
    for name, sae in dictionaries.items():
        kind = METHODS[name]["kind"]
        table = tables[name]
        fve = fve_per_model(sae, METHODS[name]["mode"], sample)
        row: dict[str, Any] = {
            "method": name,
            "architecture": METHODS[name]["architecture"],
            "d_sae": int(sae.cfg.d_sae),
            "fve_base": rounded(fve.get("base", float("nan"))),
            "fve_ft": rounded(fve.get("ft", float("nan"))),
            "fve_diff": rounded(fve.get("diff", float("nan"))),
            "l0": rounded(fve["l0"]),
            "dead_fraction": rounded((table["count_active"] == 0).mean()),
            "n_ft_only": int((table["tag"] == "ft_only").sum()) if kind == "crosscoder" else None,
            "n_nu_filtered": int(nu_filter(table, kind, cfg).sum()),
        }
        if name in gap.index:
            g = gap.loc[name]
            row.update(
                {
                    "kl_closed_reconstruction": rounded(g["reconstruction"]),
                    "kl_closed_error": rounded(g["error"]),
                    "kl_closed_nu_subset": rounded(g["nu_subset_closed"]),
                    "kl_nu_subset": g["nu_subset"],
                    "kl_closed_random": rounded(g["nu_random"]),
                    "kl_closed_random_std": rounded(g["nu_random_std"]),
                }
            )
        rows.append(row)
    return rows


def crosscoder_artefacts(
    cfg: DemoConfig, tables: Mapping[str, pd.DataFrame]
) -> dict[str, dict[str, Any]]:
    """Per crosscoder: ft-only latents and how many Latent Scaling marks as artefacts."""
    out: dict[str, dict[str, Any]] = {}
    for name in ("l1_crosscoder", "batchtopk_crosscoder"):
        if name not in tables:
            continue
        t = tables[name]
        ft = t[(t["tag"] == "ft_only") & (t["count_active"] >= 1)]
        measured = ft.dropna(subset=["nu_error", "nu_recon"])
        out[name] = {
            "n_ft_only": int(len(ft)),
            "min_delta_active": rounded(t.loc[t["count_active"] >= 1, "delta"].min()),
            "n_with_nu": int(len(measured)),
            "n_complete_shrinkage": int((measured["nu_error"] >= cfg.nu_eps_max).sum()),
            "n_latent_decoupling": int((measured["nu_recon"] >= cfg.nu_r_max).sum()),
            "n_artefact": int(
                (
                    (measured["nu_error"] >= cfg.nu_eps_max)
                    | (measured["nu_recon"] >= cfg.nu_r_max)
                ).sum()
            ),
        }
    return out


def summarise_boards(boards: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per method over seeds: each numeric figure's mean, with ``<figure>_std``, ``_min`` and
    ``_max`` (population std over seeds); text fields as they are (the first seed's)."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for board in boards:
        for r in board:
            by_method.setdefault(r["method"], []).append(r)
    out = []
    for method, rs in by_method.items():
        row: dict[str, Any] = {"method": method, "n_seeds": len(rs)}
        for key in rs[0]:
            if key == "method":
                continue
            vals = [r.get(key) for r in rs]
            nums = [
                float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)
            ]
            if nums and len(nums) == len([v for v in vals if v is not None]) and key != "d_sae":
                x = torch.tensor(nums, dtype=torch.float64)
                row[key] = rounded(x.mean())
                row[f"{key}_std"] = rounded(x.std(unbiased=False))
                row[f"{key}_min"], row[f"{key}_max"] = rounded(x.min()), rounded(x.max())
            else:
                row[key] = vals[0]
        out.append(row)
    return out


@torch.no_grad()
def fve_per_model(sae: PairedDictionary, mode: StoreMode, x: torch.Tensor) -> dict[str, float]:
    """Fraction of variance explained of what the dictionary reads (per model for crosscoders,
    the difference for the diff-SAE, ft for the chat-SAE), plus mean L0."""
    x_in = select_mode(x, mode, getattr(sae.cfg, "diff_sign", "ft_minus_base"))
    f = sae.encode(x_in)
    rec = sae.decode(f)
    if mode == "paired":
        out = {
            m: fraction_of_variance_explained(x_in[:, i], rec[:, i])
            for i, m in enumerate(("base", "ft"))
        }
    else:
        out = {mode: fraction_of_variance_explained(x_in, rec)}
    out["l0"] = float((f > 0).float().sum(-1).mean())
    return out


def rounded(x: Any) -> float | None:
    """``x`` as a float rounded to 4 digits for report.json, NaN as ``None``."""
    x = float(x)
    return None if math.isnan(x) else round(x, 4)


__all__ = [
    "crosscoder_artefacts",
    "encode_tokens",
    "ft_specific_ranking",
    "fve_per_model",
    "method_rows",
    "nu_filter",
    "rounded",
    "summarise_boards",
]
