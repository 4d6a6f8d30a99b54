"""Per-model normalisation: one scalar per model so that E||c_m x^m|| = sqrt(d) (SAELens's
convention), estimated from data, applied at training time, folded into the weights on export.

Dictionaries whose config sets ``center_inputs`` (the BatchTopK crosscoder's default, as in the
reference trainer) also subtract each model's mean first: ``x_n^m = c_m (x^m - mu_m)``, the
scalar measured on the centred data; the mean folds into the biases on export. Their
``input_scaling`` picks the scalar: ``sqrt_d`` (``E||x_n^m|| = sqrt(d)``) or ``unit_rms``
(``E||x_n^m||^2 = 1``, the reference's, the BatchTopK crosscoder's default).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from tqdm.auto import tqdm

INPUT_SCALINGS: tuple[str, ...] = ("sqrt_d", "unit_rms")


@torch.no_grad()
def estimate_norm_factors(
    batches: Iterable[torch.Tensor],
    n_batches: int = 10,
    offsets: torch.Tensor | None = None,
    scaling: str = "sqrt_d",
) -> torch.Tensor:
    """Per-model scalars from paired batches ``(B, n_models, d)``, ``mu = offsets`` (zero when
    ``None``): ``scaling="sqrt_d"``: ``c_m = sqrt(d) / mean_i ||x_i^m - mu_m||`` (SAELens's
    convention); ``"unit_rms"``: ``c_m = 1 / sqrt(mean_i ||x_i^m - mu_m||^2)``, so the summed
    variance is 1 (crosscoder_learning's ``target_rms = 1`` when centred)."""
    if scaling not in INPUT_SCALINGS:
        raise ValueError(
            f"Unknown input scaling {scaling!r}; choose one of {list(INPUT_SCALINGS)}."
        )
    total: torch.Tensor | None = None
    count = 0
    it: Iterator[torch.Tensor] = iter(batches)
    for _ in tqdm(range(n_batches), desc="Estimating per-model norm factors", leave=False):
        try:
            x = next(it)
        except StopIteration:
            break
        if x.ndim != 3:
            raise ValueError(
                f"Expected paired batches (B, n_models, d), got shape {tuple(x.shape)}."
            )
        xf = x.float() if offsets is None else x.float() - offsets.to(x.device, torch.float32)
        norms = xf.norm(dim=-1)
        norms = (norms.double().pow(2) if scaling == "unit_rms" else norms.double()).sum(0)
        total = norms if total is None else total + norms
        count += x.shape[0]
    if total is None or count == 0:
        raise ValueError(
            "No data to estimate normalisation factors from: the data provider is empty."
        )
    mean_norm = total / count
    if scaling == "unit_rms":
        mean_norm = mean_norm.sqrt()
    if (mean_norm <= 0).any() or not torch.isfinite(mean_norm).all():
        raise ValueError(
            f"Mean activation norms per model are {mean_norm.tolist()}; cannot normalise."
        )
    if scaling == "unit_rms":
        return (1.0 / mean_norm).float()
    d = x.shape[-1]
    return (math.sqrt(d) / mean_norm).float()


@torch.no_grad()
def prepare_crosscoder(
    sae: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    n_batches: int = 10,
    init_decoder_bias: bool = True,
) -> torch.Tensor:
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
        raise ValueError(
            "No data to estimate normalisation factors from: the data provider is empty."
        )
    center = bool(getattr(sae.cfg, "center_inputs", False))
    offsets = None
    if center:
        offsets = torch.cat([b.to(torch.float64) for b in collected]).mean(0).to(torch.float32)
        sae.set_norm_offsets(offsets)  # type: ignore[operator]
    scaling = str(getattr(sae.cfg, "input_scaling", "sqrt_d"))
    factors = estimate_norm_factors(
        collected, n_batches=len(collected), offsets=offsets, scaling=scaling
    )
    sae.set_norm_factors(factors)  # type: ignore[operator]
    if init_decoder_bias:
        raw = torch.cat([b.float() for b in collected])
        if offsets is not None:
            raw = raw - offsets
        mean = raw.mean(0) * factors[:, None]
        sae.b_dec.data.copy_(mean.to(sae.b_dec.dtype))  # type: ignore[union-attr,operator,arg-type]
    return factors
