"""Training runner for a model pair on SAELens's ``SAETrainer``.

:class:`PairedSAETrainingRunner` is the pair version of SAELens's
``LanguageModelSAETrainingRunner``: it loads the pair, builds the data provider, prepares the
dictionary (per-model norm factors and decoder-bias init for crosscoders), and trains with
:class:`~sae_diff.training.trainer.ResumableSAETrainer`, a ``SAETrainer`` (same optimiser, LR /
coefficient schedules, dead-latent tracking, wandb logging) whose checkpoints are atomic and
carry everything an exact resume needs:

=========================  ===================================================
``sae_weights.safetensors``  training weights and buffers (norm factors, BatchTopK threshold)
``cfg.json``               the training dictionary's config
``trainer_state.pt``       optimiser, LR scheduler, coefficient schedulers, dead-latent counters
``activation_scaler.json``  SAELens's activation scaler (diff-SAE normalisation)
``sae_diff_state.pt``      data-provider position and the torch RNG state
``runner_cfg.json``        the full run config (``train --resume DIR`` needs nothing else)
=========================  ===================================================

A checkpoint is written into a temporary folder and renamed into place, so a folder named
``<checkpoint_path>/<n_samples>`` is always complete.

Under ``torchrun`` the run is data-parallel (``sae_diff.training.distributed``): each
process trains on its slice of every global batch, gradients and statistics are reduced
across processes, and only rank 0 writes checkpoints and the output (the others wait at a
barrier); a checkpoint resumes with any number of processes. The final output folder (SAELens
layout: ``cfg.json`` + ``sae_weights.safetensors`` of the *inference* dictionary, weights
folded, plus ``sparsity.safetensors``, ``runner_cfg.json`` and ``eval.json``) is written the
same way.

SAELens version behaviour relied on (checked with sae-lens 6.54.12): the SAETrainer hooks the
trainer overrides, and the loop order they rely on, are listed in
:mod:`sae_diff.training.trainer`; this module relies on
``LanguageModelSAERunnerConfig.to_sae_trainer_config``, ``TrainingSAE.save_inference_model``
and ``SAETrainer``'s ``dead_neurons`` / ``log_feature_sparsity`` properties and
``n_training_samples`` / ``n_training_steps`` counters as sae-lens 6.x defines them. ``TrainingInterrupted``, ``ResumableSAETrainer`` and
``use_fused_adam`` live in :mod:`sae_diff.training.trainer` (still importable from here).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import wandb
from sae_lens.constants import RUNNER_CFG_FILENAME, SPARSITY_FILENAME
from sae_lens.saes.sae import SAE, TrainingSAE
from safetensors.torch import save_file

import sae_diff
from sae_diff.atomic import atomic_dir
from sae_diff.data.store import PairedActivationsStore
from sae_diff.dictionaries.normalisation import prepare_crosscoder
from sae_diff.dictionaries.registry import training_sae
from sae_diff.moved import moved_names, to
from sae_diff.pairing.model import PairedModel
from sae_diff.training import distributed
from sae_diff.training.checkpoints import (
    RESUME_MAY_CHANGE,
    SAE_DIFF_STATE_FILENAME,
    check_resume_config,
    find_checkpoint,
    load_state_file,
)
from sae_diff.training.config import PairedRunnerConfig
from sae_diff.training.data import (
    cache_eval_sample,
    cache_exists,
    check_pair_matches,
    heldout_data,
    load_pair,
    training_store,
)
from sae_diff.training.data_parallel import UNSUPPORTED_ARCHITECTURES
from sae_diff.training.evaluator import PairedEvaluator
from sae_diff.training.tokens import (
    check_dataset_column,
    effective_prepend_bos,
    uses_organism_data,
)
from sae_diff.training.trainer import ResumableSAETrainer, graceful_interrupts

EVAL_FILENAME = "eval.json"


class PairedSAETrainingRunner:
    """Train a crosscoder, diff-SAE or one-model SAE on a model pair.

    Args:
        cfg: the run config.
        override_pair: use this ``PairedModel`` instead of loading ``cfg``'s models.
        override_sae: train this training dictionary instead of a fresh one.

    ``run()`` returns the trained *training* dictionary; the inference dictionary is written to
    ``cfg.output_path`` (and returned in memory by ``self.inference_sae``).
    """

    def __init__(
        self,
        cfg: PairedRunnerConfig,
        override_pair: PairedModel | None = None,
        override_sae: TrainingSAE[Any] | None = None,
    ):
        self.cfg = cfg
        self.pair = override_pair
        self.sae: TrainingSAE[Any] | None = override_sae
        # the exported dictionary (a sae_diff crosscoder / diff-SAE inference class: SAELens SAEs)
        self.inference_sae: SAE[Any] | None = None
        self.eval_metrics: dict[str, Any] = {}
        self.trainer: ResumableSAETrainer | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, **overrides: Any) -> PairedSAETrainingRunner:
        """A runner that continues the run saved at ``path`` (a checkpoint or a run's
        checkpoint folder); ``overrides`` replace config fields (e.g. ``device``)."""
        ckpt = find_checkpoint(path)
        cfg_dict = json.loads((ckpt / RUNNER_CFG_FILENAME).read_text())
        cfg_dict.update(overrides)
        cfg_dict["resume_from_checkpoint"] = str(ckpt)
        cfg = PairedRunnerConfig.from_dict(cfg_dict)
        check_resume_config(ckpt, cfg)
        return cls(cfg)

    # --- pieces ------------------------------------------------------------------------
    def _needs_models(self) -> bool:
        return self.cfg.cache_path is None or (
            self.cfg.eval_at_end and self.cfg.eval_loss_recovered
        )

    def _build_sae(self) -> TrainingSAE[Any]:
        torch.manual_seed(self.cfg.seed)
        sae = training_sae(self.cfg.sae)
        return sae.to(self.cfg.device)

    def _set_metadata(self, sae: TrainingSAE[Any]) -> None:
        cfg = self.cfg
        md = sae.cfg.metadata
        md.dataset_path = cfg.dataset_path or (
            "smoke-test random tokens" if cfg.smoke_test_models else None
        )
        if cfg.organism is not None:
            md.organism = cfg.organism
            if uses_organism_data(cfg):
                md.dataset_path = f"organism:{cfg.organism}"
                md.organism_chat_share = cfg.organism_chat_share
        md.hook_name = cfg.hook_name
        md.model_name = cfg.model_name
        md.model_class_name = cfg.model_class_name
        md.hook_head_index = cfg.hook_head_index
        md.context_size = cfg.context_size
        md.seqpos_slice = list(cfg.seqpos_slice)
        md.model_from_pretrained_kwargs = cfg.model_from_pretrained_kwargs
        md.prepend_bos = effective_prepend_bos(cfg, self.pair)
        md.exclude_special_tokens = cfg.exclude_special_tokens
        md.sequence_separator_token = cfg.sequence_separator_token
        md.disable_concat_sequences = cfg.disable_concat_sequences
        # the pair
        md.base_model_name = cfg.base_model_name or (
            self.pair.base_name if self.pair is not None else None
        )
        md.ft_model_name = cfg.model_name
        md.base_model_from_pretrained_kwargs = cfg.base_model_from_pretrained_kwargs
        md.store_mode = cfg.store_mode
        if cfg.store_mode == "diff":
            md.diff_sign = getattr(cfg.sae, "diff_sign", "ft_minus_base")
        md.masks = {
            "bos": cfg.mask_bos,
            "first_n": cfg.mask_first_n,
            "high_norm": cfg.mask_high_norm,
        }
        md.sae_diff_version = sae_diff.__version__
        if self.pair is not None:
            try:
                md.pair = self.pair.describe()
            except Exception:  # describe() is informational only
                md.pair = None

    def _build_provider(self) -> tuple[PairedActivationsStore, PairedEvaluator]:
        """Training provider and held-out evaluator (see ``sae_diff.training.data``).

        The provider is the one ``PairedActivationsStore``: from ``cache_path`` (harvested
        first when missing), else on the fly from the models. The evaluator reads the rows
        after the training rows (through the same shards and masks); with a cache and no
        models, a sample of the cache read in another order (not held out).
        """
        cfg = self.cfg
        store = training_store(cfg, self.pair)
        if self.pair is not None:
            eval_acts, eval_toks, eval_keep = heldout_data(cfg, self.pair)
            evaluator = PairedEvaluator(
                cfg,
                eval_acts,
                pair=self.pair,
                eval_tokens=eval_toks,
                eval_keep=eval_keep,
                batch_size=cfg.train_batch_size_tokens,
            )
        else:
            n_eval = max(cfg.n_eval_batches, 1) * (
                cfg.eval_batch_size_prompts or cfg.store_batch_size_prompts
            )
            evaluator = PairedEvaluator(
                cfg,
                cache_eval_sample(cfg, n_eval * cfg.context_size),
                batch_size=cfg.train_batch_size_tokens,
            )
        return store, evaluator

    # --- run ---------------------------------------------------------------------------
    def run(self, stop_after_steps: int | None = None) -> TrainingSAE[Any]:
        """Train (or continue ``cfg.resume_from_checkpoint``); write the output; return the
        training dictionary. ``stop_after_steps`` interrupts after that many steps (after
        saving a checkpoint) by raising :class:`~sae_diff.training.trainer.TrainingInterrupted`."""
        cfg = self.cfg
        resume = Path(cfg.resume_from_checkpoint) if cfg.resume_from_checkpoint else None
        w = distributed.init(cfg.device)  # joins torchrun's process group; no-op for one process
        if w.distributed:
            distributed.check_batch_size(cfg.train_batch_size_tokens, w.size)
            arch = cfg.sae.architecture()
            if arch in UNSUPPORTED_ARCHITECTURES:
                raise distributed.DistributedError(
                    f"architecture {arch!r} selects its top-k inside SAELens, per process; run it with one "
                    "process, or use batchtopk_crosscoder / topk / jumprelu for a distributed run."
                )
            cfg.device = distributed.local_device(cfg.device)
            if cfg.llm_device:
                cfg.llm_device = distributed.local_device(cfg.llm_device)
        check_dataset_column(cfg)  # before any model is loaded
        torch.manual_seed(cfg.seed)
        if self.pair is None and (self._needs_models() or not cache_exists(cfg)):
            self.pair = load_pair(cfg)
        if self.pair is not None:
            check_pair_matches(cfg, self.pair)
        provider, evaluator = self._build_provider()
        provider.set_world(w.rank, w.size)
        sae = self.sae if self.sae is not None else self._build_sae()
        self.sae = sae
        self._set_metadata(sae)
        if resume is None and cfg.is_crosscoder:
            with provider.global_batches():  # every rank: the same whole batches as one process
                prepare_crosscoder(sae, provider, n_batches=cfg.n_norm_batches)
        if cfg.logger.log_to_wandb and w.is_main:
            wandb.init(
                project=cfg.logger.wandb_project,
                entity=cfg.logger.wandb_entity,
                config=cfg.to_dict(),
                name=cfg.logger.run_name,
                id=cfg.logger.wandb_id,
                resume="allow" if resume else None,
            )
        trainer = ResumableSAETrainer(
            cfg=cfg.to_sae_trainer_config(),
            sae=sae,
            data_provider=provider,
            evaluator=evaluator,
            provider=provider,
            runner_cfg=cfg,
            stop_after_steps=stop_after_steps,
        )
        self.trainer = trainer
        if resume is not None:
            trainer.load_checkpoint(resume)
        with graceful_interrupts(trainer):
            trained = trainer.fit()
        if cfg.eval_at_end:
            self.inference_sae = (
                trained.to_inference() if hasattr(trained, "to_inference") else None
            )
            target: SAE[Any] = self.inference_sae if self.inference_sae is not None else trained
            self.eval_metrics = evaluator(target, None, None)
            self.eval_metrics["sparsity/dead_fraction_train"] = float(
                trainer.dead_neurons.float().mean()
            )
            self.eval_metrics["details/n_training_samples"] = trainer.n_training_samples
            self.eval_metrics["details/n_training_steps"] = trainer.n_training_steps
        if cfg.output_path is not None:
            if w.is_main:
                try:
                    self.save_final(trained, Path(cfg.output_path), trainer.log_feature_sparsity)
                finally:
                    distributed.barrier()
            else:
                distributed.barrier()
        if cfg.logger.log_to_wandb and w.is_main:
            if self.eval_metrics:
                wandb.log(self.eval_metrics, step=trainer.n_training_steps)
            wandb.finish()
        return trained

    def save_final(
        self, sae: TrainingSAE[Any], output: Path, log_sparsity: torch.Tensor | None
    ) -> Path:
        """Write the inference dictionary (SAELens layout) and run files to ``output`` atomically."""

        def fill(tmp: Path) -> None:
            sae.save_inference_model(str(tmp))
            if log_sparsity is not None:
                save_file({"sparsity": log_sparsity.contiguous()}, tmp / SPARSITY_FILENAME)
            (tmp / RUNNER_CFG_FILENAME).write_text(
                json.dumps(self.cfg.to_dict(), indent=2, default=str)
            )
            if self.eval_metrics:
                clean = {
                    k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                    for k, v in self.eval_metrics.items()
                }
                (tmp / EVAL_FILENAME).write_text(json.dumps(clean, indent=2))

        return atomic_dir(output, fill)


def train(cfg: PairedRunnerConfig, **kwargs: Any) -> PairedSAETrainingRunner:
    """Train ``cfg``; returns the finished runner (``.sae``, ``.inference_sae``, ``.eval_metrics``)."""
    runner = PairedSAETrainingRunner(cfg, **kwargs)
    runner.run()
    return runner


def resume(path: str | Path, **overrides: Any) -> PairedSAETrainingRunner:
    """Continue the run checkpointed at ``path``; returns the finished runner."""
    runner = PairedSAETrainingRunner.from_checkpoint(path, **overrides)
    runner.run()
    return runner


#: name -> module it moved to (one release; see sae_diff.moved)
__getattr__ = moved_names(
    __name__, to("sae_diff.training.trainer", ("TrainingInterrupted", "use_fused_adam"))
)


__all__ = [
    "EVAL_FILENAME",
    "RESUME_MAY_CHANGE",
    "SAE_DIFF_STATE_FILENAME",
    "check_resume_config",
    "load_state_file",
    "PairedSAETrainingRunner",
    "ResumableSAETrainer",
    "atomic_dir",
    "find_checkpoint",
    "resume",
    "train",
]
