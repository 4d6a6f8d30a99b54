"""Dedicated-feature crosscoder (Jiralerspong & Bricken, arXiv 2602.11729): training
``dedicated_batchtopk_crosscoder``, saved form ``dedicated_crosscoder``.

The latents are partitioned, in this order, into

- *shared* latents ``[0, n_shared)``: ordinary crosscoder latents (read both models, write both);
- *base-dedicated* latents ``[n_shared, n_shared + n_base_dedicated)``: read the base model's
  activation only and write the base reconstruction only;
- *ft-dedicated* latents (the last ``n_ft_dedicated``): read and write the fine-tune only.

A dedicated latent's encoder column and decoder row for the other model are zero *by
construction*: they start at zero and a gradient hook zeroes their gradient, so Adam never
moves them (zero gradient and zero moments give a zero update). A model-exclusive concept then
has a home that cannot leak into the other model, instead of being an ordinary latent whose
other-model decoder happens to be small (the L1 crosscoder's Complete Shrinkage and Latent
Decoupling artifacts).

Sparsity is BatchTopK over all latents together, exactly as ``batchtopk_crosscoder`` (this class
subclasses it); the export gives JumpReLU thresholds the same way.

Conventions for analysis (docs/methods.md): Δ_j is computed as for any crosscoder and is 1
(base-dedicated) or 0 (ft-dedicated) exactly, by construction; shared latents have a learnt Δ
(a shared latent with Δ near 0 or 1 is an exclusive concept the partition did not capture).
Latent Scaling's ν uses the ft decoder row d_j^c, as for every crosscoder latent: for an
ft-dedicated latent it measures how much of d_j^c the base model's error/reconstruction still
carries (near 0: genuinely ft-specific); for a base-dedicated latent d_j^c = 0 and ν is
undefined (NaN, like any latent with a zero direction).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput

from sae_diff.dictionaries.batchtopk_crosscoder import (
    BatchTopKCrosscoderTraining,
    BatchTopKCrosscoderTrainingConfig,
    JumpReLUCrosscoder,
    JumpReLUCrosscoderConfig,
)
from sae_diff.dictionaries.protocol import PairedDictionary

PARTITIONS: tuple[str, ...] = ("shared", "base_dedicated", "ft_dedicated")


@dataclass(kw_only=True)
class DedicatedFields:
    """Sizes of the dedicated partitions (the rest of ``d_sae`` is shared)."""

    n_base_dedicated: int = 0
    n_ft_dedicated: int = 0


def validate_dedicated(cfg: Any) -> None:
    nb, nf = int(cfg.n_base_dedicated), int(cfg.n_ft_dedicated)
    if nb < 0 or nf < 0 or nb + nf > cfg.d_sae:
        raise ValueError(
            f"n_base_dedicated ({nb}) and n_ft_dedicated ({nf}) must be >= 0 and sum to at most "
            f"d_sae ({cfg.d_sae}); the remaining latents are shared."
        )
    if (nb or nf) and cfg.n_models != 2:
        raise ValueError(
            f"Dedicated latents need n_models=2 (base, ft), got n_models={cfg.n_models}."
        )


def partition(cfg: Any) -> np.ndarray:
    """Per-latent partition name: ``shared``, ``base_dedicated`` or ``ft_dedicated``."""
    nb, nf = int(cfg.n_base_dedicated), int(cfg.n_ft_dedicated)
    n_shared = int(cfg.d_sae) - nb - nf
    out = np.full(int(cfg.d_sae), "shared", dtype=object)
    out[n_shared : n_shared + nb] = "base_dedicated"
    out[n_shared + nb :] = "ft_dedicated"
    return out


def model_mask(cfg: Any, device: torch.device | None = None) -> torch.Tensor:
    """``(d_sae, n_models)`` bool: latent j reads/writes model m (index 0 = base, 1 = ft)."""
    part = partition(cfg)
    mask = torch.ones(int(cfg.d_sae), int(cfg.n_models), dtype=torch.bool, device=device)
    mask[torch.from_numpy(part == "base_dedicated"), 1] = False
    mask[torch.from_numpy(part == "ft_dedicated"), 0] = False
    return mask


def ensure_grad_hook(
    module: object, name: str, key: str, fn: Callable[[torch.Tensor], torch.Tensor | None]
) -> None:
    """Register ``fn`` as a gradient hook on parameter ``name`` once per Parameter object.

    Tensor hooks do not survive ``copy.deepcopy`` (nor a parameter being replaced), so the
    classes that rely on them call this at the start of every training step: the record holds
    the id of the Parameter the hook was put on, and a copy's new Parameter gets its own."""
    param = getattr(module, name)
    record = module.__dict__.setdefault("_sae_diff_grad_hooks", {})
    if record.get(key) != id(param):
        param.register_hook(fn)
        record[key] = id(param)


@torch.no_grad()
def leak(sae: PairedDictionary) -> float:
    """Largest absolute encoder/decoder weight of a dedicated latent on the *other* model
    (0.0 for a correctly dedicated dictionary)."""
    off = ~model_mask(sae.cfg, sae.W_dec.device)
    dec = sae.W_dec.detach().abs() * off[:, :, None]
    enc = sae.W_enc.detach().abs() * off.T[:, None, :]
    return float(max(dec.max(), enc.max()))


@dataclass
class DedicatedCrosscoderConfig(JumpReLUCrosscoderConfig, DedicatedFields):
    """Inference config: JumpReLU crosscoder with dedicated partitions recorded."""

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_dedicated(self)

    @classmethod
    def architecture(cls) -> str:
        return "dedicated_crosscoder"


class DedicatedCrosscoder(JumpReLUCrosscoder):
    """Inference dedicated-feature crosscoder (zeros on the other model are in the weights)."""

    cfg: DedicatedCrosscoderConfig  # type: ignore[assignment]

    def partition(self) -> np.ndarray:
        return partition(self.cfg)


@dataclass(kw_only=True)
class DedicatedBatchTopKCrosscoderTrainingConfig(
    BatchTopKCrosscoderTrainingConfig, DedicatedFields
):
    """BatchTopK crosscoder training config plus the dedicated partition sizes."""

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_dedicated(self)

    @classmethod
    def architecture(cls) -> str:
        return "dedicated_batchtopk_crosscoder"

    def get_inference_config_class(self) -> type[JumpReLUCrosscoderConfig]:
        return DedicatedCrosscoderConfig


class DedicatedBatchTopKCrosscoderTraining(BatchTopKCrosscoderTraining):
    """BatchTopK crosscoder whose dedicated latents read and write one model only."""

    cfg: DedicatedBatchTopKCrosscoderTrainingConfig  # type: ignore[assignment]

    def __init__(
        self, cfg: DedicatedBatchTopKCrosscoderTrainingConfig, use_error_term: bool = False
    ):  # type: ignore[override]
        super().__init__(cfg, use_error_term)
        self._ensure_grad_hooks()

    def _ensure_grad_hooks(self) -> None:
        mask = model_mask(self.cfg, self.W_dec.device)
        dec_mask = mask[:, :, None].to(self.W_dec.dtype)
        enc_mask = mask.T[:, None, :].to(self.W_enc.dtype)
        ensure_grad_hook(
            self, "W_dec", "dedicated_W_dec", lambda g: g * dec_mask.to(g.device, g.dtype)
        )
        ensure_grad_hook(
            self, "W_enc", "dedicated_W_enc", lambda g: g * enc_mask.to(g.device, g.dtype)
        )

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        self._ensure_grad_hooks()
        return super().training_forward_pass(step_input)

    def initialize_weights(self) -> None:
        super().initialize_weights()
        mask = model_mask(self.cfg, self.W_dec.device)
        with torch.no_grad():
            self.W_dec.data.mul_(mask[:, :, None].to(self.W_dec.dtype))
            self.W_enc.data.mul_(mask.T[:, None, :].to(self.W_enc.dtype))

    def partition(self) -> np.ndarray:
        return partition(self.cfg)


__all__ = [
    "PARTITIONS",
    "DedicatedBatchTopKCrosscoderTraining",
    "DedicatedBatchTopKCrosscoderTrainingConfig",
    "DedicatedCrosscoder",
    "DedicatedCrosscoderConfig",
    "ensure_grad_hook",
    "leak",
    "model_mask",
    "partition",
]
