"""Training the study's dictionaries: one method's dictionary, and the shared base-SAE.

Every dictionary is trained by SAELens's own ``SAETrainer`` on the harvested cache, at the
study's width and settings; the base-SAE (SAELens ``batchtopk`` on the base model's side) is
what the base-SAE methods (stage-wise diffing, the causal filter) start from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer

from sae_diff.data.cache_reader import ActivationCache
from sae_diff.data.store import PairedActivationsStore
from sae_diff.dictionaries.normalisation import prepare_crosscoder
from sae_diff.dictionaries.registry import training_config, training_sae
from sae_diff.report.config import DemoConfig
from sae_diff.report.methods import CORE_METHODS, METHODS, variant_settings
from sae_diff.training.trainer import use_fused_adam


def train_dictionary(
    cfg: DemoConfig,
    name: str,
    cache: ActivationCache,
    d_model: int,
    meta: dict[str, Any],
    seed: int | None = None,
    path: Path | None = None,
) -> SAE[Any]:
    """Train one method's dictionary on the cache with SAELens's SAETrainer; save; reload.
    ``seed`` (default ``cfg.seed``) seeds the initialisation and the batch order."""
    seed = cfg.seed if seed is None else seed
    spec = METHODS[name]
    d_sae = cfg.expansion * d_model
    store = PairedActivationsStore.from_cache(
        cache, mode=spec["mode"], batch_size=cfg.batch_size, seed=seed
    )
    torch.manual_seed(seed)
    sae: TrainingSAE[Any]
    if spec["architecture"] == "batchtopk":
        sae = BatchTopKTrainingSAE(
            BatchTopKTrainingSAEConfig(
                d_in=d_model, d_sae=d_sae, k=cfg.k, normalize_activations="expected_average_only_in"
            )
        )
    else:
        arch = spec["architecture"]
        kw: dict[str, Any] = (
            {"l1_coefficient": cfg.l1_coefficient}
            if arch in ("crosscoder", "shared_crosscoder")
            else {}
            if arch == "jumprelu_crosscoder"
            else {"k": cfg.k}
        )
        if arch in (
            "batchtopk_crosscoder",
            "shared_batchtopk_crosscoder",
            "dedicated_batchtopk_crosscoder",
        ):
            kw["threshold_ema_decay"] = cfg.threshold_ema_decay
        kw.update(variant_settings(arch, d_sae))
        if spec["architecture"] == "batchtopk_diff_sae":
            kw["normalize_activations"] = "expected_average_only_in"
        sae = training_sae(training_config(spec["architecture"], d_in=d_model, d_sae=d_sae, **kw))
        if spec["mode"] == "paired":
            prepare_crosscoder(sae, store, n_batches=4)
    for key, value in meta.items():
        sae.cfg.metadata[key] = value
    steps = cfg.train_steps if name in CORE_METHODS else cfg.variant_steps
    trainer = SAETrainer(trainer_config(cfg, steps), sae, store)
    use_fused_adam(trainer)
    trainer.fit()
    path = path or cfg.out / "dictionaries" / name
    sae.save_inference_model(path)
    return SAE.load_from_disk(path)


def trainer_config(cfg: DemoConfig, steps: int) -> SAETrainerConfig:
    """The demo's SAELens trainer settings for a run of ``steps`` steps (cosine-annealed lr)."""
    return SAETrainerConfig(
        total_training_samples=steps * cfg.batch_size,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=steps // 20,
        dead_feature_window=max(steps // 5, 50),
        feature_sampling_window=max(steps // 2, 100),
        n_batches_for_norm_estimate=8,
    )


def train_base_sae(
    cfg: DemoConfig, cache: ActivationCache, d_model: int, hook: str, seed: int
) -> BatchTopKTrainingSAE:
    """SAELens's own ``batchtopk`` on the base model's side of the cache (training form).

    No activation normalisation: stage-wise diffing resumes from these weights, and a scaling
    factor folded in at the end of each run would be re-estimated (and re-folded) per stage."""
    store = PairedActivationsStore.from_cache(
        cache, mode="base", batch_size=cfg.batch_size, seed=seed
    )
    torch.manual_seed(seed)
    sae = BatchTopKTrainingSAE(
        BatchTopKTrainingSAEConfig(d_in=d_model, d_sae=cfg.expansion * d_model, k=cfg.k)
    )
    sae.cfg.metadata.hook_name = hook
    trainer = SAETrainer(trainer_config(cfg, cfg.base_sae_steps), sae, store)
    use_fused_adam(trainer)
    trainer.fit()
    return sae


__all__ = ["train_base_sae", "train_dictionary", "trainer_config"]
