"""PairedActivationsStore: paired activations as an SAELens data provider.

SAELens's ``SAETrainer`` consumes any ``Iterator[Tensor]`` (``sae_lens.training.types.
DataProvider``); its own ``ActivationsStore`` is one, built around a single model. This
store is the paired equivalent (rather than a subclass, whose constructor needs one model
and one hook): an iterator of training batches in one of four modes

- ``"paired"``: ``(B, 2, d)`` [base, ft] (crosscoders),
- ``"diff"``: ``(B, d)``, ``ft - base`` or ``base - ft`` (``diff_sign``; diff-SAEs),
- ``"base"`` / ``"ft"``: ``(B, d)`` one model (base-SAE / chat-SAE),

with masked tokens dropped (:class:`~sae_diff.pairing.masks.MaskConfig`) and a shuffled
mixing buffer (SAELens's own ``mixing_buffer``). It is built from a
:class:`~sae_diff.pairing.model.PairedModel` and a token source (harvesting on the fly) or
from a disk cache (:class:`~sae_diff.data.cache.ActivationCache`, read in contiguous
blocks). It loops over its data (epochs) unless ``loop=False``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from sae_lens.training.mixing_buffer import mixing_buffer

from sae_diff.data.cache import ActivationCache
from sae_diff.pairing.masks import MaskConfig, compute_masks
from sae_diff.pairing.model import PairedModel

Mode = Literal["paired", "diff", "base", "ft"]
DiffSign = Literal["ft_minus_base", "base_minus_ft"]
MODES = ("paired", "diff", "base", "ft")
DIFF_SIGNS = ("ft_minus_base", "base_minus_ft")


def select_mode(acts: torch.Tensor, mode: str, diff_sign: str = "ft_minus_base") -> torch.Tensor:
    """Map paired ``(..., 2, d)`` activations to the store's mode."""
    if mode == "paired":
        return acts
    if mode == "base":
        return acts[..., 0, :]
    if mode == "ft":
        return acts[..., 1, :]
    if mode == "diff":
        d = acts[..., 1, :] - acts[..., 0, :]
        return d if diff_sign == "ft_minus_base" else -d
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


class PairedActivationsStore(Iterator[torch.Tensor]):
    """Training batches of paired activations; pass it as ``SAETrainer(data_provider=...)``.

    Use :meth:`from_model` or :meth:`from_cache`. Direct construction takes ``blocks``, a
    callable returning a fresh iterator of ``(n_tokens, 2, d)`` kept-token blocks for epoch
    ``e`` (``blocks(e)``).

    Args:
        blocks: the block producer (see above).
        d_model: activation width.
        mode: ``"paired"``, ``"diff"``, ``"base"`` or ``"ft"``.
        diff_sign: ``"ft_minus_base"`` (default) or ``"base_minus_ft"``, for ``mode="diff"``.
        batch_size: tokens per training batch (SAELens's ``train_batch_size_tokens``).
        buffer_size: tokens in the mixing buffer (default 32 x batch_size).
        mix_fraction: share of the buffer kept for mixing with new blocks (SAELens's
            ``activations_mixing_fraction``).
        device, dtype: where and in what dtype batches are served (dtype default: as stored).
        loop: start a new epoch when the data runs out (else ``StopIteration``).
    """

    def __init__(
        self,
        blocks: Callable[[int], Iterator[torch.Tensor]],
        *,
        d_model: int,
        mode: Mode = "paired",
        diff_sign: DiffSign = "ft_minus_base",
        batch_size: int = 4096,
        buffer_size: int | None = None,
        mix_fraction: float = 0.5,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        loop: bool = True,
        info: dict[str, Any] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if diff_sign not in DIFF_SIGNS:
            raise ValueError(f"diff_sign must be one of {DIFF_SIGNS}, got {diff_sign!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.buffer_size = int(buffer_size) if buffer_size is not None else 32 * batch_size
        if self.buffer_size < batch_size:
            raise ValueError(
                f"buffer_size ({self.buffer_size}) must be >= batch_size ({batch_size})"
            )
        if not 0 <= mix_fraction <= 1:
            raise ValueError(f"mix_fraction must be in [0, 1], got {mix_fraction}")
        self._blocks = blocks
        self.d_model = int(d_model)
        self.mode: str = mode
        self.diff_sign: str = diff_sign
        self.batch_size = int(batch_size)
        self.mix_fraction = float(mix_fraction)
        self.device = torch.device(device)
        self.dtype = dtype
        self.loop = loop
        self.info: dict[str, Any] = dict(info or {})
        self.epoch = 0
        self.n_tokens_served = 0
        self._it: Iterator[torch.Tensor] | None = None

    # -- shape information
    @property
    def n_models(self) -> int:
        """2 in paired mode, else 1."""
        return 2 if self.mode == "paired" else 1

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Shape of every batch served."""
        if self.mode == "paired":
            return (self.batch_size, 2, self.d_model)
        return (self.batch_size, self.d_model)

    # -- constructors
    @classmethod
    def from_model(
        cls,
        paired_model: PairedModel,
        token_source: Any,
        hook_name: str,
        *,
        store_batch_size_prompts: int = 8,
        mask_config: MaskConfig | None = None,
        **kwargs: Any,
    ) -> PairedActivationsStore:
        """Harvest on the fly: each source batch goes through both models (one forward
        each), masks are computed and excluded tokens dropped."""
        paired_model.validate_hooks([hook_name])
        cfg = mask_config or MaskConfig()
        chat = bool(getattr(token_source, "is_chat", False)) or cfg.only_assistant

        def blocks(epoch: int) -> Iterator[torch.Tensor]:
            for batch in token_source.batches(store_batch_size_prompts):
                acts = paired_model.paired_activations(batch.tokens, [hook_name])[hook_name]
                masks = compute_masks(
                    batch.tokens,
                    paired_model.tokenizer,
                    acts=acts,
                    attention_mask=batch.attention_mask,
                    doc_starts=batch.doc_starts,
                    config=cfg,
                    chat=chat,
                )
                keep = cfg.keep(masks).to(acts.device)
                yield acts[keep]

        info = {"hook_name": hook_name, "source": "model", "models": paired_model.describe()}
        return cls(blocks, d_model=paired_model.d_model, info=info, **kwargs)

    @classmethod
    def from_cache(
        cls,
        cache: ActivationCache | str | os.PathLike[str],
        *,
        mask_config: MaskConfig | None = None,
        block_rows: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        verify: bool = True,
        **kwargs: Any,
    ) -> PairedActivationsStore:
        """Read a disk cache: shards in a seeded random order per epoch, read whole and
        verified, cut into contiguous blocks, masked, then shuffled in the mixing buffer."""
        if not isinstance(cache, ActivationCache):
            cache = ActivationCache(cache)
        c = cache

        def blocks(epoch: int) -> Iterator[torch.Tensor]:
            return c.iter_blocks(
                mask_config=mask_config,
                shuffle=shuffle,
                seed=seed + epoch,
                block_rows=block_rows,
                verify=verify,
            )

        info = {"hook_name": c.hook_name, "source": str(c.dir), "models": c.meta.get("models")}
        store = cls(blocks, d_model=c.d_model, info=info, **kwargs)
        store.cache = c  # type: ignore[attr-defined]
        return store

    # -- statistics
    def scaling_factors(self) -> torch.Tensor | None:
        """Per-model ``sqrt(d) / E||x||`` from the cache statistics (None without a cache)."""
        cache = getattr(self, "cache", None)
        return None if cache is None else cache.stats.scaling_factors()

    # -- iteration
    def _epochs(self) -> Iterator[torch.Tensor]:
        while True:
            produced = False
            for block in self._blocks(self.epoch):
                if block.shape[0] == 0:
                    continue
                if block.dim() != 3 or block.shape[1:] != (2, self.d_model):
                    raise ValueError(
                        f"blocks must be (n_tokens, 2, {self.d_model}), got {tuple(block.shape)}"
                    )
                produced = True
                yield select_mode(block, self.mode, self.diff_sign)
            if not produced:
                raise ValueError(
                    "the data produced no tokens after masking (empty source or cache, or "
                    "every token excluded by the MaskConfig)"
                )
            self.epoch += 1
            if not self.loop:
                return

    def _batches(self) -> Iterator[torch.Tensor]:
        return mixing_buffer(
            buffer_size=self.buffer_size,
            batch_size=self.batch_size,
            activations_loader=self._epochs(),
            mix_fraction=self.mix_fraction,
        )

    def __iter__(self) -> PairedActivationsStore:
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._it = self._batches()
        batch = next(self._it)
        self.n_tokens_served += int(batch.shape[0])
        return batch.to(self.device, dtype=self.dtype or batch.dtype, non_blocking=True)

    def next_batch(self) -> torch.Tensor:
        """Same as ``next(store)`` (SAELens's ActivationsStore spelling)."""
        return next(self)
