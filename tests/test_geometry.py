"""Δ, tags, cosines and the ckkissane converter against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from sae_diff.dictionaries import geometry


def test_delta_and_tags_hand_computed() -> None:
    norms = torch.tensor([[1.0, 1.0], [0.0, 2.0], [3.0, 0.0], [1.0, 0.5], [0.05, 1.0], [1.0, 0.85]])
    delta = geometry.relative_norm(norms)
    expected = torch.tensor([0.5, 0.0, 1.0, 0.75, 0.025, 0.575])
    torch.testing.assert_close(delta, expected)
    assert list(geometry.tags(delta)) == [
        "shared",
        "ft_only",
        "base_only",
        "other",
        "ft_only",
        "shared",
    ]
    assert geometry.tag_counts(delta) == {"ft_only": 2, "base_only": 1, "shared": 2, "other": 1}


def test_delta_needs_two_decoders() -> None:
    with pytest.raises(ValueError, match="decoder per model"):
        geometry.relative_norm(torch.ones(4, 1))


def test_ckkissane_converter_is_exact() -> None:
    b = torch.rand(1000, dtype=torch.float64) + 0.01
    c = torch.rand(1000, dtype=torch.float64) + 0.01
    r = c / (b + c)
    delta = geometry.relative_norm(torch.stack([b, c], dim=1))
    torch.testing.assert_close(geometry.delta_from_ckkissane_ratio(r), delta)
    torch.testing.assert_close(geometry.ckkissane_ratio_from_delta(delta), r)
    # the naive r = 1 - Δ is wrong away from the extremes and the middle
    assert (1 - r - delta).abs().max() > 0.05
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        geometry.delta_from_ckkissane_ratio(torch.tensor([1.5]))


def test_cosines() -> None:
    from sae_diff.dictionaries.registry import training_config, training_sae

    sae = training_sae(training_config("crosscoder", d_in=4, d_sae=3))
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.W_dec[0, 0, 0] = sae.W_dec[0, 1, 0] = 1
        sae.W_dec[1, 0, 0] = 1
        sae.W_dec[1, 1, 1] = 1
        sae.W_dec[2, 0, 0] = 1
        sae.W_dec[2, 1, 0] = -2
        sae.W_enc.copy_(sae.W_dec.permute(1, 2, 0))
    torch.testing.assert_close(geometry.decoder_cosine(sae), torch.tensor([1.0, 0.0, -1.0]))
    torch.testing.assert_close(geometry.encoder_cosine(sae), torch.tensor([1.0, 0.0, -1.0]))
