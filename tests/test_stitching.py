"""Layer-stitching sweep and split-layer / dictionary resolution."""

from __future__ import annotations

import pytest
import torch
from helpers_models import random_tokens
from test_patching_support import perfect_crosscoder, perfect_diff_sae

from sae_diff.evaluation.kl import token_kl
from sae_diff.evaluation.stitching import (
    LayerError,
    hook_for_layer,
    layer_from_hook,
    plot_stitching_sweep,
    resolve_layer,
    stitching_sweep,
)

N_LAYERS, D = 3, 16


TINY_PAIR = {"n_layers": N_LAYERS, "d_model": D}  # the `pair` fixture of conftest.py


def test_sweep_endpoints_are_the_pure_models(pair):
    toks = random_tokens(batch=3, seq=10, seed=4)
    mask = torch.ones_like(toks, dtype=torch.bool)
    mask[:, 0] = False
    df = stitching_sweep(pair, toks, mask, batch_size=2, first_n=4)
    assert len(df) == 2 * (N_LAYERS + 1)
    assert df.attrs["first_n"] == 4
    by = df.set_index(["first", "layer"])
    # base blocks < L, ft blocks >= L: L = 0 is ft, L = n_layers is base
    assert by.loc[("base", 0), "kl_to_ft"] == pytest.approx(0.0, abs=1e-6)
    assert by.loc[("base", N_LAYERS), "kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert by.loc[("ft", 0), "kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert by.loc[("ft", N_LAYERS), "kl_to_ft"] == pytest.approx(0.0, abs=1e-6)
    lb, lf = pair.logits(toks)
    gap = float(token_kl(lf, lb)[mask].mean())
    assert gap > 1e-3
    assert by.loc[("base", N_LAYERS), "kl_to_ft"] == pytest.approx(gap, rel=1e-4)
    for L in range(1, N_LAYERS):
        assert by.loc[("base", L), "kl_to_ft"] > 1e-5
        assert by.loc[("base", L), "kl_to_base"] > 1e-5
    # the first/rest split partitions the masked tokens
    row = by.loc[("base", 1)]
    n_first = 3 * 4
    n_rest = int(mask.sum()) - n_first
    assert row["kl_to_ft"] == pytest.approx(
        (row["kl_to_ft_first"] * n_first + row["kl_to_ft_rest"] * n_rest) / (n_first + n_rest),
        rel=1e-6,
    )
    assert (df["n_tokens"] == int(mask.sum())).all()
    assert df["nll"].notna().all()
    fig = plot_stitching_sweep(df)
    assert len(fig.data) == 4


def test_sweep_subset_of_layers_and_bad_layer(pair):
    toks = random_tokens(batch=2, seq=6, seed=5)
    df = stitching_sweep(pair, toks, layers=[1], directions=("base",))
    assert df[["first", "layer"]].values.tolist() == [["base", 1]]
    with pytest.raises(LayerError, match=r"\[0, n_layers=3\]"):
        stitching_sweep(pair, toks, layers=[4])
    with pytest.raises(ValueError, match="directions"):
        stitching_sweep(pair, toks, directions=("chat",))


def test_layer_from_hook_and_back():
    assert layer_from_hook("blocks.0.hook_resid_pre", 3) == 0
    assert layer_from_hook("blocks.0.hook_resid_post", 3) == 1
    assert layer_from_hook("blocks.2.hook_resid_post", 3) == 3
    assert layer_from_hook("ln_final.hook_in", 3) == 3
    assert hook_for_layer(1, 3) == "blocks.1.hook_resid_pre"
    assert hook_for_layer(3, 3) == "blocks.2.hook_resid_post"
    for bad in ("blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out", "hook_embed"):
        with pytest.raises(LayerError, match="not a residual-stream hook"):
            layer_from_hook(bad, 3)
    with pytest.raises(LayerError, match="names block 3"):
        layer_from_hook("blocks.3.hook_resid_pre", 3)
    for bad_layer in (-1, 4, 1.0, True):
        with pytest.raises(LayerError):
            hook_for_layer(bad_layer, 3)


def test_resolve_layer_from_dictionaries(pair):
    post0 = perfect_crosscoder(D, hook_name="blocks.0.hook_resid_post")
    pre1 = perfect_diff_sae(D, hook_name="blocks.1.hook_resid_pre")
    assert resolve_layer(pair, None, {"a": post0, "b": pre1}) == 1
    assert resolve_layer(pair, "blocks.0.hook_resid_post", post0) == 1
    assert resolve_layer(pair, 2, perfect_crosscoder(D)) == 2  # no recorded hook: trust layer
    with pytest.raises(LayerError, match="split layer 1.*patching layer is 2"):
        resolve_layer(pair, 2, post0)
    with pytest.raises(LayerError, match="d_in=32"):
        resolve_layer(pair, 1, perfect_diff_sae(32))
