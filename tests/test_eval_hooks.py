"""TransformerLens hooks that splice dictionary patches into a forward pass."""

from __future__ import annotations

import pytest
import torch
from helpers_models import random_tokens
from test_patching_support import perfect_crosscoder, perfect_diff_sae

from sae_diff.dictionaries.crosscoder import Crosscoder, CrosscoderConfig
from sae_diff.evaluation.hooks import (
    amplification_hook,
    hook_point,
    latent_direction,
    paired_hooks,
    patch_hook,
    record_codes_hook,
    steering_hook,
)
from sae_diff.evaluation.patching import (
    DictionaryPatcher,
    error_patch,
    reconstruction_patch,
    split_batch,
    subset_patch,
)
from sae_diff.evaluation.stitching import LayerError

D = 16


TINY_PAIR = {"n_layers": 2, "d_model": D}  # the `pair` fixture of conftest.py


@pytest.fixture(scope="module")
def toks() -> torch.Tensor:
    return random_tokens(batch=2, seq=9, seed=11)


def test_hooks_reproduce_the_patching_runs(pair, toks):
    torch.manual_seed(2)
    cc = Crosscoder(CrosscoderConfig(d_in=D, d_sae=24))  # random, imperfect
    cc.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    p = DictionaryPatcher(cc)
    b = split_batch(pair, toks, 1)
    for mode, iv in (
        ("reconstruction", reconstruction_patch(p)),
        ("error", error_patch(p)),
        ("subset", subset_patch(p, [0, 3])),
    ):
        name, fn = paired_hooks(pair, cc, toks, mode=mode, latents=[0, 3])
        assert name == "blocks.1.hook_resid_pre"
        hooked = pair.ft.run_with_hooks(toks, fwd_hooks=[(name, fn)])
        direct = pair.continue_from("ft", iv(b), 1)
        torch.testing.assert_close(hooked, direct, atol=1e-5, rtol=1e-5)
    # the dictionary's own hook (resid_post of block 0) is the same tensor
    _, fn = paired_hooks(pair, cc, toks, mode="reconstruction")
    via_post = pair.ft.run_with_hooks(toks, fwd_hooks=[(hook_point(cc, 2), fn)])
    torch.testing.assert_close(
        via_post, pair.continue_from("ft", reconstruction_patch(p)(b), 1), atol=1e-5, rtol=1e-5
    )


def test_perfect_dictionaries_in_a_forward(pair, toks):
    lf = pair.ft(toks)
    stitched = pair.stitched_logits(toks, 1, first="base")
    for sae in (perfect_crosscoder(D), perfect_diff_sae(D)):
        name, rec = paired_hooks(pair, sae, toks, layer=1, mode="reconstruction")
        torch.testing.assert_close(
            pair.ft.run_with_hooks(toks, fwd_hooks=[(name, rec)]), lf, atol=1e-4, rtol=1e-4
        )
        _, err = paired_hooks(pair, sae, toks, layer=1, mode="error")
        torch.testing.assert_close(
            pair.ft.run_with_hooks(toks, fwd_hooks=[(name, err)]), stitched, atol=1e-4, rtol=1e-4
        )
    _, st = paired_hooks(pair, None, toks, layer=1, mode="stitch")
    torch.testing.assert_close(
        pair.ft.run_with_hooks(toks, fwd_hooks=[(name, st)]), stitched, atol=1e-5, rtol=1e-5
    )
    # the hook also composes with run_with_cache (hooks context manager)
    with pair.ft.hooks(fwd_hooks=[(name, rec)]):
        logits, cache = pair.ft.run_with_cache(toks, names_filter=["blocks.1.hook_resid_post"])
    torch.testing.assert_close(logits, lf, atol=1e-4, rtol=1e-4)
    assert cache["blocks.1.hook_resid_post"].shape == (2, 9, D)
    # running the base model with ft activations: reconstruction gives x^c, i.e. the
    # base second half on the ft residual
    name, rec_b = paired_hooks(pair, perfect_crosscoder(D), toks, layer=1, run_on="base")
    expected = pair.continue_from("base", pair.residual_at("ft", toks, 1), 1)
    torch.testing.assert_close(
        pair.base.run_with_hooks(toks, fwd_hooks=[(name, rec_b)]), expected, atol=1e-4, rtol=1e-4
    )


def test_steering_recording_and_amplification_hooks(pair, toks):
    cc = perfect_crosscoder(D)
    xb = pair.residual_at("base", toks, 1)
    xc = pair.residual_at("ft", toks, 1)
    store: dict[str, torch.Tensor] = {}
    out = record_codes_hook(cc, store, base_acts=xb)(xc, None)
    assert torch.equal(out, xc)
    torch.testing.assert_close(store["codes"], cc.encode(torch.stack([xb, xc], dim=-2)))
    vec = latent_direction(cc, [0, 1])  # latents of model 0: no ft decoder row
    assert torch.equal(vec, torch.zeros(D))
    vec = latent_direction(cc, [2 * D])  # the first model-1 latent decodes to +e_0
    assert torch.equal(vec, torch.eye(D)[0])
    assert torch.equal(latent_direction(cc, [2 * D], model="diff"), torch.eye(D)[0])
    pos = torch.zeros(2, 9, dtype=torch.bool)
    pos[:, 4] = True
    s = steering_hook(vec, scale=2.0, positions=pos)(xc, None)
    torch.testing.assert_close(s - xc, 2.0 * vec * pos[..., None])
    assert torch.equal(amplification_hook(0.0, base_acts=xb)(xc, None), xc)
    torch.testing.assert_close(amplification_hook(1.0, base_acts=xb)(xc, None), 2 * xc - xb)
    # steering mode: x^b + sum_S f_j d_j^c
    h = patch_hook(cc, base_acts=xb, mode="steering", latents=torch.arange(2 * D, 4 * D))(xc, None)
    torch.testing.assert_close(h, xb + xc, atol=1e-5, rtol=1e-5)


def test_hook_errors(pair, toks):
    cc = perfect_crosscoder(D)
    xb = pair.residual_at("base", toks, 1)
    with pytest.raises(ValueError, match="exactly one of base_acts"):
        patch_hook(cc, mode="reconstruction")
    with pytest.raises(ValueError, match="mode must be one of"):
        patch_hook(cc, base_acts=xb, mode="replace")
    with pytest.raises(ValueError, match="needs latents"):
        patch_hook(cc, base_acts=xb, mode="subset")
    with pytest.raises(ValueError, match="same tokens at the same layer"):
        patch_hook(cc, base_acts=xb[:, :3])(xb, None)
    with pytest.raises(LayerError, match="d_in=8"):
        paired_hooks(pair, perfect_crosscoder(8), toks, layer=1)
    with pytest.raises(LayerError, match="no layer given"):
        paired_hooks(pair, cc, toks)
    with pytest.raises(LayerError, match="not a residual-stream hook"):
        hook_point(perfect_crosscoder(D, hook_name="blocks.0.attn.hook_z"), 2)
