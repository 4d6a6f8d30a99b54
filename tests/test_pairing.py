"""PairedModel: checks, lock-step forward, stitching (HookedTransformer and loaded HF pair)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers_models import make_tokenizer, random_tokens, tiny_cfg, tiny_pair
from transformer_lens import HookedTransformer

from sae_diff.pairing.errors import HookNameError, PairingError, PairingWarning
from sae_diff.pairing.model import PairedModel

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out"]


TINY_PAIR = {
    "n_layers": 3,
    "base_name": "tiny-base",
    "ft_name": "tiny-ft",
}  # the `pair` fixture of conftest.py


def test_paired_activations_match_run_with_cache(pair: PairedModel) -> None:
    toks = random_tokens(3, 12)
    acts = pair.paired_activations(toks, HOOKS)
    _, cb = pair.base.run_with_cache(toks)
    _, cf = pair.ft.run_with_cache(toks)
    for h in HOOKS:
        assert acts[h].shape == (3, 12, 2, pair.d_model)
        torch.testing.assert_close(acts[h][:, :, 0], cb[h], rtol=0, atol=0)
        torch.testing.assert_close(acts[h][:, :, 1], cf[h], rtol=0, atol=0)


def test_paired_activations_stop_early(pair: PairedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """One forward per model, stopping after the last needed layer (``blocks.1.hook_resid_pre``
    is read as ``blocks.0.hook_resid_post``, the same tensor, so block 1 is not run)."""
    seen: list[dict] = []
    orig_b, orig_f = pair.base.run_with_cache, pair.ft.run_with_cache

    def spy(orig):
        def run(*a, **kw):
            seen.append(kw)
            return orig(*a, **kw)

        return run

    monkeypatch.setattr(pair.base, "run_with_cache", spy(orig_b))
    monkeypatch.setattr(pair.ft, "run_with_cache", spy(orig_f))
    pair.paired_activations(
        random_tokens(), ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]
    )
    assert len(seen) == 2 and all(kw["stop_at_layer"] == 1 for kw in seen)
    seen.clear()
    pair.paired_activations(random_tokens(), ["blocks.1.hook_resid_post"])
    assert all(kw["stop_at_layer"] == 2 for kw in seen)


def test_stitching_endpoints_exact(pair: PairedModel) -> None:
    toks = random_tokens(2, 10)
    lb, lf = pair.logits(toks)
    n = pair.n_layers
    for first, pure_first, pure_second in (("base", lb, lf), ("ft", lf, lb)):
        torch.testing.assert_close(
            pair.stitched_logits(toks, 0, first=first), pure_second, rtol=0, atol=0
        )
        torch.testing.assert_close(
            pair.stitched_logits(toks, n, first=first), pure_first, rtol=0, atol=0
        )
        mid = pair.stitched_logits(toks, 1, first=first)
        assert not torch.allclose(mid, lb) and not torch.allclose(mid, lf)


def test_stitching_mid_layer_and_edit(pair: PairedModel) -> None:
    toks = random_tokens(2, 10)
    # base up to layer 2, then ft: by hand with TL's own start_at_layer
    resid = pair.base(toks, stop_at_layer=2)
    expected = pair.ft(resid, start_at_layer=2)
    torch.testing.assert_close(pair.stitched_logits(toks, 2, first="base"), expected)
    # an edit that swaps in ft's own residual gives ft's logits exactly
    ft_resid = pair.residual_at("ft", toks, 2)
    out = pair.stitched_logits(toks, 2, first="base", edit=lambda h: ft_resid)
    torch.testing.assert_close(out, pair.ft(toks), rtol=0, atol=0)
    # residual_at(L) equals the resid_pre hook, n_layers equals the final resid_post
    _, cache = pair.base.run_with_cache(toks)
    torch.testing.assert_close(pair.residual_at("base", toks, 1), cache["blocks.1.hook_resid_pre"])
    torch.testing.assert_close(
        pair.residual_at("base", toks, pair.n_layers),
        cache[f"blocks.{pair.n_layers - 1}.hook_resid_post"],
    )
    with pytest.raises(ValueError, match="edit must return"):
        pair.stitched_logits(toks, 1, edit=lambda h: h[:, :1])
    with pytest.raises(ValueError, match="layer must be"):
        pair.stitched_logits(toks, pair.n_layers + 1)
    with pytest.raises(ValueError, match="'base' or 'ft'"):
        pair.residual_at("chat", toks, 1)


def test_bad_hook_lists_valid_names(pair: PairedModel) -> None:
    with pytest.raises(HookNameError, match=r"blocks\.0\.hook_resid_pre"):
        pair.paired_activations(random_tokens(), ["blocks.7.hook_resid_pre"])
    with pytest.raises(HookNameError, match="unknown hook"):
        pair.validate_hooks(["resid_pre_2"])


def test_bad_tokens(pair: PairedModel) -> None:
    with pytest.raises(ValueError, match="token ids must lie"):
        pair.paired_activations(torch.full((1, 4), 10_000), HOOKS[:1])
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        pair.paired_activations(torch.zeros(4, dtype=torch.long), HOOKS[:1])


def test_mismatched_models_raise() -> None:
    base, _ = tiny_pair(n_layers=2)
    tok = make_tokenizer()
    deeper = HookedTransformer(tiny_cfg(n_layers=3), tokenizer=tok)
    with pytest.raises(PairingError, match="n_layers differ: base has 2, ft has 3"):
        PairedModel(base, deeper)
    wider = HookedTransformer(tiny_cfg(d_model=24), tokenizer=tok)
    with pytest.raises(PairingError, match="d_model differs"):
        PairedModel(base, wider)


def test_mismatched_tokenizers_name_first_id() -> None:
    base, ft = tiny_pair(n_layers=2)
    other = make_tokenizer(extra_chars="")
    vocab = other.get_vocab()
    # swap two ordinary tokens: same size, different mapping at ids of 'a' and 'b'
    a, b = vocab["a"], vocab["b"]
    ft.tokenizer = _swapped_tokenizer(other, "a", "b")
    with pytest.raises(PairingError, match=rf"first differing id: id {min(a, b)}"):
        PairedModel(base, ft)


def _swapped_tokenizer(tok, x: str, y: str):
    class Swapped:
        def __init__(self, inner):
            self.inner = inner

        def get_vocab(self):
            v = dict(self.inner.get_vocab())
            v[x], v[y] = v[y], v[x]
            return v

        def __getattr__(self, name):
            return getattr(self.inner, name)

    return Swapped(tok)


def test_special_token_configuration_differs_warns_once() -> None:
    """A different BOS/EOS *configuration* over the same vocabulary is how base and instruct
    tokenizers differ: resolved (the ft tokenizer is used) with one warning, never refused."""
    base, ft = tiny_pair(n_layers=2)

    class OtherBos:
        def __init__(self, inner):
            self.inner = inner
            self.bos_token_id = 1

        def __getattr__(self, name):
            return getattr(self.inner, name)

    ft.tokenizer = OtherBos(ft.tokenizer)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        pair = PairedModel(base, ft)
    msgs = [str(w.message) for w in rec if issubclass(w.category, PairingWarning)]
    assert len(msgs) == 1 and "bos_token: base <bos> (0), ft <bos> (1)" in msgs[0]
    assert pair.tokenizer is ft.tokenizer and pair.bos_token_id == 1
    assert pair.tokenizer_differences[0] == "bos_token: base <bos> (0), ft <bos> (1)"


def test_too_long_sequence(pair: PairedModel) -> None:
    with pytest.raises(ValueError, match="exceeds the model's context n_ctx=32"):
        pair.paired_activations(random_tokens(1, 40), HOOKS[:1])
