"""Plots of the latent table (plotly): return figures, shown inline in notebooks, saved as HTML.

- :func:`delta_histogram`: Δ (relative decoder norm) histogram stacked by tag (crosscoders).
- :func:`nu_scatter`: ν_ε vs ν_r with marginal histograms, ft-only latents against the shared
  baseline (the Latent Scaling figure of the seed posts).
- :func:`beta_distributions`: distributions of every beta column.
- :func:`frequency_vs_ratio`: firing frequency (log) vs a ratio (ν or the base-SAE firing shift).
- :func:`rotation_figure`: stage-wise diffing's per-stage rotation (:mod:`sae_diff.analysis.stages`).
- :func:`latent_figures` / :func:`save_figures`: all figures a table supports, and writing them.

Every function takes the DataFrame of :func:`sae_diff.analysis.latent_table.latent_table`
(or :meth:`LatentScalingResult.to_frame`) and raises a clear error naming a missing column.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from sae_diff.atomic import atomic_write
from sae_diff.dictionaries.geometry import TAGS

#: Colours per tag, shared by every figure.
TAG_COLORS = {"ft_only": "#d62728", "base_only": "#1f77b4", "shared": "#7f7f7f", "other": "#bcbd22"}


def _require(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(
            f"{what} needs column(s) {missing}; the table has {list(table.columns)}. Build it with "
            "latent_table(sae, data) (Δ/tags need a crosscoder; ν and betas need data)."
        )


def _frame(table: pd.DataFrame) -> pd.DataFrame:
    df = table.reset_index() if table.index.name == "latent" else table.copy()
    if "tag" in df.columns:
        df["tag"] = df["tag"].astype(str)
    return df


def delta_histogram(table: pd.DataFrame, *, bins: int = 50, title: str | None = None) -> go.Figure:
    """Histogram of Δ (0 = ft-only, 1 = base-only), stacked by tag."""
    _require(table, ["delta", "tag"], "delta_histogram")
    df = _frame(table)
    fig = px.histogram(
        df,
        x="delta",
        color="tag",
        nbins=bins,
        range_x=(0, 1),
        category_orders={"tag": list(TAGS)},
        color_discrete_map=TAG_COLORS,
        title=title or "Relative decoder norm Δ by tag (0 = ft-only, 1 = base-only)",
    )
    fig.update_layout(barmode="stack", xaxis_title="Δ", yaxis_title="latents")
    return fig


def nu_scatter(
    table: pd.DataFrame,
    *,
    x: str = "nu_error",
    y: str = "nu_recon",
    groups: Sequence[str] | None = ("ft_only", "shared"),
    title: str | None = None,
) -> go.Figure:
    """ν_ε vs ν_r scatter with marginal histograms; ``groups`` of tags (None: all latents).

    Latents with missing ratios (below the minimum count) are left out; the number shown
    is in the legend. Without a ``tag`` column all latents form one group.
    """
    _require(table, [x, y], "nu_scatter")
    df = _frame(table).dropna(subset=[x, y])
    color = None
    if "tag" in df.columns and groups is not None:
        df = df[df["tag"].isin(list(groups))]
        color = "tag"
    hover = [c for c in ("latent", "delta", "count_active", "freq") if c in df.columns]
    fig = px.scatter(
        df,
        x=x,
        y=y,
        color=color,
        marginal_x="histogram",
        marginal_y="histogram",
        category_orders={"tag": list(groups or TAGS)},
        color_discrete_map=TAG_COLORS,
        hover_data=hover,
        opacity=0.7,
        title=title or f"Latent Scaling: {x} vs {y} ({len(df)} latents with enough activity)",
    )
    return fig


def beta_distributions(
    table: pd.DataFrame,
    *,
    columns: Sequence[str] | None = None,
    bins: int = 60,
    title: str | None = None,
) -> go.Figure:
    """Overlaid histograms of the beta columns (``beta_<target>_<model>``)."""
    cols = (
        list(columns)
        if columns is not None
        else [c for c in table.columns if str(c).startswith("beta_")]
    )
    if not cols:
        raise ValueError(
            "beta_distributions needs beta_* columns: build the table with data "
            "(latent_table(sae, data)) so that Latent Scaling runs."
        )
    _require(table, cols, "beta_distributions")
    long = (
        _frame(table)
        .melt(
            id_vars=[c for c in ("latent", "tag") if c in _frame(table).columns],
            value_vars=cols,
            var_name="beta",
            value_name="value",
        )
        .dropna(subset=["value"])
    )
    fig = px.histogram(
        long,
        x="value",
        color="beta",
        nbins=bins,
        barmode="overlay",
        opacity=0.55,
        title=title or "Latent Scaling betas",
    )
    fig.update_layout(xaxis_title="β", yaxis_title="latents")
    return fig


def frequency_vs_ratio(
    table: pd.DataFrame, *, ratio: str | None = None, title: str | None = None
) -> go.Figure:
    """Firing frequency (log x) against a ratio: ``nu_error``/``nu_act``/``freq_ratio``/... ."""
    if ratio is None:
        ratio = next(
            (c for c in ("nu_error", "nu_act", "freq_ratio", "nu_recon") if c in table.columns),
            None,
        )
        if ratio is None:
            raise ValueError(
                "frequency_vs_ratio found no ratio column (nu_error, nu_act, freq_ratio, "
                "nu_recon): build the table with data."
            )
    _require(table, ["freq", ratio], "frequency_vs_ratio")
    df = _frame(table)
    df = df[(df["freq"] > 0)].dropna(subset=[ratio])
    color = "tag" if "tag" in df.columns else None
    hover = [c for c in ("latent", "count_active", "delta") if c in df.columns]
    fig = px.scatter(
        df,
        x="freq",
        y=ratio,
        color=color,
        log_x=True,
        hover_data=hover,
        opacity=0.7,
        category_orders={"tag": list(TAGS)},
        color_discrete_map=TAG_COLORS,
        title=title or f"Firing frequency vs {ratio}",
    )
    fig.update_layout(xaxis_title="firing frequency", yaxis_title=ratio)
    return fig


def latent_figures(table: pd.DataFrame) -> dict[str, go.Figure]:
    """Every figure the table has columns for, by name."""
    out: dict[str, go.Figure] = {}
    if {"delta", "tag"} <= set(table.columns):
        out["delta_histogram"] = delta_histogram(table)
    if {"nu_error", "nu_recon"} <= set(table.columns):
        out["nu_scatter"] = nu_scatter(table)
    if any(str(c).startswith("beta_") for c in table.columns):
        out["beta_distributions"] = beta_distributions(table)
    if "freq" in table.columns and any(
        c in table.columns for c in ("nu_error", "nu_act", "freq_ratio", "nu_recon")
    ):
        out["frequency_vs_ratio"] = frequency_vs_ratio(table)
    return out


def save_figure(fig: go.Figure, path: str | Path, *, include_plotlyjs: Any = True) -> Path:
    """Write a figure as standalone HTML (plotly.js embedded by default, so it opens offline)."""
    path = Path(path)
    if path.suffix != ".html":
        raise ValueError(f"Figures are saved as HTML; got {path.name!r} (use a .html path).")
    atomic_write(path, lambda p: fig.write_html(str(p), include_plotlyjs=include_plotlyjs))
    return path


def save_figures(
    table: pd.DataFrame, folder: str | Path, *, include_plotlyjs: Any = True
) -> dict[str, Path]:
    """Save every :func:`latent_figures` figure as ``<folder>/<name>.html``."""
    folder = Path(folder)
    return {
        name: save_figure(fig, folder / f"{name}.html", include_plotlyjs=include_plotlyjs)
        for name, fig in latent_figures(table).items()
    }


def rotation_figure(
    table: pd.DataFrame, latents: Sequence[int] | None = None, which: str = "dec"
) -> go.Figure:
    """Plotly figure: per stage, the distribution of ``1 − cosine`` to the parent stage (box),
    with the chosen ``latents`` (e.g. the top rotating ones) drawn as lines across stages."""
    col = f"{which}_cos"
    if col not in table.columns:
        raise ValueError(
            f"The rotation table has no {col!r} column; build it with rotation_table()."
        )
    fig = go.Figure()
    order = list(dict.fromkeys(table["stage"]))
    for st in order:
        fig.add_trace(
            go.Box(
                y=1.0 - table.loc[table["stage"] == st, col],
                name=st,
                boxpoints=False,
                showlegend=False,
            )
        )
    for j in latents or []:
        rows = table[table["latent"] == j].set_index("stage").loc[order]
        fig.add_trace(
            go.Scatter(x=order, y=1.0 - rows[col], mode="lines+markers", name=f"latent {j}")
        )
    fig.update_layout(
        title=f"{'Decoder' if which == 'dec' else 'Encoder'} rotation by stage (1 − cos to parent stage)",
        yaxis_title="1 − cosine",
        xaxis_title="stage",
    )
    return fig


__all__ = [
    "TAG_COLORS",
    "beta_distributions",
    "delta_histogram",
    "frequency_vs_ratio",
    "latent_figures",
    "nu_scatter",
    "rotation_figure",
    "save_figure",
    "save_figures",
]
