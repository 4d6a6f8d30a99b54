"""sae_diff.pairing.hooks against the model's own forward: the conventions hold on real hooks."""

from __future__ import annotations

import pytest
import torch
from helpers_models import random_tokens, tiny_pair

from sae_diff.pairing.errors import HookNameError
from sae_diff.pairing.hooks import (
    BLOCK_HOOKS,
    block_of,
    earliest_alias,
    hook_width,
    resid_hook,
    split_layer,
    stop_layer,
)

N_LAYERS = 3


@pytest.fixture(scope="module")
def model():  # a HookedTransformer
    base, _ = tiny_pair(n_layers=N_LAYERS, d_model=16)
    return base


def test_split_layer_and_resid_hook_are_inverse() -> None:
    for layer in range(N_LAYERS + 1):
        assert split_layer(resid_hook(layer, N_LAYERS), N_LAYERS) == layer
    assert split_layer("blocks.1.hook_resid_post", N_LAYERS) == 2
    assert split_layer("ln_final.hook_in", N_LAYERS) == N_LAYERS
    with pytest.raises(HookNameError, match="names block 3"):
        split_layer("blocks.3.hook_resid_pre", N_LAYERS)
    with pytest.raises(HookNameError, match="not a residual-stream hook"):
        split_layer("blocks.0.hook_resid_mid", N_LAYERS)
    with pytest.raises(HookNameError):
        resid_hook(N_LAYERS + 1, N_LAYERS)


def test_split_layer_is_the_residual_before_that_block(model) -> None:
    """``resid_hook(L)`` holds the residual block L reads (the model's own ``stop_at_layer=L``
    output), its earliest alias holds the same tensor, and ``resid_hook(n_layers)`` holds what
    ``ln_final`` reads."""
    toks = random_tokens(2, 7, seed=1)
    _, cache = model.run_with_cache(toks)
    for layer in range(N_LAYERS + 1):
        name = resid_hook(layer, N_LAYERS)
        if layer < N_LAYERS:
            torch.testing.assert_close(
                cache[name], model(toks, stop_at_layer=layer), rtol=0, atol=0
            )
        torch.testing.assert_close(cache[earliest_alias(name)], cache[name], rtol=0, atol=0)
    final = model.ln_final(cache[resid_hook(N_LAYERS, N_LAYERS)])
    torch.testing.assert_close(model.unembed(final), model(toks), rtol=0, atol=0)


def test_stop_layer_still_fires_the_hook(model) -> None:
    toks = random_tokens(1, 5, seed=2)
    names = [
        f"blocks.{b}.{h}"
        for b in range(N_LAYERS)
        for h in ("hook_resid_pre", "hook_resid_post", "mlp.hook_post", "attn.hook_z")
    ]
    names += ["hook_embed", "hook_pos_embed"]
    for name in names:
        stop = stop_layer(name, N_LAYERS)
        _, full = model.run_with_cache(toks, names_filter=[name])
        _, short = model.run_with_cache(toks, names_filter=[name], stop_at_layer=stop)
        torch.testing.assert_close(short[name], full[name], rtol=0, atol=0)
        if stop:  # one block fewer would not reach it
            _, less = model.run_with_cache(toks, names_filter=[name], stop_at_layer=stop - 1)
            assert name not in less.cache_dict
    assert stop_layer("ln_final.hook_normalized", N_LAYERS) is None


def test_hook_width_matches_the_activation(model) -> None:
    toks = random_tokens(1, 4, seed=3)
    _, cache = model.run_with_cache(toks)
    dims = {"d_model": model.cfg.d_model, "d_mlp": model.cfg.d_mlp}
    checked = 0
    for name, act in cache.items():
        width = hook_width(name)
        if width is not None:
            assert act.shape[-1] == dims[width], name
            checked += 1
    assert checked >= 5 * N_LAYERS  # resid pre/mid/post, attn_out, mlp_out, mlp pre/post per block
    assert hook_width("blocks.0.attn.hook_z") is None and block_of("blocks.2.mlp.hook_post") == 2
    assert block_of("hook_embed") is None
    # every block hook of this model is in the spelling-check list
    assert {n.split(".", 2)[2] for n in model.hook_dict if n.startswith("blocks.0.")} <= set(
        BLOCK_HOOKS
    )
