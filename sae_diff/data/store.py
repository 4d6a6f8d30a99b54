"""PairedActivationsStore: the one data provider for training on a model pair.

SAELens's ``SAETrainer`` consumes any ``Iterator[Tensor]`` (``sae_lens.training.types.
DataProvider``); its own ``ActivationsStore`` is one, built around a single model. This
store is the paired equivalent (rather than a subclass, whose constructor needs one model
and one hook). It serves the training runner (``sae-diff train``), the demo, the README
example and the tutorials, from a disk cache or straight from the models, in one of four
modes

- ``"paired"``: ``(B, 2, d)`` [base, ft] (crosscoders),
- ``"diff"``: ``(B, d)``, ``ft - base`` or ``base - ft`` (``diff_sign``; diff-SAEs),
- ``"base"`` / ``"ft"``: ``(B, d)`` one model (base-SAE / chat-SAE).

**One token selection.** Data comes in *shards*: groups of ``rows_per_shard`` consecutive
token rows, each a dict of tensors in the cache's shard layout (``acts``, ``tokens``,
``attention_mask``, ``doc_starts``, ``mask_<name>``; :mod:`sae_diff.data.cache`). A disk
cache reads its shards; :meth:`PairedActivationsStore.from_model` computes the same shards
with the same forward batches and masks as the harvest
(:func:`~sae_diff.data.shards.model_shards`; the masks come from
:meth:`~sae_diff.data.token_batch.TokenBatch.masks`, the chat masks computed per conversation
before packing), so the high-norm median is taken over the same rows. Both go through
:func:`~sae_diff.data.shards.shard_keep` (the block sources of :mod:`sae_diff.data.shards`),
so a config selects the same tokens whether it trains from a cache or on the fly
(``tests/test_pipeline.py`` compares them token for token).

**Shuffling buffer and exact resume.** Kept tokens are pooled into a *window* of at least
``buffer_size`` tokens (whole shards, plus the remainder carried over from the previous
window), the window is permuted by a generator seeded with ``(seed, window number)`` and
cut into batches; the remainder (fewer than ``batch_size`` tokens) is carried into the next
window. The data order is therefore a function of the seed and the step, and the whole
position is ``(epoch, first shard of the window, window number, batches served from it, the
carried tokens)`` (:meth:`state_dict`). :meth:`load_state_dict` restores it by rebuilding
that one window (one buffer of reads or forward passes), with no replay of earlier batches.

**Precision.** Shards may be stored in bfloat16/float16 (half the disk and buffer memory).
Batches are upcast to float32 *before* the mode is applied (the conversion is exact, and
``ft - base`` is computed in float32), unless another ``dtype`` is asked for.

Why this is one module (~440 lines): it is one class whose shuffling window, carried
remainder, rank slice and :meth:`~PairedActivationsStore.state_dict` position are one state
machine; the shard computation and block sources it reads live in :mod:`sae_diff.data.shards`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from sae_diff.data.cache_reader import ActivationCache
from sae_diff.data.shards import (
    DEFAULT_ROWS_PER_SHARD,
    CacheBlocks,
    CallableBlocks,
    ModelBlocks,
    Shard,
    model_shards,
    shard_keep,
)
from sae_diff.data.token_batch import RowSource
from sae_diff.dictionaries.specs import DIFF_SIGNS, STORE_MODES, DiffSign, StoreMode
from sae_diff.moved import moved_names, to
from sae_diff.pairing.masks import MaskConfig
from sae_diff.pairing.model import PairedModel

# the vocabulary (store modes, diff signs) is defined once, in sae_diff.dictionaries.specs
Mode = StoreMode
MODES = STORE_MODES


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

    Use :meth:`from_cache` or :meth:`from_model`. Direct construction takes ``blocks``, a
    callable returning a fresh iterator of ``(n_tokens, 2, d)`` kept-token blocks for epoch
    ``e`` (``blocks(e)``).

    Args:
        blocks: the block producer (see above).
        d_model: activation width.
        mode: ``"paired"``, ``"diff"``, ``"base"`` or ``"ft"``.
        diff_sign: ``"ft_minus_base"`` (default) or ``"base_minus_ft"``, for ``mode="diff"``.
        batch_size: tokens per training batch (SAELens's ``train_batch_size_tokens``).
        buffer_size: least number of tokens shuffled together (default 32 x batch_size;
            a window holds whole shards, so it may hold more).
        seed: seeds the window permutations (and a cache's shard order).
        device: where batches are served.
        dtype: dtype of the served batches (default: as stored, half precision upcast to
            float32).
        loop: start a new epoch when the data runs out (else ``StopIteration``; the last
            fewer-than-a-batch tokens are not served).
        rank, world_size: data-parallel slicing. ``batch_size`` stays the *global* batch:
            every rank walks the same global batch sequence (so the order, and
            :meth:`state_dict`, depend on the seed and the global step only, never on the
            number of processes) and serves rows ``rank * b .. (rank + 1) * b`` of each,
            ``b = batch_size / world_size``: disjoint slices that together are the global
            batch. Each rank reads every shard of the data (the window permutation mixes
            them), so reads scale with the number of ranks, not the forward/backward work.
    """

    def __init__(
        self,
        blocks: Callable[[int], Iterator[torch.Tensor]] | Any,
        *,
        d_model: int,
        mode: Mode = "paired",
        diff_sign: DiffSign = "ft_minus_base",
        batch_size: int = 4096,
        buffer_size: int | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        loop: bool = True,
        info: dict[str, Any] | None = None,
        rank: int = 0,
        world_size: int = 1,
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
        self.batch_size = int(batch_size)
        self.set_world(rank, world_size)
        self._sliced = True
        self._source = blocks if hasattr(blocks, "open") else CallableBlocks(blocks)
        self.d_model = int(d_model)
        self.mode: str = mode
        self.diff_sign: str = diff_sign
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.dtype = dtype
        self.loop = loop
        self.info: dict[str, Any] = dict(info or {})
        # position (see state_dict)
        self.epoch = 0
        self.pos = 0
        self.window = 0
        self.served = 0
        self.epoch_tokens = 0
        self.carry = torch.empty(0, 2, self.d_model)
        self.n_batches = 0
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
        token_source: RowSource,
        hook_name: str,
        *,
        store_batch_size_prompts: int = 8,
        mask_config: MaskConfig | None = None,
        rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
        storage_dtype: str | torch.dtype = "float32",
        start_row: int = 0,
        stop_row: int | None = None,
        **kwargs: Any,
    ) -> PairedActivationsStore:
        """Train on the fly, with no disk cache: rows ``start_row..stop_row`` of
        ``token_source`` go through both models shard by shard (:func:`model_shards`, the
        harvest's batches and masks) and the kept tokens fill the shuffling buffer, held in
        ``storage_dtype``. Each epoch runs the forwards again. ``token_source.batches`` must
        be deterministic (``sae_diff.data.sources`` sources are), which is what makes resume
        exact."""
        paired_model.validate_hooks([hook_name])
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")

        def make(shard_start: int) -> Iterator[Shard]:
            return model_shards(
                paired_model,
                token_source,
                hook_name,
                batch_size=store_batch_size_prompts,
                rows_per_shard=rows_per_shard,
                mask_config=mask_config,
                dtype=storage_dtype,
                start_row=start_row + shard_start * rows_per_shard,
                stop_row=stop_row,
            )

        info = {"hook_name": hook_name, "source": "model", "models": paired_model.describe()}
        return cls(
            ModelBlocks(make, mask_config), d_model=paired_model.d_model, info=info, **kwargs
        )

    @classmethod
    def from_cache(
        cls,
        cache: ActivationCache | str | os.PathLike[str],
        *,
        mask_config: MaskConfig | None = None,
        seed: int = 0,
        shuffle: bool = True,
        verify: bool = True,
        **kwargs: Any,
    ) -> PairedActivationsStore:
        """Read a disk cache: shards in a seeded random order per epoch (``shuffle``), each
        read whole and checksum-verified, masked by :func:`shard_keep`, then shuffled in the
        buffer."""
        if not isinstance(cache, ActivationCache):
            cache = ActivationCache(cache)
        info = {
            "hook_name": cache.hook_name,
            "source": str(cache.dir),
            "models": cache.meta.get("models"),
        }
        store = cls(
            CacheBlocks(cache, mask_config, seed, shuffle, verify),
            d_model=cache.d_model,
            info=info,
            seed=seed,
            **kwargs,
        )
        store.cache = cache  # type: ignore[attr-defined]
        return store

    # -- statistics
    def scaling_factors(self) -> torch.Tensor | None:
        """Per-model ``sqrt(d) / E||x||`` from the cache statistics (None without a cache)."""
        cache = getattr(self, "cache", None)
        return None if cache is None else cache.stats.scaling_factors()

    def kept_blocks(self, epoch: int = 0) -> Iterator[torch.Tensor]:
        """The kept-token blocks ``(n, 2, d)`` of one epoch in read order (one per shard,
        stored dtype, before the buffer); independent of the store's position."""
        return self._source.open(epoch, 0)

    # -- resume
    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch served (plain values and one tensor, so it
        loads with ``torch.load(weights_only=True)``)."""
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "window": self.window,
            "served": self.served,
            "epoch_tokens": self.epoch_tokens,
            "carry": self.carry.clone(),
            "n_batches": self.n_batches,
            "n_tokens_served": self.n_tokens_served,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (a fresh store, built like the saved one)."""
        if self.n_batches or self._it is not None:
            raise RuntimeError("load_state_dict needs a fresh store (no batch drawn yet).")
        for key in ("seed", "batch_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"the saved data position was made with {key}={state[key]}, this store has "
                    f"{key}={getattr(self, key)}: build the store with the run's {key} to resume it."
                )
        self.epoch, self.pos, self.window = (
            int(state["epoch"]),
            int(state["pos"]),
            int(state["window"]),
        )
        self.served, self.epoch_tokens = int(state["served"]), int(state["epoch_tokens"])
        self.carry = state["carry"].clone()
        self.n_batches, self.n_tokens_served = (
            int(state["n_batches"]),
            int(state["n_tokens_served"]),
        )

    # -- iteration
    def _permutation(self, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.window) % (2**63))
        return torch.randperm(n, generator=g)

    def _check(self, block: torch.Tensor) -> None:
        if block.dim() != 3 or block.shape[1:] != (2, self.d_model):
            raise ValueError(
                f"blocks must be (n_tokens, 2, {self.d_model}), got {tuple(block.shape)}"
            )

    def _batches(self) -> Iterator[torch.Tensor]:
        bs = self.batch_size
        it: Iterator[torch.Tensor] | None = None
        while True:
            if it is None:
                it = self._source.open(self.epoch, self.pos)
            pool = [self.carry] if self.carry.shape[0] else []
            n, taken, new_tokens, exhausted = self.carry.shape[0], 0, 0, False
            while n < self.buffer_size:
                block = next(it, None)
                if block is None:
                    exhausted = True
                    break
                taken += 1
                if block.shape[0] == 0:
                    continue
                self._check(block)
                if pool and block.dtype != pool[0].dtype:
                    block = block.to(pool[0].dtype)
                pool.append(block)
                n += block.shape[0]
                new_tokens += block.shape[0]
            buf = torch.cat(pool) if pool else self.carry
            n_full = n // bs
            if n_full:
                perm = self._permutation(n)
                while self.served < n_full:
                    i = self.served
                    self.served += 1
                    rows = perm[i * bs : (i + 1) * bs]
                    if self.world_size > 1 and self._sliced:  # gather only this rank's rows
                        b = bs // self.world_size
                        rows = rows[self.rank * b : (self.rank + 1) * b]
                    yield buf[rows]
                # window done: the remainder (in permuted order) moves on
                self.carry = buf[perm[n_full * bs :]].clone()
            else:
                self.carry = buf.clone()
            self.window += 1
            self.pos += taken
            self.served = 0
            self.epoch_tokens += new_tokens
            if exhausted:
                if self.epoch_tokens == 0:
                    raise ValueError(
                        "the data produced no tokens after masking (empty source or cache, or "
                        "every token excluded by the MaskConfig)"
                    )
                self.epoch += 1
                self.pos = 0
                self.epoch_tokens = 0
                it = None
                if not self.loop:
                    return

    def __iter__(self) -> PairedActivationsStore:
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._it = self._batches()
        raw = next(self._it)  # this rank's rows of the global batch (all of them unless sliced)
        self.n_batches += 1
        self.n_tokens_served += self.batch_size
        dtype = self.dtype or (
            torch.float32 if raw.dtype in (torch.bfloat16, torch.float16) else raw.dtype
        )
        return select_mode(raw.to(self.device, dtype=dtype), self.mode, self.diff_sign)

    def set_world(self, rank: int, world_size: int) -> None:
        """Serve rank ``rank``'s slice of every global batch (see the class docstring); the
        data order and the position do not change."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}"
            )
        if self.batch_size % world_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) is the global batch and must be divisible by the number of "
                f"processes ({world_size}): each rank serves batch_size / {world_size} rows of every batch."
            )
        self.rank, self.world_size = int(rank), int(world_size)

    @contextlib.contextmanager
    def global_batches(self) -> Iterator[None]:
        """Serve whole global batches on every rank for the duration (statistics estimated
        from batches, e.g. normalisation factors, then agree across ranks and with one
        process; the position advances as usual)."""
        old, self._sliced = self._sliced, False
        try:
            yield
        finally:
            self._sliced = old

    @property
    def local_batch_size(self) -> int:
        """Rows of each batch this rank serves (``batch_size / world_size``)."""
        return self.batch_size // self.world_size

    def next_batch(self) -> torch.Tensor:
        """Same as ``next(store)`` (SAELens's ActivationsStore spelling)."""
        return next(self)


__all__ = [
    "DEFAULT_ROWS_PER_SHARD",
    "MODES",
    "Mode",
    "PairedActivationsStore",
    "Shard",
    "model_shards",
    "select_mode",
    "shard_keep",
]

#: the shard computation moved to sae_diff.data.shards (one release; see sae_diff.moved)
__getattr__ = moved_names(
    __name__, to("sae_diff.data.shards", ["indexed_model_shards", "_shard_batches"])
)
