"""KL attribution: the planted latent explains the highest-KL tokens."""

from __future__ import annotations

import pytest
import torch
from helpers_models import random_tokens
from test_patching_support import planted_crosscoder, planted_diff_sae, planted_pair

from sae_diff.evaluation.attribution import kl_attribution, stitched_token_kl
from sae_diff.evaluation.stitching import LayerError


@pytest.fixture(scope="module")
def planted():
    return planted_pair(layer=1)


def test_planted_latent_ranks_first(planted):
    pair, v = planted
    toks = random_tokens(batch=3, seq=8, seed=3)
    mask = torch.ones_like(toks, dtype=torch.bool)
    mask[:, 0] = False
    cc = planted_crosscoder(v, n=16, hook_name="blocks.0.hook_resid_post")
    res = kl_attribution(pair, cc, toks, mask, top_tokens=4, n_candidates=8, top_latents=3)
    kl = stitched_token_kl(pair, toks, 1)
    assert len(res.tokens) == 4
    assert res.tokens["kl_stitched"].tolist() == sorted(res.tokens["kl_stitched"], reverse=True)
    assert res.tokens["kl_stitched"].iloc[0] == pytest.approx(float(kl[mask].max()), rel=1e-5)
    top = res.per_token[res.per_token["rank"] == 0]
    assert (top["latent"] == 0).all() and len(top) == 4
    # latent 0 carries the whole difference: its patch removes the KL at each token
    assert top["frac"].tolist() == pytest.approx([1.0] * 4, abs=1e-3)
    # the shared latents change nothing
    rest = res.per_token[res.per_token["rank"] > 0]
    assert rest["reduction"].abs().max() < 1e-5
    assert res.overall.iloc[0]["latent"] == 0 and res.overall.iloc[0]["n_tokens"] == 4
    grad = kl_attribution(pair, cc, toks, mask, top_tokens=2, method="gradient", top_latents=2)
    assert (grad.per_token.query("rank == 0")["latent"] == 0).all()


def test_attribution_with_diff_sae_and_errors(planted):
    pair, v = planted
    toks = random_tokens(batch=2, seq=6, seed=4)
    ds = planted_diff_sae(v, n=16, sign="base_minus_ft")
    res = kl_attribution(pair, ds, toks, layer=1, top_tokens=2, top_latents=1)
    assert res.per_token["latent"].tolist() == [0, 0]
    assert res.per_token["frac"].tolist() == pytest.approx([1.0, 1.0], abs=1e-3)
    with pytest.raises(ValueError, match="method must be"):
        kl_attribution(pair, ds, toks, layer=1, method="ig")
    with pytest.raises(LayerError):
        kl_attribution(pair, ds, toks, layer=7)
