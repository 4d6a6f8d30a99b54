"""Per-token KL, masks and the KL dashboard."""

from __future__ import annotations

import pytest
import torch
from helpers_models import make_tokenizer, random_tokens, tiny_pair

from sae_diff.evaluation.kl import (
    first_n_of_mask,
    kl_dashboard,
    masked_summary,
    per_token_kl,
    predicting,
    split_first_n,
    token_kl,
    token_nll,
)
from sae_diff.pairing.masks import assistant_mask
from sae_diff.pairing.model import PairedModel


def test_token_kl_matches_definition():
    g = torch.Generator().manual_seed(0)
    lp, lq = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    p, q = lp.softmax(-1), lq.softmax(-1)
    manual = (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(token_kl(lp, lq), manual, atol=1e-6, rtol=1e-5)
    assert torch.equal(token_kl(lp, lp), torch.zeros(2, 5))
    torch.testing.assert_close(token_kl(lp, lp + 3.0), torch.zeros(2, 5), atol=1e-6, rtol=0)
    assert (token_kl(lq, lp) != token_kl(lp, lq)).any()  # direction matters
    with pytest.raises(ValueError, match="logits shapes differ"):
        token_kl(lp, lq[:, :3])


def test_token_nll_is_next_token_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, generator=g)
    toks = torch.randint(0, 6, (2, 4), generator=g)
    nll = token_nll(logits, toks)
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 6), toks[:, 1:].reshape(-1), reduction="none"
    ).view(2, 3)
    torch.testing.assert_close(nll[:, :-1], ce)
    assert torch.isnan(nll[:, -1]).all()


def test_masks_select_the_tokens_they_name():
    m = torch.tensor([[0, 1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    first = first_n_of_mask(m, 2)
    assert first.tolist() == [[0, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0]]
    f, r = split_first_n(m, 2)
    assert torch.equal(f | r, m) and not (f & r).any()
    assert predicting(m)[0].tolist() == [1, 1, 0, 1, 1, 1, 0]
    vals = torch.arange(14.0).view(2, 7)
    s = masked_summary(vals, m, 2)
    assert s["first"] == pytest.approx((1 + 2 + 7 + 8) / 4)
    assert s["n_all"] == 12 and s["n_first"] == 4 and s["n_rest"] == 8
    with pytest.raises(ValueError):
        first_n_of_mask(m, -1)


def _chat_tokens(tok) -> torch.Tensor:
    convs = [
        [
            {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": "hello, how are you?"},
        ],
        [
            {"role": "user", "content": "a question?"},
            {"role": "assistant", "content": "an answer here."},
        ],
    ]
    texts = [tok.apply_chat_template(c, tokenize=False) for c in convs]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    S = max(len(i) for i in ids)
    out = torch.full((len(ids), S), tok.pad_token_id)
    for k, i in enumerate(ids):
        out[k, : len(i)] = torch.tensor(i)
    return out


def test_kl_dashboard_on_assistant_tokens(tmp_path):
    tok = make_tokenizer()
    base, ft = tiny_pair(n_layers=2, d_model=16, n_ctx=64, tokenizer=tok)
    pair = PairedModel(base, ft)
    toks = _chat_tokens(tok)
    mask = assistant_mask(toks, tok)
    assert 0 < int(mask.sum()) < mask.numel()
    dash = kl_dashboard(pair, toks, mask, top_n=8, first_n=10, context=6, batch_size=1)
    t = dash.table
    assert len(t) == 8
    assert t["kl"].is_monotonic_decreasing
    assert all(bool(mask[r.seq, r.pos]) for r in t.itertuples())  # only masked positions
    lb, lf = pair.logits(toks)
    kl = token_kl(lf, lb)
    assert dash.summary["all"] == pytest.approx(float(kl[mask].mean()), rel=1e-5)
    first = first_n_of_mask(mask, 10)
    assert dash.summary["first"] == pytest.approx(float(kl[first].mean()), rel=1e-5)
    assert dash.summary["n_rest"] == int((mask & ~first).sum())
    assert all(r.in_first == bool(first[r.seq, r.pos]) for r in t.itertuples())
    assert torch.isnan(dash.kl[~mask]).all()
    r0 = t.iloc[0]
    assert r0["context"].endswith(f"[[{r0['token']}]]")
    assert r0["kl"] == pytest.approx(float(kl[r0["seq"], r0["pos"]]), rel=1e-5)
    html = dash.to_html()
    assert html.startswith("<!doctype html>") and html.count("<tr>") == 9
    path = dash.save_html(tmp_path / "kl" / "dash.html")
    assert path.read_text(encoding="utf-8") == html
    # per_token_kl agrees and the reverse direction differs
    stats = per_token_kl(pair, toks, batch_size=2)
    torch.testing.assert_close(stats["kl"], kl, atol=1e-6, rtol=1e-5)
    rev = per_token_kl(pair, toks, reverse=True)["kl"]
    torch.testing.assert_close(rev, token_kl(lb, lf), atol=1e-6, rtol=1e-5)


def test_dashboard_without_mask_and_bad_mask():
    base, ft = tiny_pair(n_layers=2, d_model=16)
    pair = PairedModel(base, ft)
    toks = random_tokens(batch=2, seq=8)
    dash = kl_dashboard(pair, toks, top_n=100)
    assert len(dash.table) == toks.numel()
    with pytest.raises(ValueError, match="token mask shape"):
        kl_dashboard(pair, toks, torch.ones(2, 3, dtype=torch.bool))
