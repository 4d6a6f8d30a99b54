"""The latent table: one row per latent, everything a researcher sorts and filters by.

Columns (``NaN`` where a column does not apply or a latent never fired):

- geometry, in the dictionary's normalised (training) space (``geometry.decoder_rows``):
  crosscoders ``norm_base``, ``norm_ft``, ``delta`` (Δ, 0 = ft-only, 1 = base-only), ``tag``
  (``ft_only``/``base_only``/``shared``/``other``), ``dec_cos``, ``enc_cos``; SAEs ``norm``;
- from one pass over data (:func:`sae_diff.analysis.latent_scaling.latent_scaling`):
  ``count_active``, ``freq``, ``max_act``, ``mean_act`` (over active tokens),
  ``freq[<mask>]`` / ``share[<mask>]`` per named token mask (share = fraction of the latent's
  firings inside the mask), ``freq[dataset=<name>]`` per dataset, the betas
  ``beta_{recon,error,act}_{base,ft}``, the ratios ``nu_error`` (ν_ε), ``nu_recon`` (ν_r),
  ``nu_act`` (NaN below ``min_count``) and, for ft/base-SAEs, the firing shift
  ``freq_on_{base,ft}``, ``mean_act_on_{base,ft}``, ``freq_ratio``, ``mean_act_ratio``.

``df.attrs`` records the dictionary kind, architecture, hook, models, token count and
``min_count``; :func:`save_latent_table` writes it next to the table as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from sae_diff.analysis.latent_scaling import latent_scaling
from sae_diff.analysis.latent_scaling_result import DEFAULT_MIN_COUNT, LatentScalingResult
from sae_diff.analysis.selection import resolve_latents
from sae_diff.atomic import atomic_write
from sae_diff.dictionaries import geometry
from sae_diff.dictionaries.io import as_inference
from sae_diff.dictionaries.kinds import dictionary_kind
from sae_diff.dictionaries.protocol import PairedDictionary

TABLE_STEM = "latent_table"
FORMATS = ("parquet", "csv")


def geometry_frame(sae: PairedDictionary, kind: str | None = None) -> pd.DataFrame:
    """Decoder/encoder geometry per latent (no data needed); index ``latent``."""
    sae = as_inference(sae)
    kind = dictionary_kind(sae, kind) if kind is not None or _detectable(sae) else "sae"
    norms = geometry.decoder_norms(sae, normalised=True).double().cpu()
    index = pd.Index(range(norms.shape[0]), name="latent")
    if kind != "crosscoder":
        return pd.DataFrame({"norm": norms[:, 0].numpy()}, index=index)
    if norms.shape[1] < 2:
        raise ValueError(
            "Δ and tags need a decoder row per model; this crosscoder has "
            f"n_models={norms.shape[1]} (ft decoder missing)."
        )
    delta = geometry.relative_norm(norms)
    return pd.DataFrame(
        {
            "norm_base": norms[:, 0].numpy(),
            "norm_ft": norms[:, 1].numpy(),
            "delta": delta.numpy(),
            "tag": pd.Categorical(geometry.tags(delta), categories=list(geometry.TAGS)),
            "dec_cos": geometry.decoder_cosine(sae).double().cpu().numpy(),
            "enc_cos": geometry.encoder_cosine(sae).double().cpu().numpy(),
        },
        index=index,
    )


def _detectable(sae: PairedDictionary) -> bool:
    try:
        dictionary_kind(sae)
    except ValueError:
        return False
    return True


def _metadata(sae: PairedDictionary, kind: str) -> dict[str, Any]:
    cfg = sae.cfg
    meta = getattr(cfg, "metadata", None)
    arch = cfg.architecture() if hasattr(cfg, "architecture") else type(sae).__name__
    return {
        "kind": kind,
        "architecture": arch,
        "d_sae": int(cfg.d_sae),
        "d_in": int(cfg.d_in),
        "hook_name": getattr(meta, "hook_name", None),
        "base_model_name": getattr(meta, "base_model_name", None),
        "model_name": getattr(meta, "model_name", None),
        "norm_factors": getattr(cfg, "norm_factors", None),
        "diff_sign": getattr(cfg, "diff_sign", None),
    }


def latent_table(
    sae: PairedDictionary,
    data: Iterable[Any] | None = None,
    *,
    kind: str | None = None,
    latents: Sequence[int] | torch.Tensor | None = None,
    targets: Sequence[str] | str | None = None,
    min_count: int = DEFAULT_MIN_COUNT,
    scaling: LatentScalingResult | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Build the latent table of a crosscoder, diff-SAE, ft-SAE (chat-SAE) or base-SAE.

    Args:
        sae: the dictionary (training classes are exported to inference form first).
        data: paired activation batches (see :mod:`sae_diff.analysis.batches`); without data
            (and without ``scaling``) only the geometry columns are filled.
        kind: needed for plain SAEs: ``"ft_sae"`` or ``"base_sae"``.
        latents: restrict the table (and the data pass) to these latents.
        targets, min_count: passed to :func:`latent_scaling`.
        scaling: reuse an existing :class:`LatentScalingResult` instead of a new pass.
        max_tokens: stop the data pass after this many tokens (needed for a looping store).
        progress: progress bar over the data pass.
    """
    sae = as_inference(sae)
    if kind is not None or _detectable(sae):
        kind = dictionary_kind(sae, kind)
    elif data is not None or scaling is not None:
        kind = dictionary_kind(sae, kind)  # raises the "pass kind=" error
    geo = geometry_frame(sae, kind)
    S = resolve_latents(latents, int(sae.cfg.d_sae), torch.device("cpu"))
    if scaling is None and data is not None:
        scaling = latent_scaling(
            sae,
            data,
            kind=kind,
            latents=S,
            targets=targets,
            min_count=min_count,
            max_tokens=max_tokens,
            progress=progress,
        )
    if scaling is not None:
        keep = scaling.latents if latents is None else S
        stats = scaling.to_frame()
        missing = sorted(set(keep.tolist()) - set(stats.index))
        if missing:
            raise ValueError(
                f"The Latent Scaling result has no rows for latents {missing[:10]}: "
                "run it on (a superset of) the requested latents."
            )
        df = geo.loc[keep.numpy()].join(stats, how="left")
        df.attrs.update(stats.attrs)
    else:
        df = geo.loc[S.numpy()]
    df.attrs.update(_metadata(sae, str(kind) if kind else "sae"))
    if scaling is not None:
        df.attrs.update({"n_tokens": scaling.n_tokens, "min_count": scaling.min_count})
    return df


# --------------------------------------------------------------------------------------
# saving next to the dictionary
# --------------------------------------------------------------------------------------
def _table_path(path: str | Path, fmt: str | None) -> Path:
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"Unknown table format {fmt!r}; choose one of {list(FORMATS)}.")
    if path.suffix.lstrip(".") in FORMATS:
        if fmt is not None and path.suffix.lstrip(".") != fmt:
            raise ValueError(f"Path {path} ends in {path.suffix} but format={fmt!r}.")
        return path
    if path.suffix:
        raise ValueError(
            f"Cannot save a latent table as {path.suffix!r}: use .parquet or .csv, "
            "or pass the dictionary's folder."
        )
    return path / f"{TABLE_STEM}.{fmt or 'parquet'}"


def _meta_path(table: Path) -> Path:
    return table.with_name(table.name + ".meta.json")


def save_latent_table(df: pd.DataFrame, path: str | Path, format: str | None = None) -> Path:
    """Write the table as Parquet (default) or CSV; ``path`` is a file or the dictionary folder.

    A folder gets ``latent_table.parquet`` (or ``.csv``) next to the dictionary's
    ``cfg.json``; ``df.attrs`` goes to ``<table file>.meta.json``. Writes are atomic.
    Returns the table's path.
    """
    target = _table_path(path, format)
    out = df.copy()
    if "tag" in out.columns:
        out["tag"] = out["tag"].astype(str)
    out.attrs = {}
    if target.suffix == ".parquet":
        atomic_write(target, lambda p: out.to_parquet(p, index=True))
    else:
        atomic_write(target, lambda p: out.to_csv(p, index=True))
    meta = json.dumps(dict(df.attrs), indent=2, default=str)
    atomic_write(_meta_path(target), lambda p: p.write_text(meta))
    return target


def load_latent_table(path: str | Path) -> pd.DataFrame:
    """Read a table written by :func:`save_latent_table` (a file, or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        found = [
            path / f"{TABLE_STEM}.{f}" for f in FORMATS if (path / f"{TABLE_STEM}.{f}").exists()
        ]
        if not found:
            raise FileNotFoundError(
                f"No {TABLE_STEM}.parquet or {TABLE_STEM}.csv in {path}; "
                "build one with latent_table() and save_latent_table()."
            )
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f"No latent table at {path}.")
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
    elif path.suffix == ".csv":
        df = pd.read_csv(path, index_col="latent")
    else:
        raise ValueError(
            f"Unknown latent table file type {path.suffix!r} (expected .parquet or .csv)."
        )
    if "tag" in df.columns:
        df["tag"] = pd.Categorical(df["tag"].astype(str), categories=list(geometry.TAGS))
    meta = _meta_path(path)
    df.attrs = json.loads(meta.read_text()) if meta.exists() else {}
    return df


__all__ = ["geometry_frame", "latent_table", "load_latent_table", "save_latent_table"]
