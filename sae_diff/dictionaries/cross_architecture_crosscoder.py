"""Cross-architecture crosscoder: two models with different ``d_model`` (training
``cross_architecture_crosscoder``, saved as ``cross_architecture_jumprelu_crosscoder``).

The setting of Jiralerspong & Bricken (arXiv 2602.11729): the two models need not share a width.
sae_diff keeps the one crosscoder layout every analysis reads (``W_enc (2, d, n)``,
``W_dec (n, 2, d)``) with ``d = d_in = max(d_in_base, d_in_ft)``: the narrower model's
activations are zero-padded to ``d`` (:func:`pad_pair`), and the weights on its padding
dimensions are zero *by construction* (zero at initialisation, gradient masked by a hook, as
for dedicated latents), so the padding carries nothing and Δ, Latent Scaling, the latent table
and the diffing game work unchanged. It is a dedicated-feature crosscoder too
(``n_base_dedicated`` / ``n_ft_dedicated``, default 0), BatchTopK like the others.

Models with different tokenizers: :mod:`sae_diff.pairing.alignment` pairs their tokens on
shared text by character offsets and harvests both models there; ``pad_pair`` of its output is
this dictionary's input (it trains on any aligned activation pairs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sae_diff.dictionaries.dedicated_crosscoder import (
    DedicatedBatchTopKCrosscoderTraining,
    DedicatedBatchTopKCrosscoderTrainingConfig,
    DedicatedCrosscoder,
    DedicatedCrosscoderConfig,
    ensure_grad_hook,
)
from sae_diff.dictionaries.protocol import PairedDictionary


@dataclass(kw_only=True)
class WidthFields:
    """Per-model widths; ``None`` = ``d_in`` (the wider model's width)."""

    d_in_base: int | None = None
    d_in_ft: int | None = None


def widths(cfg: Any) -> tuple[int, int]:
    return int(cfg.d_in_base or cfg.d_in), int(cfg.d_in_ft or cfg.d_in)


def validate_widths(cfg: Any) -> None:
    wb, wf = widths(cfg)
    if not (0 < wb <= cfg.d_in and 0 < wf <= cfg.d_in) or max(wb, wf) != cfg.d_in:
        raise ValueError(
            f"d_in_base ({wb}) and d_in_ft ({wf}) must be positive with the larger equal to d_in "
            f"({cfg.d_in}): set d_in to the wider model's d_model."
        )


def dim_mask(cfg: Any, device: torch.device | None = None) -> torch.Tensor:
    """``(n_models, d_in)`` bool: the real (unpadded) dimensions of each model."""
    mask = torch.zeros(2, int(cfg.d_in), dtype=torch.bool, device=device)
    for m, w in enumerate(widths(cfg)):
        mask[m, :w] = True
    return mask


def pad_pair(x_base: torch.Tensor, x_ft: torch.Tensor) -> torch.Tensor:
    """Stack ``(..., d_b)`` and ``(..., d_c)`` activations into ``(..., 2, max(d_b, d_c))``,
    zero-padding the narrower model (the input a cross-architecture crosscoder reads)."""
    if x_base.shape[:-1] != x_ft.shape[:-1]:
        raise ValueError(
            f"The two models' activations must cover the same tokens: leading shapes "
            f"{tuple(x_base.shape[:-1])} vs {tuple(x_ft.shape[:-1])}."
        )
    d = max(x_base.shape[-1], x_ft.shape[-1])
    pad = [torch.nn.functional.pad(x, (0, d - x.shape[-1])) for x in (x_base, x_ft)]
    return torch.stack(pad, dim=-2)


@dataclass
class CrossArchitectureCrosscoderConfig(DedicatedCrosscoderConfig, WidthFields):
    def __post_init__(self) -> None:
        super().__post_init__()
        validate_widths(self)

    @classmethod
    def architecture(cls) -> str:
        return "cross_architecture_jumprelu_crosscoder"


class CrossArchitectureCrosscoder(DedicatedCrosscoder):
    """Inference form (JumpReLU thresholds); reads :func:`pad_pair` input."""

    cfg: CrossArchitectureCrosscoderConfig  # type: ignore[assignment]


@dataclass(kw_only=True)
class CrossArchitectureCrosscoderTrainingConfig(
    DedicatedBatchTopKCrosscoderTrainingConfig, WidthFields
):
    def __post_init__(self) -> None:
        super().__post_init__()
        validate_widths(self)

    @classmethod
    def architecture(cls) -> str:
        return "cross_architecture_crosscoder"

    def get_inference_config_class(self) -> type[DedicatedCrosscoderConfig]:
        return CrossArchitectureCrosscoderConfig


class CrossArchitectureCrosscoderTraining(DedicatedBatchTopKCrosscoderTraining):
    """Dedicated BatchTopK crosscoder whose weights on each model's padding dimensions are zero."""

    cfg: CrossArchitectureCrosscoderTrainingConfig  # type: ignore[assignment]

    def _ensure_grad_hooks(self) -> None:
        super()._ensure_grad_hooks()
        dims = dim_mask(self.cfg, self.W_dec.device).to(self.W_dec.dtype)
        ensure_grad_hook(
            self, "W_dec", "width_W_dec", lambda g: g * dims[None].to(g.device, g.dtype)
        )
        ensure_grad_hook(
            self, "W_enc", "width_W_enc", lambda g: g * dims[:, :, None].to(g.device, g.dtype)
        )
        ensure_grad_hook(self, "b_dec", "width_b_dec", lambda g: g * dims.to(g.device, g.dtype))

    def initialize_weights(self) -> None:
        super().initialize_weights()
        dims = dim_mask(self.cfg, self.W_dec.device).to(self.W_dec.dtype)
        with torch.no_grad():
            self.W_dec.data.mul_(dims[None])
            self.W_enc.data.mul_(dims[:, :, None])
            self.b_dec.data.mul_(dims)


@torch.no_grad()
def padding_leak(sae: PairedDictionary) -> float:
    """Largest absolute weight or decoder bias on a padding dimension (0.0 when exact)."""
    off = ~dim_mask(sae.cfg, sae.W_dec.device)
    vals = [
        sae.W_dec.detach().abs() * off[None],
        sae.W_enc.detach().abs() * off[:, :, None],
        sae.b_dec.detach().abs() * off,
    ]
    return float(max(v.max() for v in vals))


__all__ = [
    "CrossArchitectureCrosscoder",
    "CrossArchitectureCrosscoderConfig",
    "CrossArchitectureCrosscoderTraining",
    "CrossArchitectureCrosscoderTrainingConfig",
    "dim_mask",
    "pad_pair",
    "padding_leak",
]
