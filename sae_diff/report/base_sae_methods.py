"""The base-SAE methods of the study: stage-wise diffing and the causal filter on one seed.

Both start from one base-SAE per seed (SAELens ``batchtopk`` on the base model's activations)
instead of a dictionary of their own, and hand back ranked candidate latents that are scored
like every other method's (see :func:`base_sae_methods`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sae_diff.analysis import causal_filter as cf
from sae_diff.analysis.batches import cache_batches
from sae_diff.analysis.latent_scaling import latent_scaling
from sae_diff.analysis.stages import Stage, run_stages
from sae_diff.atomic import atomic_write
from sae_diff.data.cache_reader import ActivationCache
from sae_diff.data.store import PairedActivationsStore
from sae_diff.dictionaries.io import as_inference
from sae_diff.dictionaries.protocol import PairedDictionary
from sae_diff.organisms.organism import Organism
from sae_diff.pairing.model import PairedModel
from sae_diff.report.config import DemoConfig
from sae_diff.report.scoreboard import fve_per_model, rounded
from sae_diff.report.training import train_base_sae, trainer_config


def base_sae_methods(
    cfg: DemoConfig,
    org: Organism,
    paired: PairedModel,
    cache: ActivationCache,
    hook: str,
    d_model: int,
    seed: int,
    folder: Path,
    sample: torch.Tensor,
    c_tokens: torch.Tensor,
    answer: torch.Tensor,
) -> dict[str, tuple[PairedDictionary, torch.Tensor, dict[str, Any]]]:
    """The selected ANALYSIS_METHODS on one seed's base-SAE: per method, the SAE whose codes of
    the fine-tune's activations are scored, its ranked candidate latents and its scoreboard row.

    * ``causal_filter``: the base-SAE's latents ranked by firing shift on the cache (Latent
      Scaling, ``kind="base_sae"``), kept when ablating them (``causal_mode``) moves the
      fine-tune's KL on the chat scoring rows' assistant tokens beyond the ``causal_quantile``
      of as many random active latents. The filter reads no behaviour label. When it keeps
      nothing, the firing-shift ranking itself is scored and the row's ``note`` says so.
    * ``stagewise``: the base-SAE fine-tuned for ``stage_steps`` on the fine-tune's activations
      of the same cache (the model-change stage; the data stages need separate base / ft
      corpora, see ``sae-diff stagewise``); latents ranked by decoder rotation, live ones only.

    ``paired`` is unused (the filter patches ``org.ft``); kept so the signature is unchanged.
    """
    start = train_base_sae(cfg, cache, d_model, hook, seed)
    base = as_inference(start)
    base.cfg.metadata.hook_name = hook
    out: dict[str, tuple[PairedDictionary, torch.Tensor, dict[str, Any]]] = {}

    def row(name: str, sae: PairedDictionary, **extra: Any) -> dict[str, Any]:
        fb, ff = fve_per_model(sae, "base", sample), fve_per_model(sae, "ft", sample)
        with torch.no_grad():  # dead: fires on neither model's side of the sample
            alive = (sae.encode(sample[:, 0]) > 0).any(0) | (sae.encode(sample[:, 1]) > 0).any(0)
        return {
            "method": name,
            "architecture": "batchtopk",
            "d_sae": int(sae.cfg.d_sae),
            "fve_base": rounded(fb["base"]),
            "fve_ft": rounded(ff["ft"]),
            "l0": rounded(ff["l0"]),
            "dead_fraction": rounded(1.0 - alive.float().mean()),
            **extra,
        }

    if "causal_filter" in cfg.methods:
        shift = latent_scaling(
            base, cache_batches(cache), kind="base_sae", progress=False
        ).to_frame()
        res = cf.causal_filter(
            org.ft,
            base,
            c_tokens,
            shift,
            answer,
            n_candidates=cfg.causal_candidates,
            n_random=cfg.causal_random,
            quantile=cfg.causal_quantile,
            hook_name=hook,
            mode=cfg.causal_mode,
            scale=cfg.causal_scale,
            seed=seed,
        )
        atomic_write(folder / "causal_filter" / "causal_filter.csv", lambda p: res.table.to_csv(p))
        if res.kept:
            cand = res.kept
            note = (
                f"kept {len(cand)} of {cfg.causal_candidates} firing-shift candidates ({cfg.causal_mode} KL > "
                f"{res.threshold:.3g} nats, the {cfg.causal_quantile} quantile of {cfg.causal_random} random latents)"
            )
        else:
            cand = cf.rank_by_firing_shift(shift, n=cfg.top_n)
            note = (
                f"the causal filter kept none of {cfg.causal_candidates} candidates ({cfg.causal_mode} KL never "
                f"beat {res.threshold:.3g} nats); scored: the firing-shift ranking alone"
            )
        out["causal_filter"] = (
            base,
            torch.tensor(cand, dtype=torch.long),
            row("causal_filter", base, n_kept=len(res.kept), note=note),
        )
    if "stagewise" in cfg.methods:

        def paired_batches() -> Iterator[torch.Tensor]:
            return iter(
                PairedActivationsStore.from_cache(
                    cache, mode="paired", batch_size=cfg.batch_size, seed=seed
                )
            )

        plan = (Stage("model", model="ft", data="base"),)
        result = run_stages(
            start, {"base": paired_batches}, trainer_config(cfg, cfg.stage_steps), plan
        )
        atomic_write(
            folder / "stagewise" / "rotation_table.csv",
            lambda p: result.table.to_csv(p, index=False),
        )
        top = result.top_rotating(n=cfg.top_n, stage="model")
        moved = as_inference(result.stages["model"])
        rot = 1.0 - result.table["dec_cos"]
        out["stagewise"] = (
            moved,
            torch.tensor([int(j) for j in top.index], dtype=torch.long),
            row(
                "stagewise",
                moved,
                median_dec_rotation=rounded(rot.median()),
                top_dec_rotation=rounded(top["rotation"].iloc[0]) if len(top) else None,
                note=f"model-change stage only ({cfg.stage_steps} steps on the same cache)",
            ),
        )
    return out


__all__ = ["base_sae_methods"]
