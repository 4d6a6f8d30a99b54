"""JumpReLU crosscoder trained directly: training architecture ``jumprelu_crosscoder``
(inference form ``jumprelu_crosscoder``, the same class the BatchTopK crosscoder exports to).

Anthropic's January 2025 circuits update trains JumpReLU dictionaries directly instead of
converting a BatchTopK one afterwards. In the normalised space (x_n^m = c_m (x^m - mu_m)),
mean over tokens::

    h   = sum_m W_enc^m x_n^m + b_enc                      (pre-activation)
    f_j = h_j * 1[h_j > theta_j]                           (JumpReLU, theta_j >= 0 learnt)
    L   = sum_m ||x_n^m - xhat_n^m||^2                     (as the other crosscoders)
        + lambda_S * sum_j tanh(c * f_j * s_j)             (sparsity on f_j·||d_j||)
        + lambda_P * sum_j ReLU(theta_j - h_j) * s_j       (pre-activation loss)

with s_j the code normalisation (``crosscoder``: sum of per-model decoder norms). The step
``1[h > theta]`` has zero gradient almost everywhere; a straight-through estimator with a
rectangle kernel of width ``jumprelu_bandwidth`` gives the threshold (and, with
``jumprelu_ste_to_input``, the pre-activations) a gradient. The autograd functions are
SAELens's own (``sae_lens.saes.jumprelu_sae.JumpReLU``), reused, not rewritten.

The pre-activation loss pushes every latent's pre-activation up towards its threshold where it
is below it, so latents that never fire still receive gradient (Anthropic applies it to all
latents with a small coefficient, 3e-6 in their setup; ``pre_act_loss_dead_only`` restricts it
to dead latents as SAELens's JumpReLU SAE does).

Inference equals training: ``f_j = p_j 1[p_j > theta_j]`` with ``p = ReLU(h)`` is the same
function as ``h_j 1[h_j > theta_j]`` for ``theta_j >= 0`` (the threshold is projected onto
``[0, inf)`` before every step), and the per-model scalars fold into the weights without
changing ``h``, so the saved ``threshold`` is the trained one, unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes.jumprelu_sae import JumpReLU
from sae_lens.saes.sae import (
    SAEConfig,
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from torch import nn

from sae_diff.dictionaries.base import CrosscoderFields, validate_common_fields
from sae_diff.dictionaries.batchtopk_crosscoder import JumpReLUCrosscoderConfig
from sae_diff.dictionaries.crosscoder import CrosscoderTrainingMixin, validate_init_norm


@dataclass(kw_only=True)
class JumpReLUCrosscoderTrainingConfig(TrainingSAEConfig, CrosscoderFields):
    """Training config of the directly trained JumpReLU crosscoder (``jumprelu_crosscoder``).

    Args:
        l0_coefficient: lambda_S, weight of the tanh sparsity penalty (warmed up linearly over
            ``l0_warm_up_steps``, as SAELens does for its own JumpReLU SAE).
        jumprelu_tanh_scale: c in ``tanh(c f_j s_j)`` (Anthropic: 4).
        jumprelu_init_threshold: initial theta_j (on the pre-activation, normalised space).
        jumprelu_bandwidth: width of the straight-through estimator's rectangle kernel.
        jumprelu_ste_to_input: also pass the estimator's gradient to the pre-activations
            (Anthropic's choice; DeepMind's passes it to the threshold only).
        pre_act_loss_coefficient: lambda_P of the pre-activation loss; ``None`` disables it.
        pre_act_loss_dead_only: apply the pre-activation loss to dead latents only.
        decoder_init_norm_per_model / center_inputs: as for the BatchTopK crosscoder.
    """

    apply_b_dec_to_input: bool = False
    l0_coefficient: float = 1.0
    l0_warm_up_steps: int = 0
    jumprelu_tanh_scale: float = 4.0
    jumprelu_init_threshold: float = 0.1
    jumprelu_bandwidth: float = 0.1
    jumprelu_ste_to_input: bool = True
    pre_act_loss_coefficient: float | None = 3e-6
    pre_act_loss_dead_only: bool = False
    decoder_init_norm_per_model: float | None = 1.0
    center_inputs: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_common_fields(self)
        validate_init_norm(self.decoder_init_norm_per_model)
        for name in ("jumprelu_tanh_scale", "jumprelu_bandwidth"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}.")
        if not (math.isfinite(self.jumprelu_init_threshold) and self.jumprelu_init_threshold >= 0):
            raise ValueError(
                f"jumprelu_init_threshold must be >= 0 (the threshold is kept non-negative), "
                f"got {self.jumprelu_init_threshold}."
            )
        if self.l0_coefficient < 0:
            raise ValueError(f"l0_coefficient must be >= 0, got {self.l0_coefficient}.")
        if self.pre_act_loss_coefficient is not None and self.pre_act_loss_coefficient < 0:
            raise ValueError(
                f"pre_act_loss_coefficient must be >= 0 or null, got {self.pre_act_loss_coefficient}."
            )

    @property
    def k(self) -> None:
        """The saved form records a BatchTopK ``k``; a directly trained JumpReLU has none."""
        return None

    @classmethod
    def architecture(cls) -> str:
        return "jumprelu_crosscoder"

    def get_inference_config_class(self) -> type[SAEConfig]:
        return JumpReLUCrosscoderConfig


class JumpReLUCrosscoderTraining(
    CrosscoderTrainingMixin, TrainingSAE[JumpReLUCrosscoderTrainingConfig]
):
    """JumpReLU crosscoder trained with SAELens's ``SAETrainer`` (see the module docstring)."""

    cfg: JumpReLUCrosscoderTrainingConfig  # type: ignore[assignment]
    threshold: nn.Parameter

    def __init__(self, cfg: JumpReLUCrosscoderTrainingConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self._init_training_state()
        # float32 whatever the dictionary's dtype: Adam's ~lr steps round away in bf16
        self.threshold = nn.Parameter(
            torch.full(
                (cfg.d_sae,),
                float(cfg.jumprelu_init_threshold),
                dtype=torch.float32,
                device=self.W_dec.device,
            )
        )

    def initialize_weights(self) -> None:
        self._init_crosscoder_weights()
        self._init_decoder_norm()

    def _apply(self, *args: Any, **kwargs: Any) -> Any:
        out = super()._apply(*args, **kwargs)
        threshold = self._parameters.get("threshold")
        if threshold is not None and threshold.dtype != torch.float32:
            threshold.data = threshold.data.float()
        return out

    def encode_normalised(self, x_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_pre = self.hook_sae_acts_pre(self.hidden_pre(self.hook_sae_input(x_n)))
        acts = JumpReLU.apply(
            hidden_pre,
            self.threshold.to(hidden_pre.dtype),
            self.cfg.jumprelu_bandwidth,
            self.cfg.jumprelu_ste_to_input,
        )
        return self.hook_sae_acts_post(acts), hidden_pre

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_normalised(self.normalised_input(x))

    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {
            "l0": TrainCoefficientConfig(
                value=self.cfg.l0_coefficient, warm_up_steps=self.cfg.l0_warm_up_steps
            )
        }

    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """tanh sparsity on ``f_j s_j`` and the pre-activation loss (module docstring)."""
        s = self.code_scale()
        tanh = torch.tanh(self.cfg.jumprelu_tanh_scale * feature_acts * s).sum(-1).mean()
        losses = {"l0_loss": step_input.coefficients["l0"] * tanh}
        if self.cfg.pre_act_loss_coefficient is not None:
            gap = (self.threshold.to(hidden_pre.dtype) - hidden_pre).relu() * s
            if self.cfg.pre_act_loss_dead_only:
                dead = step_input.dead_neuron_mask
                gap = gap * dead if dead is not None else gap * 0
            losses["pre_act_loss"] = self.cfg.pre_act_loss_coefficient * gap.sum(-1).mean()
        return losses

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        with torch.no_grad():  # keep theta >= 0 (projection, not a clamp in the graph)
            self.threshold.data.clamp_(min=0.0)
        x_n = self.normalised_input(step_input.sae_in)
        feature_acts, hidden_pre = self.encode_normalised(x_n)
        xhat_n = self.decode_normalised(feature_acts)
        losses = {
            "mse_loss": self.reconstruction_loss(x_n, xhat_n),
            **self.calculate_aux_loss(step_input, feature_acts, hidden_pre, xhat_n),
        }
        return TrainStepOutput(
            sae_in=x_n,
            sae_out=xhat_n,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=sum(losses.values()),
            losses=losses,
        )  # type: ignore[arg-type]

    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        state_dict["threshold"] = state_dict["threshold"].clamp(min=0.0).to(self.dtype)
        super().process_state_dict_for_saving_inference(state_dict)


__all__ = ["JumpReLUCrosscoderTraining", "JumpReLUCrosscoderTrainingConfig"]
