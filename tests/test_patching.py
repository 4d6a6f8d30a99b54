"""KL patching at a dictionary's layer (METHODS.md §4): identities, perfect dictionaries,
planted subsets vs random baselines, the table, and bad input."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from helpers_models import random_tokens
from test_patching_support import (
    perfect_crosscoder,
    perfect_diff_sae,
    planted_crosscoder,
    planted_diff_sae,
    planted_pair,
)

from sae_diff.dictionaries.crosscoder import Crosscoder, CrosscoderConfig
from sae_diff.evaluation.patching import (
    DictionaryPatcher,
    compare_dictionaries,
    error_patch,
    evaluate_interventions,
    ft_reference,
    gap_closed_summary,
    kl_patching_table,
    latent_indices,
    nu_rank_latents,
    nu_scores,
    nu_threshold_latents,
    random_latents,
    reconstruction_patch,
    split_batch,
    steering_patch,
    subset_patch,
    token_patch,
)
from sae_diff.evaluation.stitching import LayerError

D = 16


TINY_PAIR = {"n_layers": 2, "d_model": D}  # the `pair` fixture of conftest.py


@pytest.fixture(scope="module")
def toks() -> torch.Tensor:
    return random_tokens(batch=4, seq=12, seed=1)


def _mask(toks: torch.Tensor) -> torch.Tensor:
    m = torch.ones_like(toks, dtype=torch.bool)
    m[:, 0] = False  # BOS
    return m


def test_identity_interventions_give_zero_kl(pair, toks):
    everywhere = torch.ones_like(toks, dtype=torch.bool)
    res = evaluate_interventions(
        pair,
        toks,
        _mask(toks),
        1,
        {"x_ft": ft_reference(), "all_tokens": token_patch(everywhere)},
        batch_size=3,
    )
    assert res["stitched"]["kl"] > 1e-3  # there is a gap to close
    for name in ("ft", "x_ft", "all_tokens"):
        assert res[name]["kl"] == pytest.approx(0.0, abs=1e-9)
        assert res[name]["nll"] == pytest.approx(res["ft"]["nll"], abs=1e-6)
    none = evaluate_interventions(
        pair, toks, _mask(toks), 1, {"no_tokens": token_patch(torch.zeros_like(everywhere))}
    )
    assert none["no_tokens"]["kl"] == pytest.approx(none["stitched"]["kl"], rel=1e-6)


@pytest.mark.parametrize("layer", [1, 2])
def test_perfect_crosscoder_reconstruction_is_ft_and_error_is_stitched(pair, toks, layer):
    cc = perfect_crosscoder(D)
    df = kl_patching_table(
        pair, {"cc": cc}, toks, _mask(toks), layer=layer, random_seeds=0, first_k_patch=None
    )
    by = df.set_index("intervention")
    assert by.at["stitched", "kl"] > 1e-3
    assert by.at["reconstruction", "kl"] < 1e-5 * by.at["stitched", "kl"] + 1e-7
    assert by.at["reconstruction", "closed"] == pytest.approx(1.0, abs=1e-4)
    assert by.at["error", "kl"] == pytest.approx(by.at["stitched", "kl"], rel=1e-4)
    assert by.at["error", "closed"] == pytest.approx(0.0, abs=1e-4)
    assert by.at["reconstruction", "nll"] == pytest.approx(by.at["ft", "nll"], abs=1e-4)


def test_perfect_crosscoder_logits_match_ft_exactly(pair, toks):
    cc = perfect_crosscoder(D)
    p = DictionaryPatcher(cc)
    b = split_batch(pair, toks, 1)
    lf = pair.ft(toks)
    h_rec, h_err = reconstruction_patch(p)(b), error_patch(p)(b)
    torch.testing.assert_close(h_rec, b.x_ft, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_err, b.x_base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pair.continue_from("ft", h_rec, 1), lf, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        pair.continue_from("ft", h_err, 1),
        pair.stitched_logits(toks, 1, first="base"),
        atol=1e-4,
        rtol=1e-4,
    )


@pytest.mark.parametrize("sign", ["ft_minus_base", "base_minus_ft"])
def test_perfect_diff_sae(pair, toks, sign):
    ds = perfect_diff_sae(D, sign=sign)
    df = kl_patching_table(pair, ds, toks, _mask(toks), layer=1, random_seeds=0, first_k_patch=None)
    by = df.set_index("intervention")
    assert set(df["dictionary"]) == {"dictionary"}
    assert by.at["reconstruction", "closed"] == pytest.approx(1.0, abs=1e-4)
    assert by.at["error", "kl"] == pytest.approx(by.at["stitched", "kl"], rel=1e-4)
    assert "subset:ft_only" not in by.index  # Δ needs a crosscoder


def test_recon_plus_error_is_the_whole_difference_with_biases(pair, toks):
    g = torch.Generator().manual_seed(0)
    cc = perfect_crosscoder(D, bias=torch.randn(2, D, generator=g))
    b = split_batch(pair, toks, 1)
    for include_bias in (False, True):
        p = DictionaryPatcher(cc, include_bias=include_bias)
        h_rec, h_err = reconstruction_patch(p)(b), error_patch(p)(b)
        torch.testing.assert_close(h_rec + h_err - b.x_base, b.x_ft, atol=1e-5, rtol=1e-5)
    # with the bias difference excluded (the METHODS default) the recon misses exactly it
    p = DictionaryPatcher(cc)
    gap = reconstruction_patch(p)(b) - b.x_ft
    torch.testing.assert_close(
        gap, -(cc.b_dec[1] - cc.b_dec[0]).expand_as(gap), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        reconstruction_patch(DictionaryPatcher(cc, include_bias=True))(b),
        b.x_ft,
        atol=1e-5,
        rtol=1e-5,
    )


def test_subset_of_all_latents_is_reconstruction_and_steering_formula(pair, toks):
    torch.manual_seed(1)
    cc = Crosscoder(CrosscoderConfig(d_in=D, d_sae=24))  # random weights
    with torch.no_grad():
        cc.b_dec.normal_()
    p = DictionaryPatcher(cc)
    b = split_batch(pair, toks, 1)
    torch.testing.assert_close(subset_patch(p, torch.arange(24))(b), reconstruction_patch(p)(b))
    S = torch.tensor([1, 5, 7])
    f = cc.encode(torch.stack([b.x_base, b.x_ft], dim=-2))
    manual = b.x_base + f[..., S] @ cc.W_dec[S, 1]
    torch.testing.assert_close(steering_patch(p, S)(b), manual, atol=1e-5, rtol=1e-5)
    manual_sub = b.x_base + f[..., S] @ (cc.W_dec[S, 1] - cc.W_dec[S, 0])
    torch.testing.assert_close(subset_patch(p, S)(b), manual_sub, atol=1e-5, rtol=1e-5)


def test_planted_targeted_subset_beats_random_baselines():
    pair, v = planted_pair(layer=1)
    toks = random_tokens(batch=4, seq=10, seed=2)
    dicts = {
        "cc": planted_crosscoder(v, n=32, hook_name="blocks.0.hook_resid_post"),
        "diff": planted_diff_sae(v, n=32, hook_name="blocks.0.hook_resid_post"),
        "diff_neg": planted_diff_sae(
            v, n=32, sign="base_minus_ft", hook_name="blocks.1.hook_resid_pre"
        ),
    }
    df = kl_patching_table(
        pair,
        dicts,
        toks,
        _mask(toks),
        subsets={"diff": {"planted": [0]}},
        random_seeds=4,
        first_k_patch=None,
    )
    assert df.attrs["layer"] == 1  # resid_post of block 0 == resid_pre of block 1
    by = df.set_index(["dictionary", "intervention"])
    assert by.loc[("cc", "stitched"), "kl"] > 1e-2
    for name in dicts:
        assert by.loc[(name, "reconstruction"), "closed"] == pytest.approx(1.0, abs=1e-4)
    ft_only = by.loc[("cc", "subset:ft_only")]
    assert ft_only["n_latents"] == 1
    assert ft_only["closed"] == pytest.approx(1.0, abs=1e-4)
    rnd = by.loc[("cc", "random:ft_only")]
    assert rnd["n_seeds"] == 4 and rnd["n_latents"] == 1
    assert rnd["closed"] < 0.5  # shared latents carry nothing of the difference
    assert by.loc[("diff", "subset:planted"), "closed"] == pytest.approx(1.0, abs=1e-4)
    assert by.loc[("diff", "random:planted"), "closed"] < 0.5
    # steering with the ft-only latent adds f * d^c = v: the full difference here
    assert by.loc[("cc", "steering:ft_only"), "closed"] == pytest.approx(1.0, abs=1e-4)
    # random rows follow their subset; every block starts with the references
    rows = list(df[df.dictionary == "cc"].intervention)
    assert rows[:2] == ["ft", "stitched"]
    assert rows.index("random:ft_only") == rows.index("subset:ft_only") + 1


def test_table_with_nu_subsets_and_side_by_side(pair, toks):
    cc = perfect_crosscoder(D, hook_name="blocks.1.hook_resid_pre")
    ds = perfect_diff_sae(D, hook_name="blocks.1.hook_resid_pre")
    n_cc = cc.cfg.d_sae
    nu_cc = pd.DataFrame(
        {
            "latent": range(n_cc),
            "nu_eps": torch.linspace(0, 1, n_cc).numpy(),
            "nu_r": torch.zeros(n_cc).numpy(),
        }
    )
    nu_ds = pd.Series(torch.linspace(0, 1, 2 * D).numpy())
    nu_ds[28:] = float("nan")  # unknown ν (e.g. dead latents): never selected nor drawn
    seq_mask = torch.ones_like(toks, dtype=torch.bool)  # every position, BOS included
    template = torch.zeros_like(seq_mask)
    template[:, 3] = True
    df = kl_patching_table(
        pair,
        {"cc": cc, "ds": ds},
        toks,
        seq_mask,
        nu={"cc": nu_cc, "ds": nu_ds},
        random_seeds=2,
        token_patches={"template": template},
        first_k_patch=3,
        first_n=3,
    )
    assert df.attrs == {"layer": 1, "first_n": 3}
    keys = set(df[df.dictionary == "ds"].intervention)
    assert {
        "ft",
        "stitched",
        "tokens:first3",
        "tokens:template",
        "reconstruction",
        "error",
        "subset:nu<0.3",
        "random:nu<0.3",
        "subset:nu<0.6",
        "subset:nu_low50%",
        "subset:nu_high50%",
    } <= keys
    by = df.set_index(["dictionary", "intervention"])
    # diff-SAE: ν < 0.3 among all 32 latents (linspace 0..1): ids 0..9
    assert by.loc[("ds", "subset:nu<0.3"), "n_latents"] == 10
    assert "from a pool of 28" in by.loc[("ds", "random:nu<0.3"), "description"]
    assert by.loc[("ds", "subset:nu_high50%"), "n_latents"] == 14
    # crosscoder: ν subsets are taken among the ft-only latents (Δ = 0 for model-1 latents)
    assert by.loc[("cc", "subset:ft_only"), "n_latents"] == 2 * D
    assert by.loc[("cc", "subset:nu_low50%"), "n_latents"] == D
    # the first 3 masked positions patched with x^c: KL there is exactly 0 (causal), not after
    first3 = by.loc[("cc", "tokens:first3")]
    assert first3["kl_first"] == pytest.approx(0.0, abs=1e-9)
    assert first3["kl_rest"] > 0
    wide = compare_dictionaries(df)
    assert list(wide.columns) == ["cc", "ds"]
    assert wide.loc["reconstruction"].tolist() == pytest.approx([1.0, 1.0], abs=1e-4)
    assert pd.isna(wide.loc["subset:ft_only", "ds"])
    summ = gap_closed_summary(df)
    assert summ.loc["ds", "nu_subset"] == "subset:nu<0.3"
    assert summ.loc["cc", "error"] == pytest.approx(0.0, abs=1e-4)
    assert set(summ.columns) >= {"reconstruction", "error", "nu_subset_closed", "nu_random"}


def test_latent_subset_helpers():
    score = torch.tensor([0.1, float("nan"), 0.5, 0.2, 0.9])
    assert nu_threshold_latents(score, 0.3).tolist() == [0, 3]
    assert nu_threshold_latents(score, 0.3, pool=torch.tensor([3, 4])).tolist() == [3]
    assert nu_rank_latents(score, 0.5).tolist() == [0, 3]
    assert nu_rank_latents(score, 0.5, lowest=False).tolist() == [2, 4]
    r1, r2 = random_latents(3, 10, seed=0), random_latents(3, 10, seed=1)
    assert r1.numel() == 3 and r1.unique().numel() == 3 and not torch.equal(r1, r2)
    torch.testing.assert_close(random_latents(3, 10, seed=0), r1)
    assert latent_indices(torch.tensor([True, False, True]), 3).tolist() == [0, 2]
    assert latent_indices(pd.Series([True], index=[2]), 4).tolist() == [2]
    rank, thr = nu_scores(pd.DataFrame({"nu_eps": [0.1, 0.4], "nu_r": [0.2, 0.1]}), 3)
    torch.testing.assert_close(rank[:2], torch.tensor([0.3, 0.5], dtype=torch.float64))
    torch.testing.assert_close(thr[:2], torch.tensor([0.2, 0.4], dtype=torch.float64))
    assert torch.isnan(rank[2])
    rank2, _ = nu_scores(
        pd.DataFrame({"nu_error": [0.1], "nu_recon": [0.2]}), 1
    )  # latent_scaling names
    torch.testing.assert_close(rank2, torch.tensor([0.3], dtype=torch.float64))
    with pytest.raises(ValueError, match="latent ids must lie"):
        latent_indices([0, 7], 4)
    with pytest.raises(ValueError, match="nu_eps"):
        nu_scores(pd.DataFrame({"x": [1.0]}), 1)
    with pytest.raises(ValueError, match="one value per latent"):
        nu_scores(torch.zeros(3), 4)


def test_bad_input_gives_clear_errors(pair, toks):
    cc = perfect_crosscoder(D)
    with pytest.raises(LayerError, match=r"layer must be an int in \[0, n_layers=2\]"):
        kl_patching_table(pair, cc, toks, layer=3)
    other_hook = perfect_crosscoder(D, hook_name="blocks.0.hook_resid_pre")
    with pytest.raises(LayerError, match="trained at 'blocks.0.hook_resid_pre'.*pass layer=0"):
        kl_patching_table(pair, other_hook, toks, layer=1)
    with pytest.raises(LayerError, match="not a residual-stream hook"):
        kl_patching_table(pair, perfect_crosscoder(D, hook_name="blocks.0.hook_mlp_out"), toks)
    with pytest.raises(LayerError, match="names block 5"):
        kl_patching_table(pair, perfect_crosscoder(D, hook_name="blocks.5.hook_resid_post"), toks)
    with pytest.raises(LayerError, match="d_in=8 but .* d_model=16"):
        kl_patching_table(pair, perfect_crosscoder(8), toks, layer=1)
    with pytest.raises(LayerError, match="no layer given"):
        kl_patching_table(pair, cc, toks)
    with pytest.raises(LayerError, match="different|trained at"):
        kl_patching_table(
            pair,
            {
                "a": perfect_crosscoder(D, hook_name="blocks.0.hook_resid_pre"),
                "b": perfect_crosscoder(D, hook_name="blocks.1.hook_resid_pre"),
            },
            toks,
        )
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    with pytest.raises(LayerError, match="single-model SAE"):
        kl_patching_table(pair, StandardSAE(StandardSAEConfig(d_in=D, d_sae=8)), toks, layer=1)
    with pytest.raises(ValueError, match="unknown dictionaries"):
        kl_patching_table(pair, {"cc": cc}, toks, layer=1, nu={"other": torch.zeros(4)})
    with pytest.raises(ValueError, match="token mask shape"):
        kl_patching_table(pair, cc, toks, torch.ones(2, 2, dtype=torch.bool), layer=1)
    with pytest.raises(ValueError, match="must return a residual shaped"):
        evaluate_interventions(pair, toks, None, 1, {"bad": lambda b: b.x_base[..., :3]})
