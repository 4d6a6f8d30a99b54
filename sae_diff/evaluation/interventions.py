"""The interventions of METHODS.md §4 as functions of a split batch (used by KL patching).

Split both models at layer ``L`` (the residual before block ``L``). For each batch the base and
ft residuals ``x^b, x^c`` at ``L`` are computed once; every intervention then builds a residual
``h`` from them and costs one ft second-half forward, ``patched(h)``. The reference is the ft
model (``h = x^c``); the stitched baseline is ``h = x^b``.

Interventions (``D = x^c - x^b``; ``f`` = the dictionary's codes on the pair):

==================  =========================================================================
crosscoder recon    ``x^b + sum_j f_j (d_j^c - d_j^b)``   (decoder biases excluded by default)
crosscoder error    ``x^b + (D - sum_j f_j (d_j^c - d_j^b))``   (recon + error = ``D``)
subset S            ``x^b + sum_{j in S} f_j (d_j^c - d_j^b)``
diff-SAE recon      ``x^b + s * SAE(s * D)``  (``s = +1`` for ``ft_minus_base``, ``-1`` else;
                    the SAE's bias included: it is part of the reconstructed difference)
diff-SAE error      ``x^b + (D - s * SAE(s * D))``
diff-SAE subset S   ``x^b + s * sum_{j in S} f_j d_j``
steering S          ``x^b + scale * sum_{j in S} f_j d_j^c`` (crosscoders)
token patch P       ``x^c`` at positions ``P``, ``x^b`` elsewhere
==================  =========================================================================

:mod:`sae_diff.evaluation.patching` runs them and reports the metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sae_diff.analysis.selection import LatentSpec, latent_indices
from sae_diff.dictionaries.io import as_inference
from sae_diff.dictionaries.protocol import PairedDictionary
from sae_diff.evaluation.stitching import patchable_kind
from sae_diff.pairing.model import PairedModel


# ---------------------------------------------------------------------------- batch state
@dataclass
class SplitBatch:
    """One batch split at ``layer``: ``x_base``, ``x_ft`` ``(B, S, d)`` residuals before block
    ``layer``; ``rows`` indexes the batch in the whole dataset (for dataset-level position
    masks). Dictionary codes are cached per batch so that several interventions of one
    dictionary encode once."""

    tokens: torch.Tensor
    x_base: torch.Tensor
    x_ft: torch.Tensor
    layer: int
    rows: slice
    attention_mask: torch.Tensor | None = None
    _codes: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def codes(self, patcher: DictionaryPatcher) -> torch.Tensor:
        """The dictionary's codes ``(B, S, d_sae)`` on this batch (computed once)."""
        key = id(patcher)
        if key not in self._codes:
            self._codes[key] = patcher.encode(self.x_base, self.x_ft)
        return self._codes[key]


Intervention = Callable[[SplitBatch], torch.Tensor]


@torch.no_grad()
def split_batch(
    paired: PairedModel,
    tokens: torch.Tensor,
    layer: int,
    rows: slice | None = None,
    attention_mask: torch.Tensor | None = None,
) -> SplitBatch:
    """Compute ``x^b`` and ``x^c`` at ``layer`` for one batch (two first-half forwards)."""
    xb = paired.residual_at("base", tokens, layer, attention_mask=attention_mask)
    xc = paired.residual_at("ft", tokens, layer, attention_mask=attention_mask).to(xb.device)
    return SplitBatch(
        tokens=tokens,
        x_base=xb,
        x_ft=xc,
        layer=layer,
        rows=rows if rows is not None else slice(0, tokens.shape[0]),
        attention_mask=attention_mask,
    )


# ---------------------------------------------------------------------------- dictionaries
class DictionaryPatcher:
    """A crosscoder or diff-SAE seen as "an estimate of ``x^c - x^b``" for patching.

    Training dictionaries are converted with ``.to_inference()`` (weights folded, so the
    dictionary works on raw activations). Latent contributions are ``decode(f_S) - decode(0)``,
    which is exact for the linear decoders used here and leaves the decoder bias out.

    Args:
        sae: a two-model crosscoder or a diff-SAE.
        include_bias: crosscoders only: add ``b_dec^c - b_dec^b`` to the reconstruction (and
            so remove it from the error). METHODS.md §4 excludes it (the default).
    """

    def __init__(self, sae: PairedDictionary, include_bias: bool = False) -> None:
        self.sae = as_inference(sae)
        self.kind = patchable_kind(self.sae)
        self.d_sae = int(self.sae.cfg.d_sae)
        self.include_bias = include_bias
        self.sign = 1.0
        if self.kind == "diff_sae" and self.sae.cfg.diff_sign == "base_minus_ft":
            self.sign = -1.0

    def _param(self) -> torch.Tensor:
        return self.sae.W_dec

    @torch.no_grad()
    def encode(self, x_base: torch.Tensor, x_ft: torch.Tensor) -> torch.Tensor:
        """Codes ``(..., d_sae)`` of the pair (diff-SAEs take the signed difference)."""
        w = self._param()
        pair = torch.stack([x_base, x_ft], dim=-2).to(w.device, w.dtype)
        return self.sae.encode(pair)

    def _decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(f)

    @torch.no_grad()
    def _linear(self, f: torch.Tensor) -> torch.Tensor:
        """Decoder output without the bias: ``decode(f) - decode(0)``."""
        zero = torch.zeros(1, self.d_sae, dtype=f.dtype, device=f.device)
        return self._decode(f) - self._decode(zero)[0]

    @torch.no_grad()
    def delta(self, f: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        """The dictionary's estimate of ``x^c - x^b`` ``(..., d)``: all latents (``None``:
        the full reconstruction, crosscoder bias per ``include_bias``, diff-SAE bias included)
        or only ``latents`` (never a bias)."""
        if latents is not None:
            f = _restrict(f, latents)
        if self.kind == "crosscoder":
            out = (
                self._linear(f)
                if (latents is not None or not self.include_bias)
                else self._decode(f)
            )
            return out[..., 1, :] - out[..., 0, :]
        out = self._linear(f) if latents is not None else self._decode(f)
        return self.sign * out

    @torch.no_grad()
    def delta_rows(self, chunk: int = 1024) -> torch.Tensor:
        """Per-latent contribution to ``x^c - x^b`` per unit activation, ``(d_sae, d)``:
        ``d_j^c - d_j^b`` (crosscoder) or ``s * d_j`` (diff-SAE), in raw activation space."""
        w = self.sae.W_dec.detach()
        if getattr(self.sae.cfg, "normalize_activations", "none") in (None, "none"):
            rows = w[:, 1] - w[:, 0] if self.kind == "crosscoder" else self.sign * w
            return rows
        parts = []
        for lo in range(0, self.d_sae, chunk):
            eye = torch.eye(self.d_sae, dtype=w.dtype, device=w.device)[lo : lo + chunk]
            out = self._linear(eye)
            parts.append(out[:, 1] - out[:, 0] if self.kind == "crosscoder" else self.sign * out)
        return torch.cat(parts)

    @torch.no_grad()
    def steering_vector(self, f: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """``sum_{j in S} f_j d_j^c`` (crosscoders; for a diff-SAE ``s * sum f_j d_j``)."""
        out = self._linear(_restrict(f, latents))
        if self.kind == "crosscoder":
            return out[..., 1, :]
        return self.sign * out


def _restrict(f: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    keep = torch.zeros(f.shape[-1], dtype=torch.bool, device=f.device)
    keep[latents.to(f.device)] = True
    return f * keep


def _cast(h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return h.to(like.device, like.dtype)


# ---------------------------------------------------------------------------- interventions
def ft_reference() -> Intervention:
    """``h = x^c`` (the identity: gives the ft model, KL 0)."""
    return lambda b: b.x_ft


def stitched() -> Intervention:
    """``h = x^b``: base first half, ft second half (the stitched baseline)."""
    return lambda b: b.x_base


def reconstruction_patch(patcher: DictionaryPatcher) -> Intervention:
    """``h = x^b + Dhat`` (crosscoder: latent part of ``xhat^c - xhat^b``; diff-SAE: SAE(D))."""
    return lambda b: b.x_base + _cast(patcher.delta(b.codes(patcher)), b.x_base)


def error_patch(patcher: DictionaryPatcher) -> Intervention:
    """``h = x^b + (D - Dhat)``: only what the dictionary misses."""
    return lambda b: b.x_ft - _cast(patcher.delta(b.codes(patcher)), b.x_base)


def subset_patch(patcher: DictionaryPatcher, latents: LatentSpec) -> Intervention:
    """``h = x^b + Dhat_S``: the difference carried by the latents in ``S``."""
    idx = latent_indices(latents, patcher.d_sae)
    return lambda b: b.x_base + _cast(patcher.delta(b.codes(patcher), idx), b.x_base)


def steering_patch(
    patcher: DictionaryPatcher, latents: LatentSpec, scale: float = 1.0
) -> Intervention:
    """``h = x^b + scale * sum_{j in S} f_j d_j^c`` (additive steering with the ft decoder)."""
    idx = latent_indices(latents, patcher.d_sae)
    return lambda b: (
        b.x_base + scale * _cast(patcher.steering_vector(b.codes(patcher), idx), b.x_base)
    )


def token_patch(positions: torch.Tensor) -> Intervention:
    """``h = x^c`` at ``positions`` (a dataset-level ``(N, S)`` bool mask), ``x^b`` elsewhere."""
    pos = positions.bool()

    def fn(b: SplitBatch) -> torch.Tensor:
        m = pos[b.rows].to(b.x_base.device)
        if tuple(m.shape) != tuple(b.x_base.shape[:2]):
            raise ValueError(
                f"token-patch mask rows {tuple(m.shape)} do not match the batch "
                f"{tuple(b.x_base.shape[:2])}; give a mask shaped like the whole token tensor."
            )
        return torch.where(m[..., None], b.x_ft, b.x_base)

    return fn


__all__ = [
    "DictionaryPatcher",
    "Intervention",
    "SplitBatch",
    "error_patch",
    "ft_reference",
    "reconstruction_patch",
    "split_batch",
    "steering_patch",
    "stitched",
    "subset_patch",
    "token_patch",
]
