"""BatchTopK diff-SAE (training ``batchtopk_diff_sae``; inference ``diff_sae``), METHODS.md §2.

A diff-SAE is an ordinary BatchTopK SAE trained on the activation difference
``x_ft - x_base`` (``diff_sign = "ft_minus_base"``, the default) or ``x_base - x_ft``
(``"base_minus_ft"``). The sign is part of the saved config. Both classes accept either
paired input ``(..., 2, d_in)`` (with ``ndim >= 3``; index 0 = base, 1 = ft) or a precomputed
difference ``(..., d_in)``. Normalisation uses SAELens's single scalar on the *difference*
(``normalize_activations="expected_average_only_in"``), so train it on a store in ``diff`` mode.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAEConfig, TrainStepInput, TrainStepOutput

from sae_diff.dictionaries.base import DIFF_SIGNS, check_finite


def validate_diff_sign(diff_sign: str) -> None:
    if diff_sign not in DIFF_SIGNS:
        raise ValueError(f"Unknown diff_sign {diff_sign!r}; choose one of {list(DIFF_SIGNS)}.")


def to_difference(x: torch.Tensor, d_in: int, diff_sign: str) -> torch.Tensor:
    """Paired ``(..., 2, d_in)`` (ndim >= 3) -> signed difference; ``(..., d_in)`` passes through."""
    if x.shape[-1] != d_in:
        raise ValueError(
            f"Diff-SAE expects activations with last dimension d_in={d_in}, got shape {tuple(x.shape)}. "
            "Pass paired activations (batch, 2, d_model) or their difference (batch, d_model)."
        )
    check_finite(x)
    if x.ndim >= 3 and x.shape[-2] == 2:
        base, ft = x[..., 0, :], x[..., 1, :]
        return ft - base if diff_sign == "ft_minus_base" else base - ft
    return x


@dataclass
class DiffSAEConfig(JumpReLUSAEConfig):
    """Inference config of a diff-SAE (a JumpReLU SAE on the activation difference)."""

    diff_sign: str = "ft_minus_base"
    k: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_diff_sign(self.diff_sign)

    @classmethod
    def architecture(cls) -> str:
        return "diff_sae"


class DiffSAE(JumpReLUSAE):
    """Inference diff-SAE; ``decode`` returns the reconstructed difference."""

    cfg: DiffSAEConfig  # type: ignore[assignment]

    def difference(self, x: torch.Tensor) -> torch.Tensor:
        return to_difference(x, self.cfg.d_in, self.cfg.diff_sign)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return super().encode(self.difference(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.difference(x))


@dataclass
class BatchTopKDiffSAETrainingConfig(BatchTopKTrainingSAEConfig):
    """Training config of the BatchTopK diff-SAE (SAELens BatchTopK plus ``diff_sign``)."""

    diff_sign: str = "ft_minus_base"

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_diff_sign(self.diff_sign)
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must satisfy 0 < k <= d_sae ({self.d_sae}), got k={self.k}.")

    @classmethod
    def architecture(cls) -> str:
        return "batchtopk_diff_sae"

    def get_inference_config_class(self) -> type[SAEConfig]:
        return DiffSAEConfig


class BatchTopKDiffSAETraining(BatchTopKTrainingSAE):
    """SAELens's BatchTopK training SAE, fed the signed activation difference."""

    cfg: BatchTopKDiffSAETrainingConfig  # type: ignore[assignment]

    def difference(self, x: torch.Tensor) -> torch.Tensor:
        return to_difference(x, self.cfg.d_in, self.cfg.diff_sign)

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().encode_with_hidden_pre(self.difference(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.difference(x))

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        return super().training_forward_pass(replace(step_input, sae_in=self.difference(step_input.sae_in)))

    def to_inference(self) -> DiffSAE:
        """The exported inference diff-SAE, in memory (same weights ``save_inference_model`` writes)."""
        from sae_diff.dictionaries.io import as_inference

        sae = as_inference(self)
        assert isinstance(sae, DiffSAE)
        return sae
