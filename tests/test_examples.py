"""Max-activating examples: planted activations, streaming invariance, rendering, cache reader."""

from __future__ import annotations

import pytest
import torch
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

import sae_diff  # noqa: F401
from sae_diff.analysis.batches import PairedBatch, cache_batches
from sae_diff.analysis.examples import (
    examples_html,
    examples_on_the_fly,
    max_activating_examples,
    save_examples_html,
)
from sae_diff.analysis.latent_scaling import latent_scaling

N_SEQ, SEQ, D = 7, 9, 3
ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def _setup():
    """ft-SAE reading x^c through the identity: latent l's activation is x^c[..., l] when > 0.1."""
    sae = JumpReLUSAE(
        JumpReLUSAEConfig(
            d_in=D, d_sae=D, dtype="float64", device="cpu", apply_b_dec_to_input=False
        )
    )
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(D, dtype=torch.float64))
        sae.b_enc.zero_()
        sae.threshold.fill_(0.1)
        sae.W_dec.copy_(torch.eye(D, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    vals = torch.rand(N_SEQ, SEQ, D, generator=g, dtype=torch.float64)
    vals[vals < 0.4] = 0.0  # sparse codes; everything else is well above the threshold
    acts = torch.stack([torch.zeros_like(vals), vals], dim=2)  # (n_seq, seq, 2, d)
    tokens = torch.randint(0, 26, (N_SEQ, SEQ), generator=g)
    return sae, acts, tokens, vals


def _batches(acts: torch.Tensor, rows: int):
    for r0 in range(0, N_SEQ, rows):
        a = acts[r0 : r0 + rows]
        seq = torch.arange(r0, r0 + a.shape[0])[:, None].expand(a.shape[:2])
        pos = torch.arange(SEQ)[None].expand(a.shape[:2])
        yield {"acts": a, "seq": seq, "pos": pos}


def test_top_examples_match_planted_values_and_streaming():
    sae, acts, tokens, vals = _setup()
    kw = dict(
        kind="ft_sae",
        k=5,
        n_quantiles=3,
        per_quantile=2,
        window=(2, 1),
        tokenizer=lambda t: ALPHABET[t],
        progress=False,
    )
    one = max_activating_examples(sae, list(_batches(acts, N_SEQ)), tokens, [2, 0], **kw)
    many = max_activating_examples(sae, list(_batches(acts, 2)), tokens, [2, 0], **kw)
    assert list(one) == [2, 0]
    for lat in (0, 2):
        flat = vals[..., lat].reshape(-1)
        top = flat.topk(5)
        got = one[lat].top
        assert [e.value for e in got] == pytest.approx(top.values.tolist())
        assert [(e.seq, e.pos) for e in got] == [divmod(int(i), SEQ) for i in top.indices]
        assert [(e.seq, e.pos, e.value) for e in many[lat].top] == [
            (e.seq, e.pos, e.value) for e in got
        ]
        assert one[lat].count_active == int((flat > 0).sum()) and one[lat].n_tokens == N_SEQ * SEQ
        # context window and the marked token
        e = got[0]
        lo = max(0, e.pos - 2)
        assert e.tokens == [ALPHABET[t] for t in tokens[e.seq, lo : e.pos + 2].tolist()]
        assert e.tokens[e.active] == ALPHABET[int(tokens[e.seq, e.pos])]
        # quantile samples: real active tokens, bins ordered from high to low, values inside bins
        bins = one[lat].quantiles
        assert len(bins) == 3 and bins[0][0] >= bins[-1][1] - 1e-12
        for lo_v, hi_v, exs in bins:
            assert 1 <= len(exs) <= 2
            for ex in exs:
                assert lo_v <= ex.value <= hi_v
                assert ex.value == pytest.approx(float(vals[ex.seq, ex.pos, lat]))


def test_rendering_text_and_html(tmp_path):
    sae, acts, tokens, _ = _setup()
    tokens[0, :] = 0
    res = max_activating_examples(
        sae,
        _batches(acts, 3),
        tokens,
        [1],
        kind="ft_sae",
        k=3,
        tokenizer=lambda t: "<&>\n" if t == 0 else ALPHABET[t],
        progress=False,
    )
    ex = res[1].top[0]
    text = ex.to_text()
    assert f"«{ex.tokens[ex.active].replace(chr(10), '↵')}»" in text and f"{ex.value:.3f}" in text
    html = ex.to_html()
    assert 'class="sd-act"' in html and "<&>" not in html.replace('class="sd-act"', "")
    page = examples_html(res)
    assert page.startswith("<!DOCTYPE html>") and "Latent 1" in page
    assert "Latent 1" in res[1]._repr_html_() and "latent 1: active on" in str(res[1])
    path = save_examples_html(res, tmp_path / "ex.html")
    assert path.read_text(encoding="utf-8") == page


def test_on_the_fly_equals_precomputed_and_masks_tokens():
    sae, acts, tokens, _ = _setup()
    pre = max_activating_examples(
        sae, _batches(acts, 4), tokens, [0, 1, 2], kind="ft_sae", progress=False
    )
    fly = examples_on_the_fly(
        sae,
        lambda t: acts[_rows_of(t, tokens)],
        tokens,
        [0, 1, 2],
        batch_size=3,
        kind="ft_sae",
        progress=False,
    )
    for lat in pre:
        assert [(e.seq, e.pos, e.value) for e in fly[lat].top] == [
            (e.seq, e.pos, e.value) for e in pre[lat].top
        ]
    mask = torch.ones(N_SEQ, SEQ, dtype=torch.bool)
    mask[:, 0] = False  # e.g. BOS
    masked = examples_on_the_fly(
        sae,
        lambda t: acts[_rows_of(t, tokens)],
        tokens,
        [0],
        kind="ft_sae",
        token_mask=mask,
        k=50,
        progress=False,
    )
    assert all(e.pos > 0 for e in masked[0].top) and masked[0].n_tokens == N_SEQ * (SEQ - 1)


def _rows_of(t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Row indices of a token slice in the table (the test's stand-in for a model forward)."""
    return torch.tensor([next(r for r in range(N_SEQ) if torch.equal(tokens[r], row)) for row in t])


class _FakeCache:
    """The three members of ActivationCache that cache_batches uses."""

    def __init__(self, acts, tokens):
        self.shards = [
            {"acts": acts[:4], "tokens": tokens[:4]},
            {"acts": acts[4:], "tokens": tokens[4:]},
        ]
        for s in self.shards:
            s["mask_special"] = torch.zeros(s["tokens"].shape, dtype=torch.bool)
            s["mask_special"][:, 1] = True
            s["mask_bos"] = torch.zeros(s["tokens"].shape, dtype=torch.bool)
            s["mask_bos"][:, 0] = True

    n_shards = 2

    def load_shard(self, i):
        return self.shards[i]

    def keep_mask(self, shard, mask_config):
        return ~shard["mask_bos"]


def test_cache_batches_feed_examples_and_latent_scaling():
    sae, acts, tokens, vals = _setup()
    cache = _FakeCache(acts, tokens)
    batches = list(cache_batches(cache, masks=["special"]))
    assert all(isinstance(b, PairedBatch) and set(b.masks) == {"special"} for b in batches)
    ex = max_activating_examples(sae, batches, tokens, [0], kind="ft_sae", k=100, progress=False)
    kept = vals[:, 1:, 0]
    assert ex[0].count_active == int((kept > 0).sum()) and all(e.pos > 0 for e in ex[0].top)
    assert max(e.value for e in ex[0].top) == pytest.approx(float(kept.max()))
    ls = latent_scaling(sae, batches, kind="ft_sae", min_count=1, progress=False).to_frame()
    assert ls.loc[0, "freq[special]"] == pytest.approx(float((vals[:, 1, 0] > 0).double().mean()))
    with pytest.raises(ValueError, match="no mask"):
        list(cache_batches(cache, masks=["assistant"]))


def test_examples_errors():
    sae, acts, tokens, _ = _setup()
    with pytest.raises(ValueError, match="'seq' and 'pos'"):
        max_activating_examples(
            sae, [acts.reshape(-1, 2, D)], tokens, [0], kind="ft_sae", progress=False
        )
    with pytest.raises(ValueError, match="outside the token table"):
        max_activating_examples(
            sae, _batches(acts, 7), tokens[:2], [0], kind="ft_sae", progress=False
        )
    with pytest.raises(ValueError, match="no tokens"):
        max_activating_examples(sae, [], tokens, [0], kind="ft_sae", progress=False)
