"""L1 (ReLU) crosscoder: architecture ``crosscoder`` (inference and training).

Loss (METHODS.md §1), in the normalised space, mean over tokens::

    sum_m ||x^m - xhat^m||^2  +  lambda * sum_j f_j s_j

with s_j the code normalisation (``crosscoder``: sum of per-model decoder norms, the
default; ``sae``: norm of the concatenated decoder row; ``none``: 1). The reconstruction
term is the *squared* error summed over models (one public trainer uses the unsquared norm,
so its lambda does not transfer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from sae_lens.saes.sae import (
    SAEConfig,
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)

from sae_diff.dictionaries.base import (
    CrosscoderFields,
    CrosscoderMixin,
    CrosscoderSAE,
    validate_common_fields,
)
from sae_diff.dictionaries.io import as_inference, inference_export, save_sae_files
from sae_diff.dictionaries.protocol import PairedDictionary


@dataclass
class CrosscoderConfig(SAEConfig, CrosscoderFields):
    """Inference config of a ReLU crosscoder (weights work on raw activations)."""

    apply_b_dec_to_input: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_common_fields(self)

    @classmethod
    def architecture(cls) -> str:
        return "crosscoder"


class Crosscoder(CrosscoderSAE):
    """Inference ReLU crosscoder: ``f = ReLU(sum_m W_enc^m x^m + b_enc)``."""

    cfg: CrosscoderConfig  # type: ignore[assignment]


class CrosscoderTrainingMixin(CrosscoderMixin):
    """Training behaviour shared by the L1 and BatchTopK crosscoders.

    - per-model input transform ``x_n^m = c_m (x^m - mu_m)`` applied at run time from the
      ``norm_factors`` (c) and ``norm_offsets`` (mu, zero unless the config centres its inputs)
      buffers, folded into the weights and biases on export (``save_inference_model`` /
      ``to_inference``), so the saved dictionary reads raw activations;
    - reconstruction loss summed over models;
    - decoder initialised as the encoder's transpose, each model's block at norm
      ``decoder_init_norm_per_model`` (the reference trainer's convention) or, when that is
      ``None``, the concatenated row at SAELens's ``decoder_init_norm``.
    """

    norm_factors: torch.Tensor
    norm_offsets: torch.Tensor

    def _init_training_state(self) -> None:
        factors = self.cfg.norm_factors or [1.0] * self.cfg.n_models
        self.register_buffer(  # type: ignore[attr-defined]
            "norm_factors", torch.tensor(factors, dtype=torch.float32, device=self.W_dec.device)
        )
        self.register_buffer(  # type: ignore[attr-defined]
            "norm_offsets",
            torch.zeros(
                self.cfg.n_models, self.cfg.d_in, dtype=torch.float32, device=self.W_dec.device
            ),
        )
        # a Python flag, so that uncentred runs skip the subtraction without a device sync
        self._has_offsets = False
        # checkpoints written before centring existed have no offsets: load them as zeros
        self._register_load_state_dict_pre_hook(_default_offsets, with_module=True)  # type: ignore[attr-defined]

    def _runtime_factors(self) -> torch.Tensor:
        return self.norm_factors.to(self.dtype)

    def _runtime_offsets(self) -> torch.Tensor | None:
        return self.norm_offsets.to(self.dtype) if self._has_offsets else None

    def _init_decoder_norm(self) -> None:
        per_model = getattr(self.cfg, "decoder_init_norm_per_model", None)
        with torch.no_grad():
            if per_model is not None:
                # the reference (crosscoder_learning's CrossCoderDecoder): each model's block
                # of a latent's decoder row at the same norm, encoder = its transpose
                blocks: torch.Tensor = self.W_dec.data
                blocks.mul_(float(per_model) / blocks.norm(dim=-1, keepdim=True).clamp(min=1e-12))
            elif self.cfg.decoder_init_norm is not None:
                rows: torch.Tensor = self.W_dec_flat.data
                rows.mul_(self.cfg.decoder_init_norm / rows.norm(dim=-1, keepdim=True))
            else:
                return
            self.W_enc.data.copy_(self.W_dec_flat.T.reshape(self.W_enc.shape))

    @torch.no_grad()
    def set_norm_offsets(self, offsets: torch.Tensor) -> None:
        """Set the per-model input means ``mu`` (raw space, ``(n_models, d_in)``) subtracted
        before scaling (see ``sae_diff.dictionaries.normalisation``)."""
        t = torch.as_tensor(offsets, dtype=torch.float32)
        shape = (self.cfg.n_models, self.cfg.d_in)
        if tuple(t.shape) != shape or not torch.isfinite(t).all():
            raise ValueError(
                f"norm_offsets must be a finite {shape} tensor (one mean per model), "
                f"got shape {tuple(t.shape)}."
            )
        self.norm_offsets.copy_(t.to(self.norm_offsets.device))
        self._has_offsets = bool(t.any())

    @torch.no_grad()
    def set_norm_factors(self, factors: torch.Tensor | list[float]) -> None:
        """Set the per-model scalars (see ``sae_diff.dictionaries.normalisation``)."""
        t = torch.as_tensor(factors, dtype=torch.float32).reshape(-1)
        if t.numel() != self.cfg.n_models or not torch.isfinite(t).all() or (t <= 0).any():
            raise ValueError(
                f"norm_factors must be {self.cfg.n_models} positive finite scalars, got {t.tolist()}."
            )
        self.norm_factors.copy_(t.to(self.norm_factors.device))
        self.cfg.norm_factors = [float(v) for v in t]

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction in raw activation space (the normalisation undone)."""
        out = self.hook_sae_recons(self.decode_normalised(feature_acts))  # type: ignore[attr-defined]
        return self.unnormalise(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_sae_output(self.decode(self.encode(x)))  # type: ignore[attr-defined]

    @staticmethod
    def reconstruction_loss(x_n: torch.Tensor, xhat_n: torch.Tensor) -> torch.Tensor:
        """Squared error summed over models and dimensions, mean over tokens."""
        return (xhat_n - x_n).pow(2).flatten(-2).sum(-1).mean()

    def fold_W_dec_norm(self) -> None:
        raise NotImplementedError("Folding decoder norms is not defined for crosscoders.")

    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        raise NotImplementedError(
            "Crosscoders normalise with one scalar per model (set_norm_factors); leave "
            "SAELens's normalize_activations at 'none'."
        )

    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        """Fold the per-model means and scalars into the weights and biases; drop
        training-only buffers."""
        factors = state_dict.pop("norm_factors")
        offsets = state_dict.pop("norm_offsets", None)
        if offsets is not None and bool(offsets.any()):
            fold_offsets_into(state_dict, offsets, factors, self.cfg.apply_b_dec_to_input)
        self.fold_norm_factors_into(state_dict, factors)

    def inference_config_dict(self) -> dict[str, Any]:
        cfg = self.cfg.get_inference_sae_cfg_dict()
        cfg["norm_factors"] = [float(v) for v in self.norm_factors]
        return cfg

    def save_inference_model(self, path: str | Path) -> tuple[Path, Path]:
        """Write the inference form (folded weights, SAELens layout), atomically."""
        return save_sae_files(path, *inference_export(self))

    def to_inference(self) -> PairedDictionary:
        """The exported inference dictionary, in memory (weights folded, threshold set)."""
        # the mixin is only mixed into SAELens TrainingSAE subclasses, which are dictionaries
        return as_inference(cast(PairedDictionary, self))


def _default_offsets(module: Any, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    key = prefix + "norm_offsets"
    if key not in state_dict and prefix + "norm_factors" in state_dict:
        state_dict[key] = torch.zeros_like(module.norm_offsets)
    if key in state_dict:
        module._has_offsets = bool(torch.as_tensor(state_dict[key]).any())


def fold_offsets_into(
    state_dict: dict[str, torch.Tensor],
    offsets: torch.Tensor,
    factors: torch.Tensor,
    apply_b_dec_to_input: bool = False,
) -> None:
    """Fold the input centring ``x_n^m = c_m (x^m - mu_m)`` into the biases (before the
    scalars are folded by ``fold_norm_factors_into``), exactly, in float64:

    - encoder: ``sum_m W^m c_m (x^m - mu_m) + b_enc = sum_m W^m c_m x^m + b_enc'`` with
      ``b_enc' = b_enc - sum_m c_m mu_m W^m``;
    - decoder (normalised space): ``xhat_n^m + c_m mu_m`` is the reconstruction of ``c_m x^m``,
      so ``b_dec'^m = b_dec^m + c_m mu_m`` (divided by ``c_m`` with the weights afterwards).

    With ``apply_b_dec_to_input`` the encoder subtracts ``b_dec'``, which already carries the
    mean, so ``b_enc`` stays as it is.
    """
    w = state_dict["W_enc"]
    c = factors.to(torch.float64)
    mu_n = offsets.to(torch.float64) * c[:, None]  # (n_models, d_in), in the normalised space
    if not apply_b_dec_to_input:
        shift = torch.einsum("md,mdn->n", mu_n, w.to(torch.float64))
        state_dict["b_enc"] = (state_dict["b_enc"].to(torch.float64) - shift).to(
            state_dict["b_enc"].dtype
        )
    state_dict["b_dec"] = (state_dict["b_dec"].to(torch.float64) + mu_n).to(
        state_dict["b_dec"].dtype
    )


def validate_init_norm(value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"decoder_init_norm_per_model must be a positive number or None, got {value}."
        )


@dataclass(kw_only=True)
class L1CrosscoderTrainingConfig(TrainingSAEConfig, CrosscoderFields):
    """Training config of the L1 crosscoder (architecture ``crosscoder``).

    ``decoder_init_norm_per_model`` and ``center_inputs`` mean what they mean for the
    BatchTopK crosscoder; they are off by default here (the L1 crosscoder keeps SAELens's
    ``decoder_init_norm`` on the concatenated row and uncentred inputs, as before).
    """

    apply_b_dec_to_input: bool = False
    l1_coefficient: float = 1.0
    l1_warm_up_steps: int = 0
    decoder_init_norm_per_model: float | None = None
    center_inputs: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_common_fields(self)
        validate_init_norm(self.decoder_init_norm_per_model)

    @classmethod
    def architecture(cls) -> str:
        return "crosscoder"

    def get_inference_config_class(self) -> type[SAEConfig]:
        return CrosscoderConfig


class L1CrosscoderTraining(CrosscoderTrainingMixin, TrainingSAE[L1CrosscoderTrainingConfig]):
    """L1 crosscoder trained with SAELens's ``SAETrainer``; sparsity = lambda·sum_j f_j s_j."""

    cfg: L1CrosscoderTrainingConfig  # type: ignore[assignment]

    def __init__(self, cfg: L1CrosscoderTrainingConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self._init_training_state()

    def initialize_weights(self) -> None:
        self._init_crosscoder_weights()
        self._init_decoder_norm()

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_normalised(self.normalised_input(x))

    def encode_normalised(self, x_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_pre = self.hook_sae_acts_pre(self.hidden_pre(self.hook_sae_input(x_n)))
        return self.hook_sae_acts_post(torch.relu(hidden_pre)), hidden_pre

    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {
            "l1": TrainCoefficientConfig(
                value=self.cfg.l1_coefficient, warm_up_steps=self.cfg.l1_warm_up_steps
            )
        }

    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        sparsity = (feature_acts * self.code_scale()).sum(-1).mean()
        return {"l1_loss": step_input.coefficients["l1"] * sparsity}

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        x_n = self.normalised_input(step_input.sae_in)
        feature_acts, hidden_pre = self.encode_normalised(x_n)
        xhat_n = self.decode_normalised(feature_acts)
        mse = self.reconstruction_loss(x_n, xhat_n)
        aux = self.calculate_aux_loss(step_input, feature_acts, hidden_pre, xhat_n)
        losses = {"mse_loss": mse, **aux}
        return TrainStepOutput(
            sae_in=x_n,
            sae_out=xhat_n,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=sum(losses.values()),  # type: ignore[arg-type]
            losses=losses,
        )
