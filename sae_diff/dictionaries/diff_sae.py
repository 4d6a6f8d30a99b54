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

from sae_diff.dictionaries import kernels
from sae_diff.dictionaries.base import check_finite
from sae_diff.dictionaries.io import as_inference
from sae_diff.dictionaries.specs import DIFF_SIGNS


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
    """Training config of the BatchTopK diff-SAE (SAELens BatchTopK plus ``diff_sign``).

    Args:
        diff_sign: ``"ft_minus_base"`` (default) or ``"base_minus_ft"``.
        sparse_kernels: train with ``sae_diff.dictionaries.kernels`` (dense encoder matmul, fast
            exact batch top-k, sparse decode and sparse backward; same losses, feature
            activations, threshold update and gradients as SAELens's dense BatchTopK step, see
            docs/performance.md). ``False`` = the dense reference path (SAELens's own).
    """

    diff_sign: str = "ft_minus_base"
    sparse_kernels: bool = True

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
        step_input = replace(step_input, sae_in=self.difference(step_input.sae_in))
        if self.cfg.sparse_kernels and step_input.sae_in.ndim == 2:
            return self._sparse_training_forward_pass(step_input)
        return super().training_forward_pass(step_input)

    def _sparse_training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """SAELens's BatchTopK training step through the sparse kernels (``(B, d_in)`` input).

        Same semantics as the dense step: selection of the ``int(k * B)`` largest
        ``ReLU(hidden_pre) * ||W_dec_j||`` (plain ``ReLU(hidden_pre)`` without
        ``rescale_acts_by_decoder_norm``); ``feature_acts`` holds those selection scores (a
        detached sparse COO ``(B, d_sae)`` tensor); the reconstruction uses the unscaled
        ``ReLU(hidden_pre)`` (SAELens multiplies and divides by the norm); the threshold moves
        towards the smallest positive kept score; the TopK auxiliary loss ranks dead latents by
        the scaled ``hidden_pre`` with ``k_aux = d_in // 2`` and ``scale = min(num_dead / k_aux,
        1)``. ``hidden_pre`` is not materialised (an empty tensor) and the ``hook_sae_acts_*``
        hook points are bypassed.
        """
        sae_in = step_input.sae_in
        x = self.process_sae_in(sae_in)  # dtype, hook_sae_input, run-time norm, b_dec
        B = x.shape[0]
        scale = self.W_dec.norm(dim=-1).detach() if self.cfg.rescale_acts_by_decoder_norm else None
        dead = step_input.dead_neuron_mask
        num_dead = 0 if dead is None else int(dead.sum())
        k_aux = sae_in.shape[-1] // 2  # SAELens's heuristic (Appendix B.1)
        if num_dead > 0 and self.cfg.normalize_activations in (
            "constant_norm_rescale",
            "layer_norm",
        ):
            raise ValueError(
                "TopK auxiliary loss does not support activation normalization "
                f"(normalize_activations={self.cfg.normalize_activations!r})."
            )
        theta = float(self.topk_threshold)
        code, aux_code, _ = kernels.sparse_encode(
            x,
            self.W_enc,
            self.b_enc,
            int(self.cfg.k * B),
            scale=scale,
            threshold_hint=theta if theta > 0 else None,
            aux_latents=dead.nonzero().view(-1) if dead is not None and num_dead > 0 else None,
            k_aux=min(k_aux, num_dead),
            aux_scaled=True,
        )
        sae_out = self.hook_sae_recons(kernels.sparse_decode(code, self.W_dec) + self.b_dec)
        sae_out = self.reshape_fn_out(self.run_time_activation_norm_fn_out(sae_out), self.d_head)
        mse_loss = self.mse_loss_fn(sae_out, sae_in).sum(dim=-1).mean()
        aux_loss = sae_out.new_tensor(0.0)
        if aux_code is not None:
            residual = (sae_in - sae_out).detach()
            recons = self.reshape_fn_out(kernels.sparse_decode(aux_code, self.W_dec), self.d_head)
            aux_scale = min(num_dead / k_aux, 1.0)
            aux_loss = (
                self.cfg.aux_loss_coefficient
                * aux_scale
                * (recons - residual).pow(2).sum(dim=-1).mean()
            )
        with torch.no_grad():
            acts = code.values.detach()
            if scale is not None:
                acts = acts * scale[code.col].to(acts.dtype)
            self.update_topk_threshold(acts)
            feature_acts = torch.sparse_coo_tensor(
                torch.stack([code.row, code.col]),
                acts,
                code.shape,
                is_coalesced=True,
                check_invariants=False,
            )
        losses = {"mse_loss": mse_loss, "auxiliary_reconstruction_loss": aux_loss}
        out = TrainStepOutput(
            sae_in=sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=x.new_empty(0, self.cfg.d_sae),
            loss=mse_loss + aux_loss,
            losses=losses,
        )
        out.metrics["topk_threshold"] = self.topk_threshold
        return out

    def to_inference(self) -> DiffSAE:
        """The exported inference diff-SAE, in memory (same weights ``save_inference_model`` writes)."""
        sae = as_inference(self)
        assert isinstance(sae, DiffSAE)
        return sae
