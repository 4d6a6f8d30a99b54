"""Data-parallel training of a SAELens ``SAETrainer`` across a ``torchrun`` process group.

:class:`DataParallel` is what makes ``ResumableSAETrainer`` (``sae_diff.training.trainer``)
train on W processes exactly what one process trains (``sae_diff.training.distributed``'s
docstring lists what a distributed run does and where it differs): gradient all-reduce before
SAELens's clipping, dead-latent statistics reduced across ranks, and the BatchTopK crosscoder's
selection made global through its selection hook (``sae_diff.training.global_topk``). No
module attribute is replaced: the hooks are per parameter and per dictionary instance, and
removed on exit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from sae_lens.training.sae_trainer import SAETrainer
from torch.utils.hooks import RemovableHandle

from sae_diff.dictionaries.batchtopk_crosscoder import BatchTopKCrosscoderTraining
from sae_diff.process_group import DistributedError, world
from sae_diff.training.global_topk import GlobalBatchTopK

#: parameters smaller than this (elements) are all-reduced together in one flat bucket;
#: larger ones in place, each as soon as backward has produced its gradient
BUCKET_ELEMENTS = 1 << 22

#: architectures whose batch coupling lives inside SAELens (not reducible from here)
UNSUPPORTED_ARCHITECTURES = frozenset({"batchtopk", "batchtopk_diff_sae"})


class DataParallel:
    """Makes a SAELens ``SAETrainer`` train data-parallel across the process group.

    Use as a context manager around ``trainer.fit()`` and call :meth:`after_step` after each
    ``trainer.step`` (``ResumableSAETrainer`` does both). While active:

    - the dictionary's parameters are broadcast from rank 0 once, then every gradient is
      averaged across ranks as soon as backward has accumulated it (post-accumulate-grad
      hooks: large parameters in place, the small ones in one flat bucket when the last
      arrives; the hooks fire in the same order on every rank because every rank runs the
      same graph), i.e. before SAELens's gradient clipping;
    - a BatchTopK crosscoder (``BatchTopKCrosscoderTraining`` and its subclasses) selects
      over the global batch: its selection hook is set to a
      :class:`~sae_diff.training.global_topk.GlobalBatchTopK` (and reset on exit), which also
      feeds the threshold EMA the global batch's smallest kept score.
    """

    def __init__(self, trainer: SAETrainer[Any, Any]) -> None:
        self.trainer = trainer
        self.world = world()
        self.selection: GlobalBatchTopK | None = None
        self._handles: list[RemovableHandle] = []
        arch = trainer.sae.cfg.architecture()
        if self.world.distributed and arch in UNSUPPORTED_ARCHITECTURES:
            raise DistributedError(
                f"architecture {arch!r} selects its top-k inside SAELens, per process, so {self.world.size} "
                "processes would not train what one process trains. Run it with one process, or use "
                "'batchtopk_crosscoder' (its BatchTopK is reduced across processes) or 'topk' / 'jumprelu'."
            )

    # -- setup
    def __enter__(self) -> DataParallel:
        if not self.world.distributed:
            return self
        sae = self.trainer.sae
        with torch.no_grad():
            for t in [*sae.parameters(), *sae.buffers()]:
                dist.broadcast(t.data, src=0)
        W = self.world.size
        params = [p for p in sae.parameters() if p.requires_grad]
        small = [p for p in params if p.numel() < BUCKET_ELEMENTS]
        small_ids = {id(p) for p in small}
        self._pending = 0
        self._n_small = len(small)

        def average(p: torch.Tensor) -> None:
            if p.grad is None:
                return
            if id(p) not in small_ids:  # large: in place, as soon as it is ready
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(W)
                return
            self._pending += 1
            if self._pending == self._n_small:  # the last small gradient: one bucketed call
                self._pending = 0
                grads = [q.grad for q in small]
                if any(g is None for g in grads):
                    raise DistributedError(
                        "a parameter got no gradient this step; its all-reduce cannot run."
                    )
                flat = torch.cat([g.reshape(-1) for g in grads if g is not None])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                flat.div_(W)
                offset = 0
                for g in grads:
                    assert g is not None
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()

        for p in params:
            self._handles.append(p.register_post_accumulate_grad_hook(average))
        if isinstance(sae, BatchTopKCrosscoderTraining):
            self.selection = GlobalBatchTopK(float(sae.cfg.k))
            sae.set_batch_selection(self.selection)
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.selection is not None:
            sae = self.trainer.sae
            assert isinstance(sae, BatchTopKCrosscoderTraining)
            sae.set_batch_selection(None)
            self.selection = None

    # -- per step
    def before_step(self) -> dict[str, Any]:
        """Snapshot what :meth:`after_step` reduces."""
        if self.selection is not None:
            self.selection.new_step()
        return {
            "act_freq_scores": self.trainer.act_freq_scores.clone(),
            "n_forward_passes_since_fired": self.trainer.n_forward_passes_since_fired.clone(),
        }

    def after_step(self, snapshot: dict[str, Any]) -> None:
        """Reduce SAELens's dead-latent statistics of the step across ranks: a latent fired
        if it fired on any rank; firing counts are summed (exact: they are integers)."""
        if not self.world.distributed:
            return
        tr = self.trainer
        if self._pending:
            raise DistributedError(
                f"only {self._pending} of {self._n_small} gradients arrived this step, so they were not "
                "averaged across processes; this dictionary leaves a parameter unused."
            )
        before = snapshot["act_freq_scores"]
        delta = (
            tr.act_freq_scores - before
        )  # this rank's firing counts (integers: the sum is exact)
        dist.all_reduce(delta, op=dist.ReduceOp.SUM)
        tr.act_freq_scores = before + delta
        # SAELens: +1 for every latent, 0 for those that fired (here: on any rank)
        passes = snapshot["n_forward_passes_since_fired"] + 1
        passes[delta > 0] = 0
        tr.n_forward_passes_since_fired = passes


__all__ = ["BUCKET_ELEMENTS", "UNSUPPORTED_ARCHITECTURES", "DataParallel"]
