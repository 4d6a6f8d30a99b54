"""Per-model normalisation: one scalar per model so that E||c_m x^m|| = sqrt(d) (SAELens's
convention), estimated from data, applied at training time, folded into the weights on export.

Dictionaries whose config sets ``center_inputs`` (the BatchTopK crosscoder's default, as in the
reference trainer) also subtract each model's mean first: ``x_n^m = c_m (x^m - mu_m)`` with
``E||x_n^m|| = sqrt(d)`` measured on the centred data; the mean folds into the biases on export.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def estimate_norm_factors(batches: Iterable[torch.Tensor], n_batches: int = 10,
                          offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Scalars ``c_m = sqrt(d) / mean_i ||x_i^m - mu_m||`` from paired batches
    ``(B, n_models, d)`` (``mu = offsets``, zero when ``None``)."""
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
        xf = x.float() if offsets is None else x.float() - offsets.to(x.device, torch.float32)
        norms = xf.norm(dim=-1).sum(0)
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
    """Estimate and set ``sae``'s per-model factors (and, when its config centres its inputs,
    the per-model means, in float64); put each model's decoder bias at its (normalised)
    activation mean (METHODS.md §1; zero for centred inputs). Returns the factors."""
    collected = []
    it = iter(batches)
    for _ in range(n_batches):
        try:
            collected.append(next(it))
        except StopIteration:
            break
    if not collected:
        raise ValueError("No data to estimate normalisation factors from: the data provider is empty.")
    center = bool(getattr(sae.cfg, "center_inputs", False))
    offsets = None
    if center:
        offsets = torch.cat([b.to(torch.float64) for b in collected]).mean(0).to(torch.float32)
        sae.set_norm_offsets(offsets)  # type: ignore[operator]
    factors = estimate_norm_factors(collected, n_batches=len(collected), offsets=offsets)
    sae.set_norm_factors(factors)  # type: ignore[operator]
    if init_decoder_bias:
        raw = torch.cat([b.float() for b in collected])
        if offsets is not None:
            raw = raw - offsets
        mean = raw.mean(0) * factors[:, None]
        sae.b_dec.data.copy_(mean.to(sae.b_dec.dtype))  # type: ignore[union-attr,operator,arg-type]
    return factors
