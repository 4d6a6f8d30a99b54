"""Diff amplification in logit and activation space."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers_models import CHARS, SPECIAL_TOKENS, make_tokenizer, random_tokens, tiny_cfg
from transformer_lens import HookedTransformer

from sae_diff.evaluation.amplification import (
    amplification_sweep,
    amplified_logits,
    amplified_model_logits,
    contains_tokens,
    response_logprob,
    sample_amplified,
)
from sae_diff.pairing.model import PairedModel

TARGET = len(SPECIAL_TOKENS) + CHARS.index("z")  # the planted response token


@pytest.fixture(scope="module")
def planted() -> PairedModel:
    """ft = base with a small extra logit on one token: a rare ft behaviour."""
    tok = make_tokenizer()
    cfg = tiny_cfg(n_layers=2, d_model=16)
    torch.manual_seed(0)
    base = HookedTransformer(cfg, tokenizer=tok)
    ft = HookedTransformer(copy.deepcopy(cfg), tokenizer=tok)
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        ft.unembed.b_U[TARGET] += 0.7
    return PairedModel(base.eval(), ft.eval())


def test_alpha_zero_is_the_ft_model(pair):
    toks = random_tokens(batch=2, seq=8)
    lb, lf = pair.logits(toks)
    assert torch.equal(amplified_model_logits(pair, toks, 0.0), lf)
    torch.testing.assert_close(
        amplified_model_logits(pair, toks, 0.0, mode="activations", layer=1),
        lf,
        atol=1e-5,
        rtol=1e-5,
    )
    torch.testing.assert_close(amplified_logits(lf, lb, 2.0), 3 * lf - 2 * lb)
    torch.testing.assert_close(amplified_logits(lf, lb, -1.0), lb)  # alpha = -1 is the base
    a1 = amplified_model_logits(
        pair, toks, 1.0, mode="activations", layer="blocks.0.hook_resid_post"
    )
    assert not torch.allclose(a1, lf, atol=1e-3)
    with pytest.raises(ValueError, match="needs layer="):
        amplified_model_logits(pair, toks, 1.0, mode="activations")
    with pytest.raises(ValueError, match="mode must be"):
        amplified_model_logits(pair, toks, 1.0, mode="weights")


def test_planted_response_grows_with_alpha(planted):
    prompts = random_tokens(batch=3, seq=6, seed=7)
    toks = torch.cat([prompts, torch.full((3, 1), TARGET)], dim=1)
    resp = torch.zeros_like(toks, dtype=torch.bool)
    resp[:, -1] = True
    df = response_logprob(planted, toks, resp, [0.0, 1.0, 4.0])
    lp = df["logprob"].tolist()
    assert lp[0] < lp[1] < lp[2]
    assert df["logprob_per_token"].tolist() == pytest.approx(lp)  # one response token
    _, lf = planted.logits(toks)
    expected = torch.log_softmax(lf[:, -2], -1)[:, TARGET].mean()
    assert lp[0] == pytest.approx(float(expected), abs=1e-5)
    sweep = amplification_sweep(
        planted,
        [prompts[0]],
        [0.0, 8.0],
        contains_tokens([TARGET]),
        n_samples=48,
        max_new_tokens=1,
        seed=0,
    )
    r0, r8 = sweep["rate"].tolist()
    assert sweep["n"].tolist() == [48, 48]
    assert r8 > r0 + 0.2


def test_sampling_is_reproducible_and_stops(pair):
    prompt = random_tokens(batch=2, seq=4, seed=9)
    a = sample_amplified(pair, prompt, 1.0, max_new_tokens=5, seed=3)
    b = sample_amplified(pair, prompt, 1.0, max_new_tokens=5, seed=3)
    assert a.shape == (2, 9) and torch.equal(a, b) and torch.equal(a[:, :4], prompt)
    g = sample_amplified(pair, prompt, 0.0, max_new_tokens=1, temperature=0)
    assert torch.equal(g[:, -1], pair.ft(prompt)[:, -1].argmax(-1))
    first = int(g[0, -1])
    s = sample_amplified(
        pair, prompt[:1], 0.0, max_new_tokens=4, temperature=0, stop_token_ids=[first]
    )
    assert s.shape == (1, 8) and (s[0, 4:] == first).all()
    df, samples = amplification_sweep(
        pair,
        prompt,
        [0.0],
        lambda ids, text: True,
        n_samples=2,
        max_new_tokens=2,
        return_samples=True,
    )
    assert df["rate"].tolist() == [1.0] and len(samples) == 4
