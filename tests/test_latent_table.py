"""Latent table: hand-computed Δ/tags/cosines, data columns, Parquet/CSV round trips."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

import sae_diff  # noqa: F401
from sae_diff.analysis.latent_scaling import latent_scaling
from sae_diff.analysis.latent_table import latent_table, load_latent_table, save_latent_table
from sae_diff.dictionaries.base import CrosscoderSAE
from sae_diff.dictionaries.crosscoder import Crosscoder, CrosscoderConfig

F64 = torch.float64
#: (||d^b||, ||d^c||) -> Δ = 0.5 * ((nb - nc) / max + 1), tag by hand
NORMS = [(1.0, 1.0), (0.05, 1.0), (1.0, 0.0), (1.0, 0.5), (0.6, 1.0), (0.85, 1.0), (0.0, 2.0)]
DELTA = [0.5, 0.025, 1.0, 0.75, 0.3, 0.425, 0.0]
TAGS = ["shared", "ft_only", "base_only", "other", "other", "shared", "ft_only"]


def _crosscoder(factors=(0.5, 4.0)) -> Crosscoder:
    """Crosscoder built in the normalised space with the NORMS above, then folded."""
    d, n = 4, len(NORMS)
    sae = Crosscoder(
        CrosscoderConfig(d_in=d, d_sae=n, dtype="float64", device="cpu", norm_factors=list(factors))
    )
    e = torch.eye(d, dtype=F64)
    with torch.no_grad():
        for j, (nb, nc) in enumerate(NORMS):
            # base row along e0, ft row at 60 degrees from it: cos = 0.5 (where both are non-zero)
            sae.W_dec[j, 0] = nb * e[0]
            sae.W_dec[j, 1] = nc * (0.5 * e[0] + math.sqrt(0.75) * e[1])
            sae.W_enc[0, :, j] = e[2]
            sae.W_enc[1, :, j] = -e[2] if j % 2 else e[2]  # encoder cos = -1 or 1
        sae.b_enc.fill_(0.1)
        state = {k: v.clone() for k, v in sae.state_dict().items()}
        CrosscoderSAE.fold_norm_factors_into(state, torch.tensor(factors, dtype=F64))
        sae.load_state_dict(state)
    return sae


def test_geometry_columns_match_hand_values():
    df = latent_table(_crosscoder())
    nb, nc = zip(*NORMS, strict=True)
    np.testing.assert_allclose(df["norm_base"], nb, atol=1e-12)
    np.testing.assert_allclose(df["norm_ft"], nc, atol=1e-12)
    np.testing.assert_allclose(df["delta"], DELTA, atol=1e-12)
    assert df["tag"].astype(str).tolist() == TAGS
    both = (np.array(nb) > 0) & (np.array(nc) > 0)
    np.testing.assert_allclose(df["dec_cos"][both], 0.5, atol=1e-12)
    np.testing.assert_allclose(
        df["enc_cos"], [1.0 if j % 2 == 0 else -1.0 for j in range(len(NORMS))], atol=1e-12
    )
    assert df.index.name == "latent" and df.attrs["kind"] == "crosscoder"
    assert df.attrs["norm_factors"] == [0.5, 4.0]


def test_table_with_data_has_all_columns_and_matches_latent_scaling():
    sae = _crosscoder()
    x = torch.randn(240, 2, 4, dtype=F64)
    masks = {"template": torch.arange(240) % 5 == 0, "assistant": torch.arange(240) >= 120}
    batches = [
        (x[:120], {k: m[:120] for k, m in masks.items()}, {"dataset": "chat"}),
        (x[120:], {k: m[120:] for k, m in masks.items()}, {"dataset": "web"}),
    ]
    df = latent_table(sae, batches, min_count=10, progress=False)
    for col in (
        "count_active",
        "freq",
        "max_act",
        "mean_act",
        "freq[template]",
        "share[template]",
        "share[assistant]",
        "freq[dataset=chat]",
        "freq[dataset=web]",
        "beta_recon_base",
        "beta_recon_ft",
        "beta_error_base",
        "beta_error_ft",
        "nu_error",
        "nu_recon",
        "delta",
        "tag",
        "dec_cos",
        "enc_cos",
    ):
        assert col in df.columns, col
    ls = latent_scaling(sae, [x], min_count=10, progress=False)
    np.testing.assert_allclose(
        df["beta_error_base"], ls.betas["beta_error_base"].numpy(), rtol=1e-12
    )
    f = sae.encode(x).detach()
    np.testing.assert_array_equal(df["count_active"], (f != 0).sum(0).numpy())
    assert df.attrs["n_tokens"] == 240 and df.attrs["min_count"] == 10
    sub = latent_table(sae, [x], latents=[5, 1], min_count=10, progress=False)
    assert sub.index.tolist() == [5, 1]
    np.testing.assert_allclose(
        sub["beta_recon_base"], df.loc[[5, 1], "beta_recon_base"], rtol=1e-12
    )
    reuse = latent_table(sae, scaling=ls)
    pd.testing.assert_series_equal(reuse["nu_error"], df["nu_error"], check_exact=False, rtol=1e-12)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_save_load_round_trip_next_to_dictionary(tmp_path, fmt):
    sae = _crosscoder()
    df = latent_table(sae, [torch.randn(100, 2, 4, dtype=F64)], min_count=1, progress=False)
    sae.save_model(tmp_path)
    path = save_latent_table(df, tmp_path, format=fmt)
    assert path == tmp_path / f"latent_table.{fmt}" and (tmp_path / "cfg.json").exists()
    back = load_latent_table(tmp_path)
    assert back.attrs["kind"] == "crosscoder" and back.attrs["n_tokens"] == 100
    pd.testing.assert_frame_equal(back, df, check_exact=False, rtol=1e-12, check_categorical=False)
    assert back["tag"].astype(str).tolist() == TAGS


def test_plain_sae_table_and_errors(tmp_path):
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=4, d_sae=3, dtype="float64", device="cpu"))
    geo = latent_table(sae)
    assert list(geo.columns) == ["norm"]
    np.testing.assert_allclose(geo["norm"], sae.W_dec.detach().norm(dim=-1).numpy())
    x = torch.randn(50, 2, 4, dtype=F64)
    with pytest.raises(ValueError, match="kind='ft_sae'"):
        latent_table(sae, [x], progress=False)
    df = latent_table(sae, [x], kind="ft_sae", min_count=1, progress=False)
    assert {"beta_act_base", "beta_act_ft", "nu_act", "freq_ratio", "mean_act_ratio"} <= set(
        df.columns
    )
    assert "delta" not in df.columns
    with pytest.raises(ValueError, match=".parquet or .csv"):
        save_latent_table(df, tmp_path / "table.xlsx")
    with pytest.raises(FileNotFoundError, match="latent_table"):
        load_latent_table(tmp_path)
