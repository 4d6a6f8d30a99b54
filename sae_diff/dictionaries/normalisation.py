"""Per-model normalisation: one scalar per model so that E||c_m x^m|| = sqrt(d) (SAELens's
convention), estimated from data, applied at training time, folded into the weights on export.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def estimate_norm_factors(batches: Iterable[torch.Tensor], n_batches: int = 10) -> torch.Tensor:
    """Scalars ``c_m = sqrt(d) / mean_i ||x_i^m||`` from paired batches ``(B, n_models, d)``."""
    total: torch.Tensor | None = None
    count = 0
    it: Iterator[torch.Tensor] = iter(batches)
    for _ in tqdm(range(n_batches), desc="Estimating per-model norm factors", leave=False):
        try:
            x = next(it)
        except StopIteration:
            break
        if x.ndim != 3:
            raise ValueError(f"Expected paired batches (B, n_models, d), got shape {tuple(x.shape)}.")
        norms = x.float().norm(dim=-1).sum(0)
        total = norms if total is None else total + norms
        count += x.shape[0]
    if total is None or count == 0:
        raise ValueError("No data to estimate normalisation factors from: the data provider is empty.")
    mean_norm = total / count
    if (mean_norm <= 0).any() or not torch.isfinite(mean_norm).all():
        raise ValueError(f"Mean activation norms per model are {mean_norm.tolist()}; cannot normalise.")
    d = x.shape[-1]
    return math.sqrt(d) / mean_norm


@torch.no_grad()
def prepare_crosscoder(sae: torch.nn.Module, batches: Iterable[torch.Tensor], n_batches: int = 10,
                       init_decoder_bias: bool = True) -> torch.Tensor:
    """Estimate and set ``sae``'s per-model factors; put each model's decoder bias at its
    (normalised) activation mean (METHODS.md §1). Returns the factors."""
    collected = []
    it = iter(batches)
    for _ in range(n_batches):
        try:
            collected.append(next(it))
        except StopIteration:
            break
    factors = estimate_norm_factors(collected, n_batches=len(collected))
    sae.set_norm_factors(factors)  # type: ignore[operator]
    if init_decoder_bias:
        mean = torch.cat([b.float() for b in collected]).mean(0) * factors[:, None]
        sae.b_dec.data.copy_(mean.to(sae.b_dec.dtype))  # type: ignore[union-attr,operator,arg-type]
    return factors
