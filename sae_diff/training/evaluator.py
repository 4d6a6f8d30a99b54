"""Paired evaluator: what a run reports about its dictionary, per model.

Metrics (keys of the returned dict, SAELens-style prefixes):

- ``metrics/fve_base``, ``metrics/fve_ft``: fraction of variance explained per model
  (crosscoders); ``metrics/fve_diff`` for diff-SAEs; ``metrics/fve_<model>`` for a one-model SAE.
  FVE = 1 - sum ||x - xhat||^2 / sum ||x - mean(x)||^2 over the held-out tokens.
- ``metrics/l0``: mean number of active latents per token.
- ``sparsity/dead_fraction_eval``: latents that never fire on the held-out tokens.
- ``delta/ft_only``, ``delta/base_only``, ``delta/shared``, ``delta/other``: Δ tag counts
  (crosscoders; METHODS.md §1, in the training space).
- ``model_performance_preservation/loss_recovered_<model>``: the reconstruction spliced into
  model m at the hook (unmasked positions only):
  ``(CE_ablated - CE_spliced) / (CE_ablated - CE_clean)``. The ablation zeroes the hook for a
  crosscoder / one-model SAE, and replaces it with the *other* model's activation for a
  diff-SAE (so the diff-SAE's reconstruction ``x_other ± SAE(diff)`` is scored against the
  stitched baseline of METHODS.md §4). Also ``ce_clean_<m>``, ``ce_spliced_<m>``, ``ce_ablated_<m>``.

The evaluator matches SAELens's ``Evaluator`` signature ``(sae, data_provider,
activation_scaler) -> dict`` so ``SAETrainer`` can call it during training (with wandb); the
runner also calls it once at the end on the exported inference dictionary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes.sae import SAE
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.types import DataProvider
from transformer_lens.hook_points import HookPoint

from sae_diff.data.store import select_mode
from sae_diff.dictionaries.geometry import relative_norm, tag_counts
from sae_diff.pairing.model import PairedModel
from sae_diff.training.config import PairedRunnerConfig


def fraction_of_variance_explained(x: torch.Tensor, xhat: torch.Tensor) -> float:
    """1 - ||x - xhat||² / ||x - mean(x)||² over all tokens (in float64)."""
    x, xhat = x.double(), xhat.double()
    resid = (x - xhat).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum().clamp_min(1e-30)
    return float(1 - resid / total)


@dataclass
class PairedEvaluator:
    """Evaluate a (training or inference) dictionary on held-out paired activations.

    Args:
        cfg: the run's config (store mode, hook, diff sign).
        eval_acts: held-out masked paired activations ``(N, 2, d)``, raw (unscaled).
        pair: the ``PairedModel`` (needed for the loss recovered; None skips it).
        eval_tokens: ``(n_seqs, ctx)`` tokens for the loss recovered.
        eval_keep: their keep-mask ``(n_seqs, ctx)`` (spliced positions).
        batch_size: tokens per encode batch.
    """

    cfg: PairedRunnerConfig
    eval_acts: torch.Tensor
    pair: PairedModel | None = None
    eval_tokens: torch.Tensor | None = None
    eval_keep: torch.Tensor | None = None
    batch_size: int = 4096

    @property
    def mode(self) -> str:
        return self.cfg.store_mode

    @property
    def diff_sign(self) -> str:
        return str(getattr(self.cfg.sae, "diff_sign", "ft_minus_base"))

    # ------------------------------------------------------------------ reconstruction
    def _reconstruct(
        self, sae: SAE[Any], paired: torch.Tensor, scaler: ActivationScaler | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input in the store mode, reconstruction of it, codes), raw space."""
        dev = next(sae.parameters()).device
        dtype = next(sae.parameters()).dtype
        x = select_mode(paired, self.mode, self.diff_sign).to(dev, dtype)
        if self.mode == "paired":
            f = sae.encode(x)
            return x, sae.decode(f), f
        xs = scaler.scale(x) if scaler is not None else x
        f = sae.encode(xs)
        rec = sae.decode(f)
        return x, (scaler.unscale(rec) if scaler is not None else rec), f

    @torch.no_grad()
    def __call__(
        self,
        sae: SAE[Any],
        data_provider: DataProvider | None = None,  # noqa: ARG002 - SAELens's Evaluator signature
        activation_scaler: ActivationScaler | None = None,
    ) -> dict[str, Any]:
        was_training = sae.training
        sae.eval()
        try:
            out = self._activation_metrics(sae, activation_scaler)
            if (
                self.pair is not None
                and self.eval_tokens is not None
                and self.cfg.eval_loss_recovered
            ):
                out.update(self._loss_recovered(sae, activation_scaler))
        finally:
            sae.train(was_training)
        return out

    def _activation_metrics(self, sae: SAE[Any], scaler: ActivationScaler | None) -> dict[str, Any]:
        xs, recs, fired, l0s = [], [], None, []
        for chunk in self.eval_acts.split(self.batch_size):
            x, rec, f = self._reconstruct(sae, chunk, scaler)
            xs.append(x.float().cpu())
            recs.append(rec.float().cpu())
            active = f > 0
            l0s.append(active.float().sum(-1).cpu())
            any_ = active.any(0).cpu()
            fired = any_ if fired is None else fired | any_
        x, rec = torch.cat(xs), torch.cat(recs)
        out: dict[str, Any] = {
            "metrics/l0": float(torch.cat(l0s).mean()),
            "sparsity/dead_fraction_eval": float((~fired).float().mean())
            if fired is not None
            else float("nan"),
            "metrics/n_eval_tokens": int(x.shape[0]),
        }
        if self.mode == "paired":
            out["metrics/fve_base"] = fraction_of_variance_explained(x[:, 0], rec[:, 0])
            out["metrics/fve_ft"] = fraction_of_variance_explained(x[:, 1], rec[:, 1])
            for tag, n in tag_counts(relative_norm(sae)).items():
                out[f"delta/{tag}"] = n
        else:
            out[f"metrics/fve_{self.mode}"] = fraction_of_variance_explained(x, rec)
        return out

    # ------------------------------------------------------------------ splicing
    def _spliced_models(self) -> list[str]:
        return ["base", "ft"] if self.mode in ("paired", "diff") else [self.mode]

    def _loss_recovered(self, sae: SAE[Any], scaler: ActivationScaler | None) -> dict[str, Any]:
        assert self.eval_tokens is not None and self.pair is not None
        keep_all = (
            self.eval_keep
            if self.eval_keep is not None
            else torch.ones_like(self.eval_tokens, dtype=torch.bool)
        )
        hook = self.cfg.hook_name
        sums: dict[str, dict[str, float]] = {
            m: {"clean": 0.0, "spliced": 0.0, "ablated": 0.0} for m in self._spliced_models()
        }
        n = 0
        bs = max(1, self.cfg.eval_batch_size_prompts or self.cfg.store_batch_size_prompts)
        for toks, keep in zip(self.eval_tokens.split(bs), keep_all.split(bs)):
            acts = self.pair.paired_activations(toks, [hook])[hook]  # (b, s, 2, d)
            kept = acts[keep.to(acts.device)]
            if kept.shape[0] == 0:
                continue
            _, rec, _ = self._reconstruct(sae, kept, scaler)
            rec = rec.to(acts.device, acts.dtype)
            for m in sums:
                idx, other = (0, 1) if m == "base" else (1, 0)
                if self.mode == "paired":
                    spliced, ablated = rec[:, idx], torch.zeros_like(rec[:, idx])
                elif self.mode == "diff":
                    # rec reconstructs sign*(ft - base); model m's activation = other ± rec
                    sign = 1.0 if self.diff_sign == "ft_minus_base" else -1.0
                    to_m = sign * rec if m == "ft" else -sign * rec
                    ablated = kept[:, other]
                    spliced = ablated + to_m
                else:
                    spliced, ablated = rec, torch.zeros_like(rec)
                model = self.pair.model(m)
                ce = {
                    k: self._ce(model, toks, hook, keep, v)
                    for k, v in (("clean", None), ("spliced", spliced), ("ablated", ablated))
                }
                for k, v in ce.items():
                    sums[m][k] += v * toks.shape[0]
            n += toks.shape[0]
        out: dict[str, Any] = {}
        for m, totals in sums.items():
            if n == 0:
                continue
            ce_c, ce_s, ce_a = (totals[k] / n for k in ("clean", "spliced", "ablated"))
            gap = ce_a - ce_c
            out[f"model_performance_preservation/ce_clean_{m}"] = ce_c
            out[f"model_performance_preservation/ce_spliced_{m}"] = ce_s
            out[f"model_performance_preservation/ce_ablated_{m}"] = ce_a
            out[f"model_performance_preservation/loss_recovered_{m}"] = (
                (ce_a - ce_s) / gap if abs(gap) > 1e-9 else float("nan")
            )
        return out

    @staticmethod
    def _ce(
        model: Any, toks: torch.Tensor, hook: str, keep: torch.Tensor, values: torch.Tensor | None
    ) -> float:
        dev = next(model.parameters()).device
        toks = toks.to(dev)
        if values is None:
            return float(model(toks, return_type="loss"))
        keep_d = keep.to(dev)
        vals = values.to(dev)

        def splice(act: torch.Tensor, hook: HookPoint) -> torch.Tensor:  # noqa: ARG001
            act = act.clone()
            act[keep_d] = vals.to(act.dtype)
            return act

        return float(model.run_with_hooks(toks, return_type="loss", fwd_hooks=[(hook, splice)]))


__all__ = ["PairedEvaluator"]
