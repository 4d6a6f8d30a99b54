"""Plots: the right data in the right traces, HTML written, clear errors for missing columns."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sae_diff.analysis.plots import (
    beta_distributions,
    delta_histogram,
    frequency_vs_ratio,
    latent_figures,
    nu_scatter,
    save_figure,
    save_figures,
)


def _table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 40
    tags = np.array(["ft_only"] * 10 + ["shared"] * 20 + ["base_only"] * 5 + ["other"] * 5)
    df = pd.DataFrame(
        {
            "delta": rng.uniform(0, 1, n),
            "tag": pd.Categorical(tags, categories=["ft_only", "base_only", "shared", "other"]),
            "freq": rng.uniform(1e-4, 1e-1, n),
            "count_active": rng.integers(0, 1000, n),
            "beta_error_base": rng.normal(size=n),
            "beta_error_ft": rng.normal(size=n),
            "beta_recon_base": rng.normal(size=n),
            "beta_recon_ft": rng.normal(size=n),
            "nu_error": rng.uniform(0, 1, n),
            "nu_recon": rng.uniform(0, 1, n),
        },
        index=pd.Index(range(n), name="latent"),
    )
    df.loc[[0, 11], "nu_error"] = np.nan  # below min_count
    return df


def test_delta_histogram_traces_per_tag():
    df = _table()
    fig = delta_histogram(df)
    by_name = {t.name: t for t in fig.data}
    assert set(by_name) == {"ft_only", "shared", "base_only", "other"}
    for tag, trace in by_name.items():
        np.testing.assert_allclose(np.sort(trace.x), np.sort(df.loc[df.tag == tag, "delta"]))
    assert fig.layout.barmode == "stack"


def test_nu_scatter_groups_drop_missing_and_has_marginals():
    df = _table()
    fig = nu_scatter(df)
    scatters = [t for t in fig.data if t.type == "scatter"]
    hists = [t for t in fig.data if t.type == "histogram"]
    assert {t.name for t in scatters} == {"ft_only", "shared"} and len(hists) == 4
    ft = next(t for t in scatters if t.name == "ft_only")
    expect = df[(df.tag == "ft_only") & df.nu_error.notna()]
    np.testing.assert_allclose(ft.x, expect.nu_error)
    np.testing.assert_allclose(ft.y, expect.nu_recon)
    everything = nu_scatter(df.drop(columns="tag"))
    assert sum(len(t.x) for t in everything.data if t.type == "scatter") == 38


def test_beta_and_frequency_plots():
    df = _table()
    fig = beta_distributions(df)
    assert {t.name for t in fig.data} == {
        "beta_error_base",
        "beta_error_ft",
        "beta_recon_base",
        "beta_recon_ft",
    }
    fr = frequency_vs_ratio(df)
    assert fr.layout.xaxis.type == "log" and fr.layout.yaxis.title.text == "nu_error"
    assert sum(len(t.x) for t in fr.data) == 38
    sae_table = df.drop(columns=["delta", "tag", "nu_error", "nu_recon"]).assign(freq_ratio=2.0)
    assert frequency_vs_ratio(sae_table).layout.yaxis.title.text == "freq_ratio"
    assert set(latent_figures(sae_table)) == {"beta_distributions", "frequency_vs_ratio"}


def test_saving_html_and_errors(tmp_path):
    df = _table()
    paths = save_figures(df, tmp_path, include_plotlyjs="cdn")
    assert set(paths) == {
        "delta_histogram",
        "nu_scatter",
        "beta_distributions",
        "frequency_vs_ratio",
    }
    for p in paths.values():
        text = p.read_text()
        assert p.suffix == ".html" and "plotly" in text.lower()
    with pytest.raises(ValueError, match=r"\.html"):
        save_figure(delta_histogram(df), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\['delta', 'tag'\]"):
        delta_histogram(df.drop(columns=["delta", "tag"]))
    with pytest.raises(ValueError, match="beta_"):
        beta_distributions(df[["delta"]])
