"""Training runner for a model pair on SAELens's ``SAETrainer``.

:class:`PairedSAETrainingRunner` is the pair version of SAELens's
``LanguageModelSAETrainingRunner``: it loads the pair, builds the data provider, prepares the
dictionary (per-model norm factors and decoder-bias init for crosscoders), and trains with
:class:`ResumableSAETrainer`, a ``SAETrainer`` (same optimiser, LR / coefficient schedules,
dead-latent tracking, wandb logging) whose checkpoints are atomic and carry everything an
exact resume needs:

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
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import Any

import torch
from sae_lens.constants import (
    ACTIVATION_SCALER_CFG_FILENAME,
    RUNNER_CFG_FILENAME,
    SPARSITY_FILENAME,
    TRAINER_STATE_FILENAME,
)
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import save_file
from tqdm.auto import tqdm

from sae_diff.atomic import atomic_dir
from sae_diff.data.store import PairedActivationsStore
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
    check_dataset_column,
    check_pair_matches,
    effective_prepend_bos,
    heldout_data,
    load_pair,
    training_store,
    uses_organism_data,
)
from sae_diff.training.evaluator import PairedEvaluator

EVAL_FILENAME = "eval.json"


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped early (Ctrl-C, SIGTERM or ``stop_after_steps``) after saving a
    checkpoint; ``checkpoint`` is its folder (None when checkpointing is off)."""

    def __init__(self, checkpoint: Path | None, n_steps: int):
        self.checkpoint = checkpoint
        self.n_steps = n_steps
        where = (
            f"; resume with: sae-diff train --resume {checkpoint}"
            if checkpoint
            else " (checkpoint_path is null, so nothing was saved)"
        )
        super().__init__(f"Training interrupted after {n_steps} steps{where}")


# ---------------------------------------------------------------------- trainer
def use_fused_adam(trainer: SAETrainer[Any, Any]) -> None:
    """SAETrainer builds for-loop Adam; swap in the fused kernel (same algorithm) where torch
    supports it, and rebuild the LR schedule on the new optimiser. Call before training."""
    from sae_lens.training.optim import get_lr_scheduler

    from sae_diff.dictionaries.kernels import make_adam

    cfg = trainer.cfg
    trainer.optimizer = make_adam(
        list(trainer.sae.parameters()), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2)
    )
    assert cfg.lr_end is not None
    trainer.lr_scheduler = get_lr_scheduler(
        cfg.lr_scheduler_name,
        lr=cfg.lr,
        optimizer=trainer.optimizer,
        warm_up_steps=cfg.lr_warm_up_steps,
        decay_steps=cfg.lr_decay_steps,
        training_steps=cfg.total_training_steps,
        lr_end=cfg.lr_end,
        num_cycles=cfg.n_restart_cycles,
    )


class ResumableSAETrainer(SAETrainer[Any, Any]):
    """``SAETrainer`` with atomic, exactly-resumable checkpoints and graceful interruption.

    The training loop is SAELens's own ``fit`` with two per-step hooks overridden (see
    :meth:`fit`): checkpoints are taken *after* the step counter advances, so a checkpoint's
    state is the state at a step boundary and a resumed run replays exactly the remaining steps.
    """

    def __init__(
        self,
        *args: Any,
        provider: PairedActivationsStore,
        runner_cfg: PairedRunnerConfig,
        stop_after_steps: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        use_fused_adam(self)
        self.provider = provider
        self.runner_cfg = runner_cfg
        self.stop_after_steps = stop_after_steps
        self.stop_requested = False
        self.last_checkpoint: Path | None = None
        self.world = distributed.world()
        self.data_parallel = distributed.DataParallel(self)  # refuses unsupported architectures
        if not self.world.is_main:  # one process logs
            self.cfg.logger.log_to_wandb = False

    # --- state -------------------------------------------------------------------------
    def save_extra_state(self, path: Path) -> None:
        torch.save(
            {
                "provider": self.provider.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            path / SAE_DIFF_STATE_FILENAME,
        )

    def load_trainer_state(self, checkpoint_path: Path | str) -> None:
        """SAELens's ``load_trainer_state`` with ``torch.load(weights_only=True)``: optimiser,
        schedulers and counters are plain tensors and numbers, so nothing pickled may run
        (passed explicitly, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot turn it off)."""
        checkpoint_path = Path(checkpoint_path)
        self.activation_scaler.load(checkpoint_path / ACTIVATION_SCALER_CFG_FILENAME)
        state_dict = load_state_file(
            checkpoint_path / TRAINER_STATE_FILENAME, map_location=self.cfg.device
        )
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.lr_scheduler.load_state_dict(state_dict["lr_scheduler"])
        self.n_training_samples = state_dict["n_training_samples"]
        self.n_training_steps = state_dict["n_training_steps"]
        self.act_freq_scores = state_dict["act_freq_scores"]
        self.n_forward_passes_since_fired = state_dict["n_forward_passes_since_fired"]
        self.n_frac_active_samples = state_dict["n_frac_active_samples"]
        self.started_fine_tuning = state_dict["started_fine_tuning"]
        for name, scheduler_state_dict in state_dict["coefficient_schedulers"].items():
            self.coefficient_schedulers[name].load_state_dict(scheduler_state_dict)

    def load_checkpoint(self, checkpoint: Path) -> None:
        """Restore trainer, weights, data position and RNG from ``checkpoint``."""
        self.load_trainer_state(checkpoint)
        self.sae.load_weights_from_checkpoint(checkpoint)
        extra = load_state_file(checkpoint / SAE_DIFF_STATE_FILENAME)
        self.provider.load_state_dict(extra["provider"])
        torch.set_rng_state(extra["torch_rng"])
        if extra.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(extra["cuda_rng"])
        n = self.n_training_samples
        thresholds: list[int] = list(self.checkpoint_thresholds)  # type: ignore[has-type]
        self.checkpoint_thresholds = [t for t in thresholds if t >= n]

    def save_checkpoint(
        self,
        checkpoint_name: str,
        base_path: Path | str | None = None,
        wandb_aliases: list[str] | None = None,
    ) -> None:
        base = base_path if base_path is not None else self.cfg.checkpoint_path
        if base is None:
            return
        if not self.world.is_main:  # rank 0 writes (every rank holds the same state); wait for it
            distributed.barrier()
            self.last_checkpoint = Path(base) / checkpoint_name
            return

        def fill(tmp: Path) -> None:
            weights_path, cfg_path = self.sae.save_model(str(tmp))
            save_file({"sparsity": self.log_feature_sparsity}, tmp / SPARSITY_FILENAME)
            self.save_trainer_state(tmp)
            self.save_extra_state(tmp)
            (tmp / RUNNER_CFG_FILENAME).write_text(
                json.dumps(self.runner_cfg.to_dict(), indent=2, default=str)
            )

        try:
            final = atomic_dir(Path(base) / checkpoint_name, fill)
        finally:
            distributed.barrier()
        self.last_checkpoint = final
        if self.cfg.logger.log_to_wandb:
            from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME

            self.cfg.logger.log(
                self,
                final / SAE_WEIGHTS_FILENAME,
                final / SAE_CFG_FILENAME,
                sparsity_path=final / SPARSITY_FILENAME,
                wandb_aliases=wandb_aliases,
            )

    # --- loop --------------------------------------------------------------------------
    def step(self, batch: torch.Tensor) -> Any:
        """SAELens's step; in a distributed run on this rank's slice of the global batch, with
        the statistics reduced across ranks and the sample count advanced by the global batch."""
        if not self.world.distributed:
            return super().step(batch)
        snapshot = self.data_parallel.before_step()
        out = super().step(batch)
        self.n_training_samples += self.cfg.train_batch_size_samples - batch.shape[0]
        self.data_parallel.after_step(snapshot)
        return out

    def _estimate_normalisation(self) -> None:
        with self.provider.global_batches():  # every rank estimates from the same whole batches
            self._estimate_normalisation_now()

    def _estimate_normalisation_now(self) -> None:
        # As SAELens: statistics restored from a checkpoint are kept.
        norm = self.sae.cfg.normalize_activations
        if norm == "expected_average_only_in" and self.activation_scaler.scaling_factor is None:
            self.activation_scaler.estimate_scaling_factor(
                d_in=self.sae.cfg.d_in,
                data_provider=self.data_provider,
                n_batches_for_norm_estimate=self.cfg.n_batches_for_norm_estimate,
            )
        elif norm == "covariance_whitening" and self.activation_scaler.whitening is None:
            self.activation_scaler.estimate_whitening(
                d_in=self.sae.cfg.d_in,
                data_provider=self.data_provider,
                n_batches_for_norm_estimate=self.cfg.n_batches_for_norm_estimate,
            )

    def fit(self) -> Any:
        """SAELens's ``SAETrainer.fit``, run as is, with two of its per-step hooks overridden:
        :meth:`_checkpoint_if_needed` (a due checkpoint is only noted) and :meth:`_update_pbar`
        (the noted checkpoint is written, and a requested stop taken, there). Relies on the
        order of SAELens 6.x's loop (checked with sae-lens 6.54): per step ``step`` ->
        ``_checkpoint_if_needed`` -> ``n_training_steps += 1`` -> ``_update_pbar``, and on its
        keeping activation statistics already set (estimated here first, over the global
        batches in a distributed run). So a checkpoint is taken *after* the step counter
        advances: its state is the state at a step boundary, and a resumed run replays exactly
        the remaining steps.
        """
        self.sae.to(self.cfg.device)
        self._estimate_normalisation()  # SAELens's fit then keeps these statistics
        self._steps_this_run = 0
        self._checkpoint_due = False
        self.data_parallel.__enter__()
        try:
            return super().fit()
        finally:
            self.data_parallel.__exit__(None, None, None)

    def _checkpoint_if_needed(self) -> None:
        """Called by SAELens's loop *before* the step counter moves: only note a due checkpoint."""
        self._checkpoint_due = bool(
            self.checkpoint_thresholds and self.n_training_samples > self.checkpoint_thresholds[0]
        )

    def _update_pbar(self, step_output: Any, pbar: Any, update_interval: int = 100) -> None:
        """Called by SAELens's loop *after* the step counter moves: progress, then the noted
        checkpoint, then a requested stop (every rank stops at the same step)."""
        if self.world.is_main:
            super()._update_pbar(step_output, pbar, update_interval)
        self._steps_this_run += 1
        if self._checkpoint_due:
            self._checkpoint_due = False
            self.save_checkpoint(checkpoint_name=str(self.n_training_samples))
            self.checkpoint_thresholds.pop(0)
        total = self.cfg.total_training_samples
        stop = self.stop_requested or (
            self.stop_after_steps is not None
            and self._steps_this_run >= self.stop_after_steps
            and self.n_training_samples < total
        )
        if distributed.any_rank(stop):
            self.save_checkpoint(checkpoint_name=str(self.n_training_samples))
            pbar.close()
            raise TrainingInterrupted(
                self.last_checkpoint if self.cfg.checkpoint_path else None, self.n_training_steps
            )


# ---------------------------------------------------------------------- runner
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
        override_pair: Any = None,
        override_sae: TrainingSAE[Any] | None = None,
    ):
        self.cfg = cfg
        self.pair = override_pair
        self.sae: TrainingSAE[Any] | None = override_sae
        self.inference_sae: Any = None
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
        from sae_diff.dictionaries.registry import training_sae

        torch.manual_seed(self.cfg.seed)
        sae = training_sae(self.cfg.sae)
        return sae.to(self.cfg.device)

    def _set_metadata(self, sae: TrainingSAE[Any]) -> None:
        import sae_diff

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
        saving a checkpoint) by raising :class:`TrainingInterrupted`."""
        import wandb

        cfg = self.cfg
        resume = Path(cfg.resume_from_checkpoint) if cfg.resume_from_checkpoint else None
        w = distributed.init(cfg.device)  # joins torchrun's process group; no-op for one process
        if w.distributed:
            distributed.check_batch_size(cfg.train_batch_size_tokens, w.size)
            arch = cfg.sae.architecture()
            if arch in distributed.UNSUPPORTED_ARCHITECTURES:
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
            from sae_diff.dictionaries.normalisation import prepare_crosscoder

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
        with _graceful_interrupts(trainer):
            trained = trainer.fit()
        if cfg.eval_at_end:
            self.inference_sae = (
                trained.to_inference() if hasattr(trained, "to_inference") else None
            )
            target = self.inference_sae if self.inference_sae is not None else trained
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


class _graceful_interrupts:
    """First Ctrl-C / SIGTERM: finish the step, checkpoint, stop. Second: stop at once."""

    def __init__(self, trainer: ResumableSAETrainer):
        self.trainer = trainer
        self.previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self.trainer.stop_requested = True
        for sig, prev in self.previous.items():  # a second signal behaves as usual
            signal.signal(sig, prev)
        tqdm.write(
            "Interrupt received: finishing this step and saving a checkpoint "
            "(interrupt again to stop at once)."
        )

    def __enter__(self) -> _graceful_interrupts:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, prev in self.previous.items():
            signal.signal(sig, prev)


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


__all__ = [
    "EVAL_FILENAME",
    "RESUME_MAY_CHANGE",
    "SAE_DIFF_STATE_FILENAME",
    "check_resume_config",
    "load_state_file",
    "PairedSAETrainingRunner",
    "ResumableSAETrainer",
    "TrainingInterrupted",
    "atomic_dir",
    "find_checkpoint",
    "resume",
    "train",
]
