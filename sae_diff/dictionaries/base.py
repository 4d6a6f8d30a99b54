"""Shared machinery for crosscoders: paired-input checks, encode/decode, folding.

A crosscoder reads one activation vector per model, ``x`` shaped ``(..., n_models, d_in)``
(index 0 = base, index 1 = ft), and writes one reconstruction per model through its own
decoder. Weights follow one layout everywhere in ``sae_diff``::

    W_enc (n_models, d_in, d_sae)   b_enc (d_sae,)
    W_dec (d_sae, n_models, d_in)   b_dec (n_models, d_in)

Reshaped views ``(n_models*d_in, d_sae)`` / ``(d_sae, n_models*d_in)`` make encode and decode
one matmul each, and let sparse kernels treat a crosscoder like an SAE of width n_models*d_in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from sae_lens.saes.sae import SAE, SAEConfig
from torch import nn

from sae_diff.dictionaries.specs import DIFF_SIGNS

CodeNormalisation = Literal["crosscoder", "sae", "none"]
CODE_NORMALISATIONS: tuple[str, ...] = ("crosscoder", "sae", "none")
# the diff-sign vocabulary is defined once, in sae_diff.dictionaries.specs


def check_paired_input(x: torch.Tensor, n_models: int, d_in: int) -> None:
    """Raise a clear error unless ``x`` is ``(..., n_models, d_in)`` and finite."""
    if x.ndim < 2 or tuple(x.shape[-2:]) != (n_models, d_in):
        raise ValueError(
            f"Expected paired activations shaped (..., n_models={n_models}, d_in={d_in}) "
            f"with index 0 = base and 1 = ft, got shape {tuple(x.shape)}. Stack the two "
            "models' activations with torch.stack([x_base, x_ft], dim=-2)."
        )
    check_finite(x)


def check_finite(x: torch.Tensor) -> None:
    """Raise if ``x`` holds NaN or inf (one reduction; cheap next to the encoder matmul)."""
    if not torch.isfinite(x).all():
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"Input activations contain {n_bad} NaN/inf values. Check the model's dtype "
            "(fp16 overflow is common) and mask the offending tokens before encoding."
        )


def validate_common_fields(cfg: Any) -> None:
    """Checks shared by every crosscoder config; each error says how to fix it."""
    if cfg.n_models < 1:
        raise ValueError(f"n_models must be >= 1, got {cfg.n_models}.")
    if cfg.code_normalisation not in CODE_NORMALISATIONS:
        raise ValueError(
            f"Unknown code_normalisation {cfg.code_normalisation!r}; "
            f"choose one of {list(CODE_NORMALISATIONS)}."
        )
    if cfg.norm_factors is not None and len(cfg.norm_factors) != cfg.n_models:
        raise ValueError(
            f"norm_factors has {len(cfg.norm_factors)} entries but n_models={cfg.n_models}: "
            "give one scalar per model."
        )


@dataclass(kw_only=True)
class CrosscoderFields:
    """Fields every crosscoder config (inference and training) carries.

    ``norm_factors``: one scalar per model such that ``x_normalised = factor * x_raw`` has
    E||x|| = sqrt(d_in). In a training class they are applied at run time; in a saved
    inference dictionary they are already folded into the weights and are recorded so that
    analyses (Δ, Latent Scaling) can work in the training space.
    Concrete configs also set ``apply_b_dec_to_input = False``: the crosscoder encoder reads
    raw activations (METHODS.md §1), unlike SAELens's SAE default.
    """

    n_models: int = 2
    code_normalisation: str = "crosscoder"
    norm_factors: list[float] | None = None


class CrosscoderMixin:
    """Encode/decode for any module holding crosscoder weights (inference or training)."""

    cfg: Any
    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter
    dtype: torch.dtype
    device: torch.device

    def _init_crosscoder_weights(self) -> None:
        n, m, d = self.cfg.d_sae, self.cfg.n_models, self.cfg.d_in
        w_dec = torch.empty(n, m * d, dtype=self.dtype, device=self.device)
        nn.init.kaiming_uniform_(w_dec)
        self.W_dec = nn.Parameter(w_dec.view(n, m, d))
        self.W_enc = nn.Parameter(w_dec.T.contiguous().view(m, d, n).clone())
        self.b_enc = nn.Parameter(torch.zeros(n, dtype=self.dtype, device=self.device))
        self.b_dec = nn.Parameter(torch.zeros(m, d, dtype=self.dtype, device=self.device))

    # --- views ----------------------------------------------------------------------
    @property
    def W_enc_flat(self) -> torch.Tensor:
        """Encoder as one ``(n_models*d_in, d_sae)`` matrix (a view)."""
        return self.W_enc.reshape(-1, self.cfg.d_sae)

    @property
    def W_dec_flat(self) -> torch.Tensor:
        """Decoder as one ``(d_sae, n_models*d_in)`` matrix (a view)."""
        return self.W_dec.reshape(self.cfg.d_sae, -1)

    def code_scale(self) -> torch.Tensor:
        """s_j of METHODS.md §1: how each latent's decoder norms weight sparsity/selection."""
        mode = self.cfg.code_normalisation
        if mode == "crosscoder":
            return self.W_dec.norm(dim=-1).sum(dim=-1)
        if mode == "sae":
            return self.W_dec_flat.norm(dim=-1)
        return torch.ones(self.cfg.d_sae, dtype=self.W_dec.dtype, device=self.W_dec.device)

    # --- forward pieces -----------------------------------------------------------------
    def _runtime_factors(self) -> torch.Tensor | None:
        """Per-model scalars applied at run time (training classes only)."""
        return None

    def _runtime_offsets(self) -> torch.Tensor | None:
        """Per-model means subtracted before the scalars (training classes that centre)."""
        return None

    def normalised_input(self, x: torch.Tensor) -> torch.Tensor:
        """Check and cast paired input; apply ``c_m (x^m - mu_m)`` (training classes only)."""
        check_paired_input(x, self.cfg.n_models, self.cfg.d_in)
        x = x.to(self.dtype)
        offsets = self._runtime_offsets()
        if offsets is not None:
            x = x - offsets
        factors = self._runtime_factors()
        return x if factors is None else x * factors[:, None]

    def hidden_pre(self, x_n: torch.Tensor) -> torch.Tensor:
        """Pre-activation ``sum_m W_enc^m (x^m - [b_dec^m]) + b_enc`` as one matmul."""
        if self.cfg.apply_b_dec_to_input:
            x_n = x_n - self.b_dec
        lead = x_n.shape[:-2]
        flat = x_n.reshape(-1, self.cfg.n_models * self.cfg.d_in)
        return (flat @ self.W_enc_flat + self.b_enc).reshape(*lead, self.cfg.d_sae)

    def decode_normalised(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the (training-)normalised space, ``(..., n_models, d_in)``."""
        lead = feature_acts.shape[:-1]
        flat = feature_acts.reshape(-1, self.cfg.d_sae) @ self.W_dec_flat
        return flat.reshape(*lead, self.cfg.n_models, self.cfg.d_in) + self.b_dec

    def unnormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of the input transform: ``x_n^m / c_m + mu_m``."""
        factors = self._runtime_factors()
        x = x if factors is None else x / factors[:, None]
        offsets = self._runtime_offsets()
        return x if offsets is None else x + offsets

    # --- folding ------------------------------------------------------------------------
    @staticmethod
    def fold_norm_factors_into(state_dict: dict[str, torch.Tensor], factors: torch.Tensor) -> None:
        """Fold per-model scalars into crosscoder weights so they act on raw activations.

        With x_n^m = c_m x^m: W_enc^m <- c_m W_enc^m, and the decoder output is divided by
        c_m (W_dec^m, b_dec^m <- ·/c_m). Pre-activations, and so codes, are unchanged.
        """
        c = factors.to(state_dict["W_enc"].dtype)
        state_dict["W_enc"] = state_dict["W_enc"] * c[:, None, None]
        state_dict["W_dec"] = state_dict["W_dec"] / c[None, :, None]
        state_dict["b_dec"] = state_dict["b_dec"] / c[:, None]


class CrosscoderSAE(CrosscoderMixin, SAE[Any]):
    """Common inference base: SAELens ``SAE`` with crosscoder weights."""

    def initialize_weights(self) -> None:
        self._init_crosscoder_weights()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x_n = self.hook_sae_input(self.normalised_input(x))
        hidden_pre = self.hook_sae_acts_pre(self.hidden_pre(x_n))
        return self.hook_sae_acts_post(self.activate(hidden_pre))

    def activate(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(hidden_pre)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return self.hook_sae_recons(self.decode_normalised(feature_acts))

    @torch.no_grad()
    def get_W_dec_norm(self) -> torch.Tensor:
        return self.code_scale().clamp(min=1e-8)

    def fold_W_dec_norm(self) -> None:
        raise NotImplementedError(
            "Folding decoder norms is not defined for crosscoders (one latent has one decoder "
            "row per model); use sae_diff.dictionaries.geometry for per-model norms instead."
        )

    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        raise NotImplementedError(
            "Crosscoders use one normalisation scalar per model (cfg.norm_factors), folded on "
            "export; a single SAELens scaling factor does not apply."
        )


__all__ = [
    "CODE_NORMALISATIONS",
    "DIFF_SIGNS",
    "CrosscoderFields",
    "CrosscoderMixin",
    "CrosscoderSAE",
    "SAEConfig",
    "check_finite",
    "check_paired_input",
    "validate_common_fields",
]
