"""Shared-latent crosscoders (Anthropic, "Insights on Crosscoder Model Diffing", Feb 2025).

A designated set of *shared* latents, indices ``[0, n_shared_latents)``, has one decoder
vector used by every model (``d_j^b = d_j^c``) and a smaller sparsity cost; the remaining
*free* latents are ordinary crosscoder latents. The shared latents soak up what both models
have in common cheaply, so exclusive (Δ≈0 / Δ≈1) latents no longer have to be dense and
polysemantic to justify themselves.

Architectures (training → saved form):

- ``shared_crosscoder`` (L1) → ``shared_crosscoder``: sparsity
  ``lambda * sum_j w_j f_j s_j`` with ``w_j = shared_sparsity_ratio`` for shared latents and 1
  otherwise (s_j the code normalisation);
- ``shared_batchtopk_crosscoder`` → ``shared_jumprelu_crosscoder``: selection scores
  ``v_j = p_j s_j / w_j``, so a shared latent is kept at a ``1/w`` times smaller cost; exported
  thresholds are ``theta w_j / s_j`` on ``p``.

Tying is exact and cheap: the weights keep the usual layout ``W_dec (d_sae, n_models, d)``
(so Δ, Latent Scaling, tables and every analysis work unchanged; a shared latent has Δ = 0.5
by construction), the shared rows start identical across models, and a gradient hook replaces
each model's gradient on a shared row by the sum over models — the gradient of the one tied
vector. Adam and SAELens's gradient clipping act elementwise / by one global factor, so the
copies receive identical updates and stay bit-identical (``tie_gap`` measures it). Encoders
are not tied (as in Anthropic's update).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput

from sae_diff.dictionaries.batchtopk_crosscoder import (
    BatchTopKCrosscoderTraining,
    BatchTopKCrosscoderTrainingConfig,
    JumpReLUCrosscoder,
    JumpReLUCrosscoderConfig,
)
from sae_diff.dictionaries.crosscoder import (
    Crosscoder,
    CrosscoderConfig,
    L1CrosscoderTraining,
    L1CrosscoderTrainingConfig,
)
from sae_diff.dictionaries.dedicated_crosscoder import ensure_grad_hook
from sae_diff.dictionaries.geometry import decoder_rows
from sae_diff.dictionaries.protocol import PairedDictionary


def validate_shared(n_shared: int, ratio: float, d_sae: int) -> None:
    if not 0 <= n_shared <= d_sae:
        raise ValueError(f"n_shared_latents must be in [0, d_sae={d_sae}], got {n_shared}.")
    if not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(
            f"shared_sparsity_ratio must be a positive number (Anthropic: ~0.1-0.2), got {ratio}."
        )


@dataclass(kw_only=True)
class SharedFields:
    """``n_shared_latents``: how many latents (the first ones) have tied decoders;
    ``shared_sparsity_ratio``: their sparsity cost relative to a free latent's."""

    n_shared_latents: int = 0
    shared_sparsity_ratio: float = 0.15


def shared_mask(sae: PairedDictionary) -> torch.Tensor:
    """Boolean ``(d_sae,)``: True for the tied (shared) latents."""
    mask = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=sae.W_dec.device)
    mask[: int(getattr(sae.cfg, "n_shared_latents", 0))] = True
    return mask


@torch.no_grad()
def tie_gap(sae: PairedDictionary) -> float:
    """Largest ``|d_j^m - d_j^0|`` over shared latents and models (0.0 when exactly tied), in
    the training (normalised) space, where the tie holds: a saved dictionary has the per-model
    scalars folded in, so its raw-space rows differ by ``c_b / c_c``."""
    n = int(sae.cfg.n_shared_latents)
    if n == 0:
        return 0.0
    rows = decoder_rows(sae, normalised=True)[:n]
    return float((rows - rows[:, :1]).abs().max())


class SharedTrainingMixin:
    """Tied initialisation, the gradient hook, and per-latent sparsity weights."""

    cfg: Any
    W_dec: torch.nn.Parameter
    W_enc: torch.nn.Parameter

    def __init__(self, cfg: Any, use_error_term: bool = False) -> None:
        super().__init__(cfg, use_error_term)  # type: ignore[call-arg]
        self._register_tie_hook()

    def initialize_weights(self) -> None:
        """The crosscoder's initialisation with the shared rows tied before the norm is set."""
        self._init_crosscoder_weights()  # type: ignore[attr-defined]
        self._tie_shared_rows()
        self._init_decoder_norm()  # type: ignore[attr-defined]

    def _tie_shared_rows(self) -> None:
        n = int(self.cfg.n_shared_latents)
        with torch.no_grad():
            self.W_dec.data[:n] = self.W_dec.data[:n, :1].clone()
            self.W_enc.data.copy_(
                self.W_dec.data.reshape(self.cfg.d_sae, -1).T.reshape(self.W_enc.shape)
            )

    def _register_tie_hook(self) -> None:
        """Put the tying hook on ``W_dec`` (once per Parameter object; re-done after a deepcopy)."""
        n = int(self.cfg.n_shared_latents)
        if n == 0:
            return

        def tie(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            grad[:n] = grad[:n].sum(dim=1, keepdim=True).expand_as(grad[:n])
            return grad

        ensure_grad_hook(self, "W_dec", "shared_tie", tie)

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        self._register_tie_hook()
        return super().training_forward_pass(step_input)  # type: ignore[misc]

    def sparsity_weights(self) -> torch.Tensor:
        """``w_j``: ``shared_sparsity_ratio`` for shared latents, 1 for free ones."""
        w = torch.ones(self.cfg.d_sae, dtype=self.W_dec.dtype, device=self.W_dec.device)
        w[: int(self.cfg.n_shared_latents)] = self.cfg.shared_sparsity_ratio
        return w


# --- L1 -------------------------------------------------------------------------------------
@dataclass
class SharedCrosscoderConfig(CrosscoderConfig):
    """Inference config of an L1 shared-latent crosscoder (the first ``n_shared_latents`` tied)."""

    n_shared_latents: int = 0

    @classmethod
    def architecture(cls) -> str:
        return "shared_crosscoder"


class SharedCrosscoder(Crosscoder):
    """Inference form: a ReLU crosscoder whose first ``n_shared_latents`` rows are tied."""

    cfg: SharedCrosscoderConfig  # type: ignore[assignment]


@dataclass(kw_only=True)
class SharedCrosscoderTrainingConfig(L1CrosscoderTrainingConfig, SharedFields):
    def __post_init__(self) -> None:
        super().__post_init__()
        validate_shared(self.n_shared_latents, self.shared_sparsity_ratio, self.d_sae)

    @classmethod
    def architecture(cls) -> str:
        return "shared_crosscoder"

    def get_inference_config_class(self) -> type[CrosscoderConfig]:
        return SharedCrosscoderConfig


class SharedCrosscoderTraining(SharedTrainingMixin, L1CrosscoderTraining):
    """L1 crosscoder with tied shared latents; penalty ``lambda sum_j w_j f_j s_j``."""

    cfg: SharedCrosscoderTrainingConfig  # type: ignore[assignment]

    def code_scale(self) -> torch.Tensor:
        """s_j w_j: the L1 penalty's per-latent weight (only the penalty reads it here)."""
        return super().code_scale() * self.sparsity_weights()


# --- BatchTopK ------------------------------------------------------------------------------
@dataclass
class SharedJumpReLUCrosscoderConfig(JumpReLUCrosscoderConfig):
    """Inference config of a BatchTopK shared-latent crosscoder (JumpReLU thresholds)."""

    n_shared_latents: int = 0

    @classmethod
    def architecture(cls) -> str:
        return "shared_jumprelu_crosscoder"


class SharedJumpReLUCrosscoder(JumpReLUCrosscoder):
    """Inference form: per-latent thresholds, first ``n_shared_latents`` decoder rows tied."""

    cfg: SharedJumpReLUCrosscoderConfig  # type: ignore[assignment]


@dataclass(kw_only=True)
class SharedBatchTopKCrosscoderTrainingConfig(BatchTopKCrosscoderTrainingConfig, SharedFields):
    def __post_init__(self) -> None:
        super().__post_init__()
        validate_shared(self.n_shared_latents, self.shared_sparsity_ratio, self.d_sae)

    @classmethod
    def architecture(cls) -> str:
        return "shared_batchtopk_crosscoder"

    def get_inference_config_class(self) -> type[JumpReLUCrosscoderConfig]:
        return SharedJumpReLUCrosscoderConfig


class SharedBatchTopKCrosscoderTraining(SharedTrainingMixin, BatchTopKCrosscoderTraining):
    """BatchTopK crosscoder with tied shared latents; selection scores ``p_j s_j / w_j``."""

    cfg: SharedBatchTopKCrosscoderTrainingConfig  # type: ignore[assignment]

    def code_scale(self) -> torch.Tensor:
        """s_j / w_j: the selection scale (batch top-k scores and the exported thresholds)."""
        return super().code_scale() / self.sparsity_weights()


__all__ = [
    "SharedBatchTopKCrosscoderTraining",
    "SharedBatchTopKCrosscoderTrainingConfig",
    "SharedCrosscoder",
    "SharedCrosscoderConfig",
    "SharedCrosscoderTraining",
    "SharedCrosscoderTrainingConfig",
    "SharedJumpReLUCrosscoder",
    "SharedJumpReLUCrosscoderConfig",
    "shared_mask",
    "tie_gap",
]
