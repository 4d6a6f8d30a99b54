"""Decoder geometry in one convention (METHODS.md §1): per-model norms, relative norm Δ,
tags, decoder/encoder cosines, and a converter from the Anthropic/ckkissane ratio.

Δ_j = 0.5 * ((||d_j^b|| - ||d_j^c||) / max(||d_j^b||, ||d_j^c||) + 1):
0 = ft-only, 1 = base-only, 0.5 = shared. Computed in the dictionary's training
(normalised) space: a saved crosscoder has its per-model scalars folded into the weights,
and ``decoder_rows`` undoes that fold using ``cfg.norm_factors``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sae_diff.dictionaries.kinds import is_crosscoder
from sae_diff.dictionaries.protocol import PairedDictionary

FT_ONLY_MAX = 0.1
BASE_ONLY_MIN = 0.9
SHARED_HALF_WIDTH = 0.1
TAGS = ("ft_only", "base_only", "shared", "other")


def _folded(sae: PairedDictionary) -> bool:
    """Inference crosscoders have the factors folded in; training ones apply them at run time."""
    return not hasattr(sae, "norm_factors") or not isinstance(sae.norm_factors, torch.Tensor)


@torch.no_grad()
def decoder_rows(sae: PairedDictionary, normalised: bool = True) -> torch.Tensor:
    """Decoder rows ``(d_sae, n_models, d)``; SAEs give ``(d_sae, 1, d)``.

    With ``normalised=True`` rows are expressed in the training space (the per-model fold
    undone), which is where Δ and Latent Scaling are defined.
    """
    w = sae.W_dec.detach()
    if not is_crosscoder(sae):
        return w[:, None, :]
    factors = getattr(sae.cfg, "norm_factors", None)
    if normalised and factors is not None and _folded(sae):
        w = w * torch.as_tensor(factors, dtype=w.dtype, device=w.device)[None, :, None]
    return w


@torch.no_grad()
def encoder_columns(sae: PairedDictionary, normalised: bool = True) -> torch.Tensor:
    """Encoder columns per model ``(d_sae, n_models, d)`` (crosscoders only)."""
    if not is_crosscoder(sae):
        raise ValueError("encoder_columns needs a crosscoder (W_enc shaped (n_models, d, d_sae)).")
    w = sae.W_enc.detach().permute(2, 0, 1)
    factors = getattr(sae.cfg, "norm_factors", None)
    if normalised and factors is not None and _folded(sae):
        w = w / torch.as_tensor(factors, dtype=w.dtype, device=w.device)[None, :, None]
    return w


def decoder_norms(sae: PairedDictionary, normalised: bool = True) -> torch.Tensor:
    """Per-model decoder norms ``(d_sae, n_models)``."""
    return decoder_rows(sae, normalised).norm(dim=-1)


def relative_norm(norms: torch.Tensor | Any, base: int = 0, ft: int = 1) -> torch.Tensor:
    """Δ from ``(d_sae, n_models)`` norms (or a dictionary). 0 = ft-only, 1 = base-only."""
    if not isinstance(norms, torch.Tensor):
        norms = decoder_norms(norms)
    if norms.ndim != 2 or norms.shape[1] < 2:
        raise ValueError(
            "Δ needs a dictionary with a decoder per model (a crosscoder); "
            f"got decoder norms shaped {tuple(norms.shape)}."
        )
    nb, nc = norms[:, base], norms[:, ft]
    denom = torch.maximum(nb, nc).clamp(min=torch.finfo(norms.dtype).tiny)
    return 0.5 * ((nb - nc) / denom + 1)


def tags(delta: torch.Tensor) -> np.ndarray:
    """``ft_only`` (Δ<0.1), ``base_only`` (Δ>0.9), ``shared`` (|Δ-0.5|<0.1), else ``other``."""
    d = delta.detach().cpu().numpy()
    out = np.full(d.shape, "other", dtype=object)
    out[np.abs(d - 0.5) < SHARED_HALF_WIDTH] = "shared"
    out[d < FT_ONLY_MAX] = "ft_only"
    out[d > BASE_ONLY_MIN] = "base_only"
    return out


def tag_counts(delta: torch.Tensor) -> dict[str, int]:
    t = tags(delta)
    return {name: int((t == name).sum()) for name in TAGS}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)


def decoder_cosine(sae: PairedDictionary, base: int = 0, ft: int = 1) -> torch.Tensor:
    """cos(d_j^b, d_j^c) per latent."""
    rows = decoder_rows(sae)
    return _cosine(rows[:, base], rows[:, ft])


def encoder_cosine(sae: PairedDictionary, base: int = 0, ft: int = 1) -> torch.Tensor:
    """cos(W_enc^b[:, j], W_enc^c[:, j]) per latent."""
    cols = encoder_columns(sae)
    return _cosine(cols[:, base], cols[:, ft])


def delta_from_ckkissane_ratio(r: torch.Tensor) -> torch.Tensor:
    """Exact Δ from r = ||d^c|| / (||d^b|| + ||d^c||) (Anthropic / ckkissane convention).

    r = 1 - Δ only approximately; with q = ||d^c||/||d^b|| = r/(1-r):
    Δ = 0.5/q when q >= 1, else 1 - 0.5*q.
    """
    r = torch.as_tensor(r, dtype=torch.float64)
    if ((r < 0) | (r > 1)).any():
        raise ValueError("ckkissane ratios must lie in [0, 1].")
    q = r / (1 - r)  # inf where r == 1
    return torch.where(q >= 1, 0.5 / q, 1 - 0.5 * q)


def ckkissane_ratio_from_delta(delta: torch.Tensor) -> torch.Tensor:
    """Inverse of ``delta_from_ckkissane_ratio``."""
    delta = torch.as_tensor(delta, dtype=torch.float64)
    q = torch.where(delta <= 0.5, 0.5 / delta, 2 * (1 - delta))
    return q / (1 + q)
