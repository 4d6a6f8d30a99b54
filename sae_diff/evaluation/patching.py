"""KL patching at a dictionary's layer: every intervention of METHODS.md §4, run and measured.

This module is the table (:func:`kl_patching_table`) and its summaries. The pieces it is built
from, each re-exported here where they have always been importable:

- :mod:`sae_diff.evaluation.interventions`: split batch, dictionary patcher, the residual
  each intervention builds;
- :mod:`sae_diff.evaluation.engine`: runs interventions over the data and measures them
  (:func:`evaluate_interventions`; ``PatchMetrics`` moved there);
- :mod:`sae_diff.evaluation.patch_rows`: which interventions a dictionary gets (targeted
  subsets, random baselines, steering);
- :mod:`sae_diff.analysis.selection`: latent selection (shared with the report).

The interventions themselves (which residual each builds from the split batch, and why one
ft second-half forward per intervention suffices) are tabulated in
:mod:`sae_diff.evaluation.interventions`.

Metrics per intervention over the masked positions: ``KL(p_ft || p_patched)`` (all, first
``first_n`` masked positions of each sequence, rest), next-token NLL, and the fraction of the KL
gap closed ``1 - KL(p_ft || p_patched) / KL(p_ft || p_stitched)`` (per split; ratios of means
over the same tokens). Random latent subsets of the targeted subsets' sizes are baselines over
several seeds (mean and standard deviation across seeds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
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
from sae_diff.dictionaries.protocol import PairedDictionary
from sae_diff.evaluation.engine import closed_fraction, evaluate_interventions
from sae_diff.evaluation.interventions import (
    DictionaryPatcher,
    Intervention,
    SplitBatch,
    error_patch,
    ft_reference,
    reconstruction_patch,
    split_batch,
    steering_patch,
    stitched,
    subset_patch,
    token_patch,
)
from sae_diff.evaluation.kl import FIRST_N, as_token_mask, first_n_of_mask
from sae_diff.evaluation.patch_rows import PatchRow, dictionary_rows
from sae_diff.evaluation.stitching import resolve_layer
from sae_diff.moved import moved_names
from sae_diff.pairing.model import PairedModel

__getattr__ = moved_names(__name__, {"PatchMetrics": "sae_diff.evaluation.engine"})


def kl_patching_table(
    paired: PairedModel,
    dictionaries: Mapping[str, PairedDictionary] | PairedDictionary,
    tokens: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    layer: int | str | None = None,
    *,
    nu: Mapping[str, NuLike] | None = None,
    nu_thresholds: Sequence[float] = (0.3, 0.6),
    nu_rank_fraction: float | None = 0.5,
    subsets: Mapping[str, Mapping[str, LatentSpec]] | None = None,
    ft_only: bool = True,
    steering: bool = True,
    steering_scale: float = 1.0,
    random_seeds: int = 5,
    random_pool: Mapping[str, LatentSpec] | None = None,
    token_patches: Mapping[str, torch.Tensor] | None = None,
    first_k_patch: int | None = FIRST_N,
    first_n: int = FIRST_N,
    include_bias: bool = False,
    batch_size: int = 8,
    attention_mask: torch.Tensor | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """KL patching table: every intervention of METHODS.md §4, one block of rows per dictionary.

    Args:
        paired: the model pair.
        dictionaries: ``{name: dictionary}`` (crosscoders and/or diff-SAEs, inference or
            training classes), or one dictionary (named ``"dictionary"``).
        tokens: ``(N, S)`` token ids.
        token_mask: ``(N, S)`` bool, the positions scored (e.g. assistant tokens, BOS and
            padding excluded); None = all positions.
        layer: split layer (int), a residual hook name, or None = the dictionaries' own
            ``cfg.metadata.hook_name`` (``blocks.L.hook_resid_post`` -> layer ``L + 1``).
        nu: per dictionary name, Latent Scaling ratios (tensor / Series / latent-table
            DataFrame, see :func:`nu_scores`; NaN = unknown, e.g. too rarely active). Adds
            subsets ``nu<t`` for each of ``nu_thresholds`` and the lowest / highest
            ``nu_rank_fraction`` by ν rank, taken among the latents with a known ν (for
            crosscoders: the ft-only ones).
        subsets: per dictionary name, extra named latent subsets (ids or bool masks).
        ft_only: crosscoders: add the subset of ft-only latents by Δ.
        steering: crosscoders: add additive steering with the ft-only latents.
        random_seeds: random equal-size subsets per targeted subset (0 = none). They are
            drawn from the targeted subset's candidate pool (ft-only latents for crosscoder
            ν subsets, all latents otherwise) unless ``random_pool[name]`` gives one.
        token_patches: extra named ``(N, S)`` position masks patched with ``x^c`` (e.g. the
            template-token mask); dictionary-independent.
        first_k_patch: add the patch of the first ``k`` masked positions of each sequence
            (None = skip).
        first_n: the first/rest split of the metrics.
        include_bias: crosscoders: include ``b_dec^c - b_dec^b`` in the reconstruction.

    Returns:
        A long DataFrame, one row per (dictionary, intervention), columns ``dictionary``,
        ``intervention`` (key, e.g. ``reconstruction``, ``error``, ``subset:nu<0.3``,
        ``random:nu<0.3``), ``kind``, ``description``, ``n_latents``, ``kl``, ``kl_first``,
        ``kl_rest``, ``nll``, ``closed``, ``closed_first``, ``closed_rest`` (fraction of the
        KL gap closed), ``kl_std``, ``closed_std``, ``n_seeds`` (random rows: mean and std
        over seeds) and ``n_tokens``. Reference rows ``ft`` / ``stitched`` and token patches
        repeat in each dictionary's block. ``df.attrs`` records ``layer`` and ``first_n``.
        Use :func:`compare_dictionaries` for a side-by-side view.
    """
    dicts = (
        dict(dictionaries) if isinstance(dictionaries, Mapping) else {"dictionary": dictionaries}
    )
    if not dicts:
        raise ValueError("give at least one dictionary")
    for key, arg in (("nu", nu), ("subsets", subsets), ("random_pool", random_pool)):
        unknown = set(arg or {}) - set(dicts)
        if unknown:
            raise ValueError(
                f"{key} names unknown dictionaries {sorted(unknown)}; known: {sorted(dicts)}"
            )
    L = resolve_layer(paired, layer, dicts)
    mask = as_token_mask(token_mask, tokens)

    shared: list[PatchRow] = []
    if first_k_patch is not None:
        shared.append(
            PatchRow(
                f"tokens:first{first_k_patch}",
                "tokens",
                f"x^c at the first {first_k_patch} masked positions",
                None,
                token_patch(first_n_of_mask(mask, first_k_patch)),
            )
        )
    for key, pos in (token_patches or {}).items():
        shared.append(
            PatchRow(
                f"tokens:{key}",
                "tokens",
                f"x^c at the {key!r} positions",
                None,
                token_patch(as_token_mask(pos, tokens)),
            )
        )
    per_dict: dict[str, list[PatchRow]] = {}
    for name, sae in dicts.items():
        patcher = DictionaryPatcher(sae, include_bias=include_bias)
        per_dict[name] = dictionary_rows(
            name,
            patcher,
            nu=(nu or {}).get(name),
            nu_thresholds=nu_thresholds,
            nu_rank_fraction=nu_rank_fraction,
            subsets=(subsets or {}).get(name, {}),
            ft_only=ft_only,
            steering=steering,
            steering_scale=steering_scale,
            random_seeds=random_seeds,
            random_pool=(random_pool or {}).get(name),
        )
    ivs: dict[str, Intervention] = {}
    for r in shared:
        assert r.fn is not None
        ivs[f"\0{r.key}"] = r.fn
    for name, rows in per_dict.items():
        for r in rows:
            assert r.fn is not None
            r.engine_key = f"{name}\0{r.engine_key or r.key}"
            ivs.setdefault(r.engine_key, r.fn)
    res = evaluate_interventions(
        paired,
        tokens,
        mask,
        L,
        ivs,
        first_n=first_n,
        batch_size=batch_size,
        attention_mask=attention_mask,
        progress=progress,
    )
    base = res["stitched"]

    def metrics(m: dict[str, float]) -> dict[str, Any]:
        return {
            **m,
            "closed": closed_fraction(m["kl"], base["kl"]),
            "closed_first": closed_fraction(m["kl_first"], base["kl_first"]),
            "closed_rest": closed_fraction(m["kl_rest"], base["kl_rest"]),
        }

    out: list[dict[str, Any]] = []
    for name, rows in per_dict.items():
        common = [
            ("ft", "reference", "x^c (the ft model itself)", res["ft"]),
            ("stitched", "baseline", "x^b (base first half, ft second half)", base),
        ] + [(r.key, r.kind, r.description, res[f"\0{r.key}"]) for r in shared]
        for key, kind, desc, m in common:
            out.append(
                {
                    "dictionary": name,
                    "intervention": key,
                    "kind": kind,
                    "description": desc,
                    "n_latents": None,
                    **metrics(m),
                    "kl_std": float("nan"),
                    "closed_std": float("nan"),
                    "n_seeds": None,
                }
            )
        randoms: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            assert r.engine_key is not None
            m = metrics(res[r.engine_key])
            if r.kind == "random":
                randoms.setdefault(r.key, []).append({**m, "_row": r})
                continue
            out.append(
                {
                    "dictionary": name,
                    "intervention": r.key,
                    "kind": r.kind,
                    "description": r.description,
                    "n_latents": r.n_latents,
                    **m,
                    "kl_std": float("nan"),
                    "closed_std": float("nan"),
                    "n_seeds": None,
                }
            )
        for key, ms in randoms.items():
            r0 = ms[0]["_row"]
            agg: dict[str, Any] = {
                "dictionary": name,
                "intervention": key,
                "kind": "random",
                "description": r0.description,
                "n_latents": r0.n_latents,
            }
            for col in (
                "kl",
                "kl_first",
                "kl_rest",
                "nll",
                "closed",
                "closed_first",
                "closed_rest",
            ):
                agg[col] = float(np.mean([m[col] for m in ms]))
            agg["n_tokens"] = ms[0]["n_tokens"]
            agg["kl_std"] = (
                float(np.std([m["kl"] for m in ms], ddof=1)) if len(ms) > 1 else float("nan")
            )
            agg["closed_std"] = (
                float(np.std([m["closed"] for m in ms], ddof=1)) if len(ms) > 1 else float("nan")
            )
            agg["n_seeds"] = len(ms)
            # keep each random row right after its targeted subset
            idx = next(
                i
                for i, o in enumerate(out)
                if o["dictionary"] == name and o["intervention"] == r0.random_of
            )
            out.insert(idx + 1, agg)
    cols = [
        "dictionary",
        "intervention",
        "kind",
        "description",
        "n_latents",
        "kl",
        "kl_first",
        "kl_rest",
        "nll",
        "closed",
        "closed_first",
        "closed_rest",
        "kl_std",
        "closed_std",
        "n_seeds",
        "n_tokens",
    ]
    df = pd.DataFrame(out, columns=cols)
    df["n_latents"] = df["n_latents"].astype("Int64")
    df["n_seeds"] = df["n_seeds"].astype("Int64")
    df.attrs.update({"layer": L, "first_n": first_n})
    return df


def compare_dictionaries(table: pd.DataFrame, value: str = "closed") -> pd.DataFrame:
    """Side-by-side view of a :func:`kl_patching_table`: interventions x dictionaries."""
    order = list(dict.fromkeys(table["intervention"]))
    wide = table.pivot_table(
        index="intervention",
        columns="dictionary",
        values=value,
        aggfunc="first",
        sort=False,
        dropna=False,
    )
    wide = wide.reindex(order)
    wide.columns = list(wide.columns)
    return wide


def gap_closed_summary(table: pd.DataFrame, nu_key: str | None = None) -> pd.DataFrame:
    """One row per dictionary: fraction of the KL gap closed by the full reconstruction, its
    error, a ν-filtered subset (``nu_key``, default the first ``subset:nu<...`` row) and the
    random subsets of that size (mean and std), plus the ft-only subset when present."""
    rows = []
    for name, part in table.groupby("dictionary", sort=False):
        by = part.set_index("intervention")

        def get(key: str, col: str = "closed", by: pd.DataFrame = by) -> float:
            return float(by.at[key, col]) if key in by.index else float("nan")

        nk = nu_key or next((k for k in by.index if str(k).startswith("subset:nu<")), None)
        row: dict[str, Any] = {
            "dictionary": name,
            "kl_stitched": get("stitched", "kl"),
            "reconstruction": get("reconstruction"),
            "error": get("error"),
            "ft_only": get("subset:ft_only"),
            "ft_only_random": get("random:ft_only"),
            "nu_subset": nk,
            "nu_subset_closed": get(nk) if nk else float("nan"),
            "nu_subset_n_latents": by.at[nk, "n_latents"] if nk and nk in by.index else pd.NA,
            "nu_random": get("random:" + nk[len("subset:") :]) if nk else float("nan"),
            "nu_random_std": get("random:" + nk[len("subset:") :], "closed_std")
            if nk
            else float("nan"),
        }
        rows.append(row)
    return pd.DataFrame(rows).set_index("dictionary")


__all__ = [
    "DictionaryPatcher",
    "Intervention",
    "SplitBatch",
    "compare_dictionaries",
    "error_patch",
    "evaluate_interventions",
    "ft_only_latents",
    "ft_reference",
    "gap_closed_summary",
    "kl_patching_table",
    "latent_indices",
    "nu_rank_latents",
    "nu_scores",
    "nu_threshold_latents",
    "random_latents",
    "reconstruction_patch",
    "split_batch",
    "steering_patch",
    "stitched",
    "subset_patch",
    "token_patch",
]
