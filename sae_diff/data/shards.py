"""Shards computed by the models: the harvest's token selection without a disk.

A *shard* is ``rows_per_shard`` consecutive token rows in the cache's stored layout
(:mod:`sae_diff.data.cache_format`). :func:`model_shards` computes them with the same forward
batches (restarting at every shard), masks and whole-shard high-norm median as the harvest
writes them, and :func:`shard_keep` is the one rule selecting training tokens from a shard,
so training from a cache and on the fly select the same tokens (``tests/test_pipeline.py``).
The block sources (:class:`CacheBlocks`, :class:`ModelBlocks`, :class:`CallableBlocks`) turn
shards into the kept-token blocks :class:`~sae_diff.data.store.PairedActivationsStore`
shuffles.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator

import torch

from sae_diff.data.cache_format import DTYPES, Shard, add_high_norm_mask, dtype_name, shard_block
from sae_diff.data.cache_reader import ActivationCache
from sae_diff.data.token_batch import RowSource, TokenBatch
from sae_diff.pairing.masks import MaskConfig, TokenMasks, first_n_mask
from sae_diff.pairing.model import PairedModel

#: Rows per shard (cache files, and the groups over which the high-norm median is taken).
DEFAULT_ROWS_PER_SHARD = 256


def shard_keep(shard: Shard, mask_config: MaskConfig | None = None) -> torch.Tensor:
    """``(rows, seq)`` bool: the tokens of a shard that ``mask_config`` keeps.

    The one token-selection rule of training data: the masks recorded in the shard
    (``mask_<name>``), with the first-n mask recomputed from the document starts when
    ``mask_config.first_n > 0`` (the first n positions of each row, as
    :func:`~sae_diff.pairing.masks.compute_masks` defines it; so one cache serves any n)."""
    cfg = mask_config or MaskConfig()
    masks = TokenMasks.from_dict({k[5:]: v for k, v in shard.items() if k.startswith("mask_")})
    if cfg.first_n > 0:
        masks.first_n = first_n_mask(shard["tokens"], cfg.first_n)
    return cfg.keep(masks)


def _shard_batches(batches: Iterator[TokenBatch], rows_per_shard: int) -> Iterator[TokenBatch]:
    """Regroup token batches into shards of ``rows_per_shard`` rows (the last may be short)."""
    pending: list[TokenBatch] = []
    n = 0
    for b in batches:
        pending.append(b)
        n += len(b)
        while n >= rows_per_shard:
            cat = TokenBatch.concat(pending)
            yield cat.select(0, rows_per_shard)
            rest = cat.select(rows_per_shard, len(cat))
            pending, n = ([rest] if len(rest) else []), n - rows_per_shard
    if n:
        yield TokenBatch.concat(pending)


def model_shards(
    paired_model: PairedModel,
    token_source: RowSource,
    hook_name: str,
    *,
    batch_size: int = 8,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    mask_config: MaskConfig | None = None,
    dtype: str | torch.dtype = "float32",
    start_row: int = 0,
    stop_row: int | None = None,
) -> Iterator[Shard]:
    """Shards computed by the models, exactly as ``sae_diff.data.harvest.harvest_cache``
    would write them: rows ``start_row..stop_row`` of ``token_source`` in groups of
    ``rows_per_shard``, forward batches of ``batch_size`` rows that restart at every shard,
    masks per batch, activations cast to the storage ``dtype`` and the high-norm mask taken
    over the whole shard. Nothing is written to disk."""
    for _, shard in indexed_model_shards(
        paired_model,
        token_source,
        hook_name,
        batch_size=batch_size,
        rows_per_shard=rows_per_shard,
        mask_config=mask_config,
        dtype=dtype,
        start_row=start_row,
        stop_row=stop_row,
    ):
        yield shard


@torch.no_grad()
def indexed_model_shards(
    paired_model: PairedModel,
    token_source: RowSource,
    hook_name: str,
    *,
    batch_size: int = 8,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    mask_config: MaskConfig | None = None,
    dtype: str | torch.dtype = "float32",
    start_row: int = 0,
    stop_row: int | None = None,
    want: Callable[[int], bool] | None = None,
) -> Iterator[tuple[int, Shard]]:
    """:func:`model_shards` with each shard's index (0 = the shard starting at ``start_row``),
    computing only the shards ``want(index)`` accepts: the others' tokens are read (cheap)
    but never run through the models. A sharded harvest gives each rank a disjoint ``want``."""
    cfg = mask_config or MaskConfig()
    store_dtype = DTYPES[dtype_name(dtype)]
    chat = bool(getattr(token_source, "is_chat", False))
    tok = paired_model.tokenizer
    for index, rows in enumerate(
        _shard_batches(
            token_source.batches(batch_size, start_row=start_row, stop_row=stop_row), rows_per_shard
        )
    ):
        if want is not None and not want(index):
            continue
        parts: list[Shard] = []
        for i in range(0, len(rows), batch_size):
            b = rows.select(i, min(i + batch_size, len(rows)))
            am = b.attention_mask  # as the harvest: padded rows run with their attention mask
            acts = paired_model.paired_activations(
                b.tokens, [hook_name], attention_mask=None if bool(am.all()) else am
            )[hook_name]
            masks = b.masks(tok, config=cfg, chat=chat)
            part = shard_block(
                b.tokens,
                acts,
                masks,
                attention_mask=am,
                doc_starts=b.doc_starts,
                row_index=b.row_index,
                dtype=store_dtype,
            )
            parts.append(part)
        shard = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        shard = add_high_norm_mask(shard, cfg.high_norm_ratio)
        yield index, shard


# ---------------------------------------------------------------------- kept-token blocks
class CacheBlocks:
    """Kept tokens of a cache's shards; epoch e reads them in the order seeded by ``seed + e``."""

    def __init__(
        self,
        cache: ActivationCache,
        mask_config: MaskConfig | None,
        seed: int,
        shuffle: bool,
        verify: bool,
    ) -> None:
        self.cache, self.mask_config, self.seed, self.shuffle, self.verify = (
            cache,
            mask_config,
            seed,
            shuffle,
            verify,
        )

    def order(self, epoch: int) -> list[int]:
        order = list(range(self.cache.n_shards))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def open(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        for i in self.order(epoch)[start:]:
            shard = self.cache.load_shard(i, verify=self.verify)
            yield shard["acts"][shard_keep(shard, self.mask_config)]


class ModelBlocks:
    """Kept tokens of shards computed on the fly, in stream order (shard ``start`` onwards)."""

    def __init__(
        self, make: Callable[[int], Iterator[Shard]], mask_config: MaskConfig | None
    ) -> None:
        self.make, self.mask_config = make, mask_config

    def open(self, epoch: int, start: int) -> Iterator[torch.Tensor]:  # noqa: ARG002 - same rows each epoch
        for shard in self.make(start):
            yield shard["acts"][shard_keep(shard, self.mask_config)]


class CallableBlocks:
    """User blocks ``blocks(epoch)``; resuming inside an epoch replays its earlier blocks."""

    def __init__(self, blocks: Callable[[int], Iterator[torch.Tensor]]) -> None:
        self.blocks = blocks

    def open(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        return itertools.islice(self.blocks(epoch), start, None)


__all__ = [
    "CacheBlocks",
    "CallableBlocks",
    "ModelBlocks",
    "DEFAULT_ROWS_PER_SHARD",
    "Shard",
    "indexed_model_shards",
    "model_shards",
    "shard_keep",
]
