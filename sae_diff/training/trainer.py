"""SAELens's ``SAETrainer`` with atomic, exactly-resumable checkpoints and graceful stops.

:class:`ResumableSAETrainer` runs SAELens's own training loop (same optimiser, LR / coefficient
schedules, dead-latent tracking, wandb logging) and overrides only:

- ``_checkpoint_if_needed`` / ``_update_pbar``, the two per-step hooks around SAELens's step
  counter, so that a checkpoint is taken *after* the counter moves;
- ``save_checkpoint`` (atomic folder, rank 0 only, plus the data position and RNG state) and
  ``load_trainer_state`` (``torch.load(weights_only=True)``);
- ``step`` (data-parallel statistics, ``sae_diff.training.data_parallel``) and ``fit`` (the
  activation statistics are estimated first, over the global batches in a distributed run).

SAELens version behaviour relied on (checked with sae-lens 6.54.12; ``tests/test_training.py``
resumes a run and compares it bit for bit with an uninterrupted one, so a change breaks a
test, not a run):

- ``SAETrainer.fit`` calls, per step, ``step`` -> ``_checkpoint_if_needed`` ->
  ``n_training_steps += 1`` -> ``_update_pbar(step_output, pbar)``, and calls
  ``_checkpoint_if_needed`` nowhere else;
- ``fit`` keeps an activation scaler's statistics that are already set (it only estimates
  them when ``scaling_factor`` / ``whitening`` is None);
- ``save_trainer_state`` writes the keys :meth:`ResumableSAETrainer.load_trainer_state`
  reads (optimizer, lr_scheduler, n_training_samples, n_training_steps, act_freq_scores,
  n_forward_passes_since_fired, n_frac_active_samples, started_fine_tuning,
  coefficient_schedulers), and ``checkpoint_thresholds`` is a list of sample counts popped
  from the front.

The checkpoint layout and the runner that drives this trainer are in
:mod:`sae_diff.training.runner`; finding, loading and checking checkpoints in
:mod:`sae_diff.training.checkpoints`.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from sae_lens.constants import (
    ACTIVATION_SCALER_CFG_FILENAME,
    RUNNER_CFG_FILENAME,
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
    TRAINER_STATE_FILENAME,
)
from sae_lens.training.optim import get_lr_scheduler
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import save_file
from tqdm.auto import tqdm

from sae_diff import process_group
from sae_diff.atomic import atomic_dir
from sae_diff.data.store import PairedActivationsStore
from sae_diff.dictionaries.optim import make_adam
from sae_diff.training.checkpoints import SAE_DIFF_STATE_FILENAME, load_state_file
from sae_diff.training.config import PairedRunnerConfig
from sae_diff.training.data_parallel import DataParallel


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
        self.world = process_group.world()
        self.data_parallel = DataParallel(self)  # refuses unsupported architectures
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
            process_group.barrier()
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
            process_group.barrier()
        self.last_checkpoint = final
        if self.cfg.logger.log_to_wandb:
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
        if process_group.any_rank(stop):
            self.save_checkpoint(checkpoint_name=str(self.n_training_samples))
            pbar.close()
            raise TrainingInterrupted(
                self.last_checkpoint if self.cfg.checkpoint_path else None, self.n_training_steps
            )


class graceful_interrupts:
    """First Ctrl-C / SIGTERM: finish the step, checkpoint, stop. Second: stop at once."""

    def __init__(self, trainer: ResumableSAETrainer):
        self.trainer = trainer
        self.previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002
        self.trainer.stop_requested = True
        for sig, prev in self.previous.items():  # a second signal behaves as usual
            signal.signal(sig, prev)
        tqdm.write(
            "Interrupt received: finishing this step and saving a checkpoint "
            "(interrupt again to stop at once)."
        )

    def __enter__(self) -> graceful_interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, prev in self.previous.items():
            signal.signal(sig, prev)


__all__ = [
    "ResumableSAETrainer",
    "TrainingInterrupted",
    "graceful_interrupts",
    "use_fused_adam",
]
