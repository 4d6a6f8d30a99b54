"""What one Latent Scaling pass returns: betas, ratios (ν) and firing statistics per latent.

:class:`LatentScalingResult` holds the float64 sums of :func:`sae_diff.analysis.latent_scaling`
(and of the naive reference) and derives everything reported from them: the ratios
``nu_<target>`` (NaN below ``min_count`` active tokens), the ft/base-SAE firing shift, and the
per-latent DataFrame the latent table and the report read. Kept apart from the streaming pass
so that readers of results (tables, plots, selection) need not import the algorithm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from sae_diff.analysis.batches import DATASET_MASK_PREFIX

MODELS = ("base", "ft")
#: Below this many active tokens a latent's ratios (ν) are reported as NaN (missing).
DEFAULT_MIN_COUNT = 50

__all__ = ["DEFAULT_MIN_COUNT", "MODELS", "LatentScalingResult"]


@dataclass
class LatentScalingResult:
    """Betas, ratios and firing statistics of a set of latents from one pass.

    All per-latent tensors are aligned with ``latents``. ``betas`` keys are
    ``beta_{recon,error,act}_{base,ft}``. Statistics: ``count_active`` (tokens with f != 0),
    ``sum_act``, ``sum_sq_act`` (C of METHODS.md §3), ``max_act``; per named mask (and
    ``dataset=<name>``) the number of tokens in the mask and of active tokens inside it;
    for ft/base-SAEs with ``firing_shift``, the count and sum of activations when the SAE
    reads the *other* model's activations.
    """

    kind: str
    latents: torch.Tensor
    n_tokens: int
    min_count: int
    count_active: torch.Tensor
    sum_act: torch.Tensor
    sum_sq_act: torch.Tensor
    max_act: torch.Tensor
    betas: dict[str, torch.Tensor] = field(default_factory=dict)
    mask_tokens: dict[str, int] = field(default_factory=dict)
    mask_counts: dict[str, torch.Tensor] = field(default_factory=dict)
    other_count: torch.Tensor | None = None
    other_sum: torch.Tensor | None = None

    @property
    def reliable(self) -> torch.Tensor:
        """Latents active on at least ``min_count`` tokens (ratios are reported for these only)."""
        return self.count_active >= self.min_count

    def ratios(self) -> dict[str, torch.Tensor]:
        """``nu_<target> = beta_<target>_base / beta_<target>_ft``; NaN below ``min_count``."""
        out: dict[str, torch.Tensor] = {}
        for short in ("error", "recon", "act"):
            b, c = self.betas.get(f"beta_{short}_base"), self.betas.get(f"beta_{short}_ft")
            if b is None or c is None:
                continue
            nu = b / c
            out[f"nu_{short}"] = torch.where(self.reliable, nu, torch.full_like(nu, math.nan))
        return out

    def firing_shift(self) -> dict[str, torch.Tensor]:
        """ft/base-SAE diffing: how much more a latent fires on the fine-tune's activations.

        ``freq_on_{base,ft}`` and ``mean_act_on_{base,ft}`` (mean over all tokens), and the
        ratios ``freq_ratio`` / ``mean_act_ratio`` (ft over base; inf when it never fires on
        base). Ratios are NaN when the latent is active on fewer than ``min_count`` tokens on
        both models.
        """
        if self.other_count is None or self.other_sum is None:
            return {}
        own, other = ("ft", "base") if self.kind == "ft_sae" else ("base", "ft")
        n = float(self.n_tokens)
        counts = {own: self.count_active.double(), other: self.other_count.double()}
        sums = {own: self.sum_act, other: self.other_sum}
        enough = torch.maximum(counts["base"], counts["ft"]) >= self.min_count
        out = {}
        for m in MODELS:
            out[f"freq_on_{m}"] = counts[m] / n
            out[f"mean_act_on_{m}"] = sums[m] / n
        nan = torch.full_like(out["freq_on_ft"], math.nan)
        out["freq_ratio"] = torch.where(enough, counts["ft"] / counts["base"], nan)
        out["mean_act_ratio"] = torch.where(enough, sums["ft"] / sums["base"], nan)
        return out

    def to_frame(self) -> pd.DataFrame:
        """One row per latent (index ``latent``): statistics, betas, ratios, firing shift."""
        n = float(self.n_tokens)
        count = self.count_active.double()
        cols: dict[str, Any] = {
            "count_active": self.count_active.cpu().numpy(),
            "freq": (count / n).cpu().numpy(),
            "max_act": self.max_act.cpu().numpy(),
            "mean_act": torch.where(
                count > 0, self.sum_act / count.clamp(min=1), torch.full_like(count, math.nan)
            )
            .cpu()
            .numpy(),
        }
        for name, tokens in self.mask_tokens.items():
            inside = self.mask_counts[name].double()
            cols[f"freq[{name}]"] = (inside / tokens if tokens else inside * math.nan).cpu().numpy()
            if not name.startswith(DATASET_MASK_PREFIX):
                share = torch.where(
                    count > 0, inside / count.clamp(min=1), torch.full_like(count, math.nan)
                )
                cols[f"share[{name}]"] = share.cpu().numpy()
        for key, val in {**self.betas, **self.ratios(), **self.firing_shift()}.items():
            cols[key] = val.cpu().numpy()
        df = pd.DataFrame(cols, index=pd.Index(self.latents.cpu().numpy(), name="latent"))
        df.attrs.update({"kind": self.kind, "n_tokens": self.n_tokens, "min_count": self.min_count})
        return df
