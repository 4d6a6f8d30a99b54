"""BatchTopK crosscoder (training ``batchtopk_crosscoder``) and its inference form
(``jumprelu_crosscoder``), following METHODS.md §1.

Training: pre-activations ``p = ReLU(sum_m W_enc^m x^m + b_enc)``, selection scores
``v = p * s`` (s = code normalisation). The batch keeps its top ``B*k`` scores; kept latents
carry their *unscaled* ``p``. A global threshold ``theta`` on ``v`` is tracked as an EMA of
the smallest kept score. Export turns it into a JumpReLU with per-latent thresholds
``theta / s_j`` on ``p`` (s_j measured in the training space, before the normalisation fold).

Dead latents get an auxiliary loss that reconstructs the detached residual with the top
``k_aux`` dead latents (weight ``aux_loss_coefficient``, default 1/32, normalised by the
residual's variance). It is part of the loss that is back-propagated.

Which entries a training batch keeps is a per-instance hook, :class:`BatchSelection`
(``set_batch_selection``): None (the default) keeps the top ``B*k`` of this batch; a
data-parallel run sets the selection over the global batch of every process
(``sae_diff.training.global_topk``), so W processes train what one process trains.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes.sae import (
    SAEConfig,
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from torch import nn

from sae_diff.dictionaries import kernels
from sae_diff.dictionaries.base import CrosscoderFields, CrosscoderSAE, validate_common_fields
from sae_diff.dictionaries.crosscoder import (
    CrosscoderConfig,
    CrosscoderTrainingMixin,
    validate_init_norm,
)
from sae_diff.dictionaries.normalisation import INPUT_SCALINGS
from sae_diff.dictionaries.topk import BatchSelection, batch_topk_mask

LOSS_FORMS: tuple[str, ...] = ("squared", "norm")


def validate_k(k: float, d_sae: int) -> None:
    if not 0 < k <= d_sae:
        raise ValueError(
            f"k must satisfy 0 < k <= d_sae ({d_sae}), got k={k}. Lower k or widen the dictionary."
        )


@dataclass
class JumpReLUCrosscoderConfig(CrosscoderConfig):
    """Inference config of a BatchTopK-trained crosscoder; ``k`` is recorded for reference."""

    k: float | None = None

    @classmethod
    def architecture(cls) -> str:
        return "jumprelu_crosscoder"


class JumpReLUCrosscoder(CrosscoderSAE):
    """Inference crosscoder with per-latent thresholds: ``f_j = p_j * 1[p_j > threshold_j]``."""

    cfg: JumpReLUCrosscoderConfig  # type: ignore[assignment]
    threshold: nn.Parameter

    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.threshold = nn.Parameter(
            torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device)
        )

    def activate(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        p = torch.relu(hidden_pre)
        return p * (p > self.threshold)


@dataclass(kw_only=True)
class BatchTopKCrosscoderTrainingConfig(TrainingSAEConfig, CrosscoderFields):
    """Training config of the BatchTopK crosscoder (architecture ``batchtopk_crosscoder``).

    The defaults follow the reference trainer, crosscoder_learning's
    ``BatchTopKCrossCoderTrainer`` (docs/methods.md lists its conventions and every
    difference); with them a run matches it within seed noise on the organism
    (``benchmarks/fidelity.py``).

    Args:
        k: target mean L0 (the batch keeps its top ``B*k`` selection scores).
        aux_loss_coefficient: weight of the dead-latent auxiliary loss (1/32 by default).
        k_aux: dead latents used by the auxiliary loss per token (default ``d_in // 2``).
        decoder_init_norm_per_model: initial norm of each model's block of every decoder row
            (encoder = decoder transpose); 1.0 as in the reference. It replaces SAELens's
            ``decoder_init_norm`` (the norm of the concatenated row, 0.1 by default: about 0.07
            per model, far too small next to ``||x^m|| ~ sqrt(d)``; most latents are then never
            selected). ``None`` = use ``decoder_init_norm``.
        center_inputs: subtract each model's activation mean (estimated with the
            normalisation factors, ``prepare_crosscoder``) before scaling, as the reference
            does; folded into ``b_enc``/``b_dec`` on export, so saved dictionaries read raw
            activations.
        input_scaling: the per-model scalar ``c_m``: ``"unit_rms"`` (``E||x_n^m||^2 = 1`` on the
            centred data, the reference's ``target_rms = 1``) or ``"sqrt_d"``
            (``E||x_n^m|| = sqrt(d)``, SAELens's convention). Adam's steps are absolute, so the
            input scale changes how fast the biases move relative to the weights: only the
            reference's scale reproduces its dictionaries.
        threshold_ema_decay: EMA decay of the inference threshold (0.999, the reference's).
        threshold_start_step: the threshold's moving average restarts from the batch's
            smallest kept score at the first step whose (0-based) index exceeds this (the
            reference: 1000), so early-training scores do not bias the inference L0. Before it
            the average runs from the first batch, so that shorter runs still export a measured
            threshold (then lower the decay, or this step, for them).
        loss_form: reconstruction term: ``"norm"`` (the reference's unsquared ``||x^m - xhat^m||``,
            mean over tokens and models; the default) or ``"squared"`` (``sum_m ||x^m -
            xhat^m||^2``, mean over tokens; METHODS.md's convention for the L1 crosscoder). With
            gradient clipping at 1 the two train differently (docs/methods.md). Reported as
            ``mse_loss`` either way.
        sparse_kernels: train with ``sae_diff.dictionaries.kernels`` (dense encoder matmul,
            fast exact batch top-k, sparse decode and sparse backward; same loss and gradients
            as the dense path, see docs/performance.md). ``False`` = the dense reference path.
    """

    apply_b_dec_to_input: bool = False
    k: float = 32
    aux_loss_coefficient: float = 1 / 32
    k_aux: int | None = None
    decoder_init_norm_per_model: float | None = 1.0
    center_inputs: bool = True
    input_scaling: str = "unit_rms"
    threshold_ema_decay: float = 0.999
    threshold_start_step: int = 1000
    loss_form: str = "norm"
    sparse_kernels: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_common_fields(self)
        validate_k(self.k, self.d_sae)
        if self.input_scaling not in INPUT_SCALINGS:
            raise ValueError(
                f"Unknown input_scaling {self.input_scaling!r}; choose one of {list(INPUT_SCALINGS)}."
            )
        if self.loss_form not in LOSS_FORMS:
            raise ValueError(
                f"Unknown loss_form {self.loss_form!r}; choose one of {list(LOSS_FORMS)}."
            )
        validate_init_norm(self.decoder_init_norm_per_model)
        if not 0.0 <= self.threshold_ema_decay < 1.0:
            raise ValueError(
                f"threshold_ema_decay must be in [0, 1), got {self.threshold_ema_decay} "
                "(0.999 is the reference's; 0.99 settles faster on short runs)."
            )
        if self.threshold_start_step < 0:
            raise ValueError(f"threshold_start_step must be >= 0, got {self.threshold_start_step}.")

    @classmethod
    def architecture(cls) -> str:
        return "batchtopk_crosscoder"

    def get_inference_config_class(self) -> type[SAEConfig]:
        return JumpReLUCrosscoderConfig


class BatchTopKCrosscoderTraining(
    CrosscoderTrainingMixin, TrainingSAE[BatchTopKCrosscoderTrainingConfig]
):
    """BatchTopK crosscoder trained with SAELens's ``SAETrainer``."""

    cfg: BatchTopKCrosscoderTrainingConfig  # type: ignore[assignment]
    topk_threshold: torch.Tensor

    def __init__(self, cfg: BatchTopKCrosscoderTrainingConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self._init_training_state()
        # -1 marks "not yet measured": the first batch sets it, later ones update the EMA.
        self.register_buffer(
            "topk_threshold", torch.tensor(-1.0, dtype=torch.float64, device=self.W_dec.device)
        )
        self.batch_selection: BatchSelection | None = None

    def set_batch_selection(self, selection: BatchSelection | None) -> None:
        """Keep each training batch's entries chosen by ``selection`` (None: the top
        ``int(k * B)`` of this batch, the default). ``DataParallel`` sets a selection over
        the global batch of every process for the run and resets it afterwards."""
        self.batch_selection = selection

    def initialize_weights(self) -> None:
        self._init_crosscoder_weights()
        self._init_decoder_norm()

    # --- encoding -------------------------------------------------------------------------
    def selection_scores(self, hidden_pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``p = ReLU(hidden_pre)`` and the detached selection scores ``v = p * s``."""
        p = torch.relu(hidden_pre)
        with torch.no_grad():
            v = p.detach() * self.code_scale().detach()
        return p, v

    def encode_normalised(self, x_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_pre = self.hook_sae_acts_pre(self.hidden_pre(self.hook_sae_input(x_n)))
        p, v = self.selection_scores(hidden_pre)
        rows = v.reshape(-1, self.cfg.d_sae)
        k_total = int(self.cfg.k * rows.shape[0])
        select_mask = batch_topk_mask if self.batch_selection is None else self.batch_selection.mask
        mask = select_mask(rows, k_total).view_as(p)
        return self.hook_sae_acts_post(p * mask), hidden_pre

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_normalised(self.normalised_input(x))

    # --- losses ---------------------------------------------------------------------------
    def batch_reconstruction_loss(self, x_n: torch.Tensor, xhat_n: torch.Tensor) -> torch.Tensor:
        """The configured reconstruction term (``loss_form``), in the normalised space."""
        if self.cfg.loss_form == "norm":
            return (xhat_n - x_n).norm(dim=-1).mean()
        return self.reconstruction_loss(x_n, xhat_n)

    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {}

    def auxiliary_loss(
        self,
        x_n: torch.Tensor,
        xhat_n: torch.Tensor,
        hidden_pre: torch.Tensor,
        dead_neuron_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Dead latents reconstruct the detached residual (normalised by its variance)."""
        if dead_neuron_mask is None or (num_dead := int(dead_neuron_mask.sum())) == 0:
            return xhat_n.new_zeros(())
        k_aux = min(self.cfg.k_aux or max(self.cfg.d_in // 2, 1), num_dead)
        residual = (x_n - xhat_n).detach().reshape(-1, self.cfg.n_models * self.cfg.d_in)
        h = hidden_pre.reshape(-1, self.cfg.d_sae)
        candidates = torch.where(dead_neuron_mask[None, :], h, torch.finfo(h.dtype).min)
        top = candidates.topk(k_aux, dim=-1, sorted=False)
        acts = torch.zeros_like(h).scatter(-1, top.indices, h.gather(-1, top.indices))
        recon = acts @ self.W_dec_flat
        err = (recon - residual).pow(2).sum(-1).mean()
        variance = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp(min=1e-12)
        return self.cfg.aux_loss_coefficient * err / variance

    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """``sae_out`` is the normalised-space reconstruction (as training_forward_pass passes it)."""
        x_n = self.normalised_input(step_input.sae_in)
        return {
            "auxiliary_reconstruction_loss": self.auxiliary_loss(
                x_n, sae_out, hidden_pre, step_input.dead_neuron_mask
            )
        }

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        if self.cfg.sparse_kernels:
            return self._sparse_training_forward_pass(step_input)
        x_n = self.normalised_input(step_input.sae_in)
        feature_acts, hidden_pre = self.encode_normalised(x_n)
        xhat_n = self.decode_normalised(feature_acts)
        losses = {
            "mse_loss": self.batch_reconstruction_loss(x_n, xhat_n),
            "auxiliary_reconstruction_loss": self.auxiliary_loss(
                x_n, xhat_n, hidden_pre, step_input.dead_neuron_mask
            ),
        }
        self.update_threshold(feature_acts, step_input.n_training_steps)
        out = TrainStepOutput(
            sae_in=x_n,
            sae_out=xhat_n,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=losses["mse_loss"] + losses["auxiliary_reconstruction_loss"],
            losses=losses,
        )
        out.metrics["topk_threshold"] = self.topk_threshold
        return out

    def _sparse_training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """The same step with the sparse kernels: only the encoder forward matmul is dense.

        ``feature_acts`` is a detached sparse COO ``(B, d_sae)`` tensor (what SAETrainer's
        statistics accept); ``hidden_pre`` is not materialised (an empty tensor); the
        ``hook_sae_acts_*`` hook points are bypassed.
        """
        x_n = self.normalised_input(step_input.sae_in)
        x_in = x_n - self.b_dec if self.cfg.apply_b_dec_to_input else x_n
        D = self.cfg.n_models * self.cfg.d_in
        flat = x_in.reshape(-1, D)
        B = flat.shape[0]
        scale = self.code_scale().detach()
        dead = step_input.dead_neuron_mask
        num_dead = 0 if dead is None else int(dead.sum())
        aux_latents = dead.nonzero().view(-1) if dead is not None and num_dead > 0 else None
        k_aux = min(self.cfg.k_aux or max(self.cfg.d_in // 2, 1), num_dead)
        theta = float(self.topk_threshold)
        code, aux_code, _ = kernels.sparse_encode(
            flat,
            self.W_enc_flat,
            self.b_enc,
            int(self.cfg.k * B),
            scale=scale,
            threshold_hint=theta if theta > 0 else None,
            aux_latents=aux_latents,
            k_aux=k_aux,
            aux_scaled=False,
            select=None if self.batch_selection is None else self.batch_selection.select,
        )
        xhat_n = kernels.sparse_decode(code, self.W_dec_flat).view_as(x_n) + self.b_dec
        aux_loss = xhat_n.new_zeros(())
        if aux_code is not None:
            residual = (x_n - xhat_n).detach().reshape(-1, D)
            recon = kernels.sparse_decode(aux_code, self.W_dec_flat)
            err = (recon - residual).pow(2).sum(-1).mean()
            variance = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp(min=1e-12)
            aux_loss = self.cfg.aux_loss_coefficient * err / variance
        losses = {
            "mse_loss": self.batch_reconstruction_loss(x_n, xhat_n),
            "auxiliary_reconstruction_loss": aux_loss,
        }
        with torch.no_grad():
            v = code.values.detach() * scale[code.col]
            v = v[v > 0]
            self._feed_threshold(
                v.min().to(torch.float64) if v.numel() else None, step_input.n_training_steps
            )
        feature_acts = code.to_sparse_coo()
        out = TrainStepOutput(
            sae_in=x_n,
            sae_out=xhat_n,
            feature_acts=feature_acts,
            hidden_pre=x_n.new_empty(0, self.cfg.d_sae),
            loss=losses["mse_loss"] + losses["auxiliary_reconstruction_loss"],
            losses=losses,
        )
        out.metrics["topk_threshold"] = self.topk_threshold
        return out

    @torch.no_grad()
    def _update_threshold_from_min(self, min_kept: torch.Tensor, step: int | None = None) -> None:
        """theta <- decay*theta + (1-decay)*min_kept; restarted (theta <- min_kept) on the first
        batch and on the first step after ``threshold_start_step`` (stateless, so a resumed
        run restarts it at the same step)."""
        restart = step is not None and step == self.cfg.threshold_start_step + 1
        if self.topk_threshold < 0 or restart:
            self.topk_threshold.copy_(min_kept)
        else:
            decay = self.cfg.threshold_ema_decay
            self.topk_threshold.mul_(decay).add_((1 - decay) * min_kept)

    @torch.no_grad()
    def _feed_threshold(self, local_min: torch.Tensor | None, step: int | None) -> None:
        """Update the EMA with this batch's smallest kept score ``local_min`` (None: none
        kept), or with what the selection hook says the batch's is (``BatchSelection.min_kept``)."""
        if self.batch_selection is not None:
            local_min = self.batch_selection.min_kept(local_min)
        if local_min is not None:
            self._update_threshold_from_min(local_min.to(self.topk_threshold.device), step)

    @torch.no_grad()
    def update_threshold(self, feature_acts: torch.Tensor, step: int | None = None) -> None:
        """EMA of the smallest kept selection score (see ``_update_threshold_from_min``);
        ``step`` is the 0-based index of the training step (``None``: no restart)."""
        kept = feature_acts > 0
        local_min = None
        if kept.any():
            local_min = (feature_acts * self.code_scale())[kept].min().to(torch.float64)
        self._feed_threshold(local_min, step)

    # --- export ---------------------------------------------------------------------------
    def inference_thresholds(self) -> torch.Tensor:
        """Per-latent thresholds on p: theta / s_j (s_j in the training space)."""
        theta = float(self.topk_threshold)
        if theta < 0:
            warnings.warn(
                "Exporting a BatchTopK crosscoder whose threshold was never measured "
                "(no training step ran); using threshold 0 (plain ReLU).",
                stacklevel=3,
            )
            theta = 0.0
        return (theta / self.code_scale().detach().clamp(min=1e-8)).to(self.dtype)

    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        state_dict.pop("topk_threshold", None)
        state_dict["threshold"] = self.inference_thresholds()
        super().process_state_dict_for_saving_inference(state_dict)

    def inference_config_dict(self) -> dict[str, Any]:
        cfg = super().inference_config_dict()
        cfg["k"] = float(self.cfg.k)
        return cfg
