"""Sharded on-disk activation cache: harvest once, train many times.

Layout of a cache folder::

    manifest.json              what was harvested and every committed shard
    shard_00000.safetensors    rows_per_shard rows of one hook, both models
    shard_00001.safetensors    ...

Each shard holds ``acts`` ``(rows, seq, 2, d)`` (index 0 = base, 1 = ft, in the cache
dtype), ``tokens`` ``(rows, seq)`` (the ONE token tensor both models ran on),
``row_index`` ``(rows,)`` (sequence offsets in the token stream), ``attention_mask`` and
``doc_starts`` ``(rows, seq)``, and ``mask_<name>`` ``(rows, seq)`` for every token mask of
:mod:`sae_diff.pairing.masks` (the high-norm mask is computed over the whole shard).

The manifest records both models (names, revisions), the hook, dtype, tokenizer and
chat-template hashes, the datasets and their slice, the mask settings, per-shard sizes and
sha256 checksums, and running per-model statistics (mean, mean norm, mean squared norm over
the tokens kept by the default masks).

Writing is atomic: a shard is written to ``*.tmp``, fsynced and renamed, then the manifest
is rewritten the same way; a harvest interrupted anywhere resumes after its last committed
shard and produces byte-identical shards. Reading verifies every shard (size on open,
sha256 when loaded) and names the bad file.

Modules: :mod:`~sae_diff.data.cache_format` (names, errors, shard descriptions, statistics,
the one shard and manifest encoding), :mod:`~sae_diff.data.cache_reader`
(:class:`ActivationCache`), :mod:`~sae_diff.data.cache_identity` (identity checks),
:mod:`~sae_diff.data.cache_manifest` (a manifest made from the shards: rebuild, sharded commit)
and this one (the writer and its durable write); every name stays importable from here.
Fault-injection tests replace this module's ``_atomic_write``, which the writer therefore looks
up here.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from sae_diff.atomic import atomic_write
from sae_diff.data.cache_format import (
    DTYPES,
    FORMAT,
    MANIFEST,
    REQUIRED_TENSORS,
    SHARD_GLOB,
    SHARD_META_KEY,
    VERSION,
    CacheDtypeError,
    CacheError,
    CacheIdentityError,
    CacheWriteError,
    RunningStats,
    _diff_keys,
    _manifest_entry,
    _sha256,
    _shard_name,
    add_high_norm_mask,
    cache_meta,
    dtype_name,
    encode_shard,
    manifest_document,
    read_shard_description,
    shard_block,
    shard_entry,
    shard_statistics,
)
from sae_diff.data.cache_identity import (
    IDENTITY_FIELDS,
    _dataset_identity,
    cache_identity,
    check_config_cache,
    check_identity,
    expected_identity,
)
from sae_diff.data.cache_manifest import rebuild_manifest
from sae_diff.data.cache_reader import ActivationCache
from sae_diff.moved import moved_names
from sae_diff.pairing.masks import MASK_NAMES, MaskConfig, TokenMasks


def _atomic_write(path: Path, data: bytes) -> None:
    """A durable atomic write (:func:`sae_diff.atomic.atomic_write` with ``durable=True``: data
    and directory fsynced, so a committed shard or manifest survives power loss). A module
    function so that fault-injection tests can replace it."""
    atomic_write(path, data, durable=True)


class ActivationCacheWriter:
    """Append rows to a cache folder in atomic shards; resumes an interrupted cache.

    Args:
        out_dir: the cache folder (created).
        meta: what is being harvested (models, hook, dtype, datasets, masks, ...). Resuming
            requires the same meta; a different one raises :class:`CacheError`.
        rows_per_shard: rows (sequences) per shard.
        d_model: activation width.
        dtype: storage dtype of activations.
        mask_config: settings of the recorded masks; also which tokens the statistics use.
        overwrite: delete an existing cache in ``out_dir`` instead of resuming.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        meta: dict[str, Any],
        *,
        rows_per_shard: int,
        d_model: int,
        dtype: str | torch.dtype = "float32",
        mask_config: MaskConfig | None = None,
        overwrite: bool = False,
    ) -> None:
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype_name = dtype_name(dtype)
        self.dtype = DTYPES[self.dtype_name]
        self.rows_per_shard = int(rows_per_shard)
        self.d_model = int(d_model)
        self.mask_config = mask_config or MaskConfig()
        self.meta = cache_meta(meta, self.dtype_name, self.d_model, self.rows_per_shard)
        self.shards: list[dict[str, Any]] = []
        self.stats = RunningStats(2, self.d_model)
        self.resumed_from_rows = 0
        self.complete = False
        manifest = self.dir / MANIFEST
        # temp files are half-written copies of a shard or manifest (never data): safe to drop
        for p in self.dir.glob("*.tmp"):
            if p.name.startswith(("shard_", MANIFEST)):
                p.unlink()
        if overwrite:  # the caller's explicit choice: the only way a cache is replaced
            for p in [*self.dir.glob(SHARD_GLOB), manifest]:
                p.unlink(missing_ok=True)
        elif not manifest.exists() and any(self.dir.glob(SHARD_GLOB)):
            rebuild_manifest(self.dir, expected_meta=self.meta)  # or raises: nothing deleted
        if manifest.exists() and not overwrite:
            old = ActivationCache(self.dir, allow_incomplete=True)  # verifies shard sizes
            diffs = _diff_keys(old.meta, self.meta)
            if diffs:
                raise CacheIdentityError(
                    f"{self.dir} holds a cache harvested with a different configuration "
                    f"({'; '.join(diffs)}). Nothing was changed. Harvest into another folder "
                    "(cache_path / out_dir), restore the settings the cache was made with, or "
                    "replace it explicitly with --overwrite (overwrite=True).",
                    diffs,
                )
            self.shards = [dict(s) for s in old.shards]
            self.stats = RunningStats.from_json(old.manifest["stats"])
            self._adopt_orphans()
            self.resumed_from_rows = sum(s["n_rows"] for s in self.shards)
        self._buf: list[dict[str, torch.Tensor]] = []
        self._buf_rows = 0
        self._rows_submitted = self.rows_done
        self._n_submitted = len(self.shards)
        self._failed = False
        self.bytes_written = 0
        # shards are serialised, hashed and written by one background thread, in order, so
        # disk I/O overlaps the next forward passes; the manifest only ever lists shards that
        # are on disk, with the statistics of exactly those shards
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer")
        self._pending: list[Future[None]] = []

    def _adopt_orphans(self) -> None:
        """Shards on disk that the manifest does not list yet (the harvest stopped between
        renaming a shard and rewriting the manifest) are adopted when their self-description
        continues this cache exactly; any other unlisted shard is refused, never deleted."""
        committed = {s["file"] for s in self.shards}
        orphans = sorted(p for p in self.dir.glob(SHARD_GLOB) if p.name not in committed)
        adopted = False
        for p in orphans:
            idx = len(self.shards)
            try:
                desc = read_shard_description(p)
            except CacheError:
                desc = None
            ok = (
                desc is not None
                and p.name == _shard_name(idx)
                and desc["meta"] == self.meta
                and desc["shard"]["index"] == idx
                and desc["shard"]["first_row"] == self.rows_done
            )
            if not ok or desc is None:
                raise CacheError(
                    f"{p} is not listed in {self.dir / MANIFEST} and does not continue this "
                    f"cache (expected {_shard_name(idx)} starting at row {self.rows_done}). "
                    "Nothing was deleted. Move the file out of the folder if it is not needed, "
                    "or replace the whole cache with --overwrite."
                )
            self.shards.append(_manifest_entry(p, desc))
            self.stats.merge(RunningStats.from_json(desc["stats"]))
            adopted = True
        if adopted:
            self._write_manifest()

    @property
    def rows_done(self) -> int:
        """Rows committed to disk (excludes rows still buffered)."""
        return sum(s["n_rows"] for s in self.shards)

    @property
    def rows_seen(self) -> int:
        """Rows committed or being written, plus rows buffered for the next shard."""
        return self._rows_submitted + self._buf_rows

    def add(
        self,
        tokens: torch.Tensor,
        acts: torch.Tensor,
        masks: TokenMasks | dict[str, torch.Tensor],
        *,
        attention_mask: torch.Tensor,
        doc_starts: torch.Tensor,
        row_index: torch.Tensor,
    ) -> None:
        """Buffer a block of rows; full shards are written as they fill.

        ``acts`` is ``(rows, seq, 2, d)`` computed on ``tokens`` ``(rows, seq)`` by both
        models; its (rows, seq) must equal the tokens' exactly (never truncated).
        """
        if acts.dim() != 4 or acts.shape[2] != 2 or acts.shape[3] != self.d_model:
            raise CacheError(
                f"acts must be (rows, seq, 2, {self.d_model}), got {tuple(acts.shape)}"
            )
        if tuple(acts.shape[:2]) != tuple(tokens.shape):
            raise CacheError(
                f"activations cover {tuple(acts.shape[:2])} (rows, seq) but the tokens are "
                f"{tuple(tokens.shape)}: base and ft must run on exactly these tokens"
            )
        if int(row_index[0]) != self.rows_seen:
            raise CacheError(
                f"rows must arrive in order: expected row {self.rows_seen}, got {int(row_index[0])}"
            )
        block = shard_block(
            tokens,
            acts,
            masks,
            attention_mask=attention_mask,
            doc_starts=doc_starts,
            row_index=row_index,
            dtype=self.dtype,
        )
        self._buf.append(block)
        self._buf_rows += int(tokens.shape[0])
        while self._buf_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _take(self, n: int) -> dict[str, torch.Tensor]:
        cat = {k: torch.cat([b[k] for b in self._buf]) for k in self._buf[0]}
        out = {k: v[:n].contiguous() for k, v in cat.items()}
        rest = {k: v[n:] for k, v in cat.items()}
        self._buf = [rest] if rest["tokens"].shape[0] else []
        self._buf_rows -= n
        return out

    def _flush(self, n: int) -> None:
        shard = add_high_norm_mask(self._take(n), self.mask_config.high_norm_ratio)
        shard_stats = shard_statistics(shard, self.d_model, self.mask_config.high_norm_ratio)
        self.stats.merge(shard_stats)
        index = self._n_submitted
        self._n_submitted += 1
        self._rows_submitted += int(shard["tokens"].shape[0])
        self._raise_failed_writes()
        self._pending.append(
            self._writer.submit(
                self._write_shard, shard, self.stats.to_json(), shard_stats.to_json(), index
            )
        )

    def _write_shard(
        self,
        shard: dict[str, torch.Tensor],
        stats: dict[str, Any],
        shard_stats: dict[str, Any],
        index: int,
    ) -> None:
        if self._failed:  # an earlier write failed: write nothing after it (no gaps on disk)
            return
        try:
            self._write_shard_now(shard, stats, shard_stats, index)
        except BaseException:
            self._failed = True
            raise

    def _write_shard_now(
        self,
        shard: dict[str, torch.Tensor],
        stats: dict[str, Any],
        shard_stats: dict[str, Any],
        index: int,
    ) -> None:
        data = encode_shard(self.meta, shard, index, shard_stats)
        assert index == len(self.shards), "shards are written in order by one thread"
        name = _shard_name(index)
        try:
            _atomic_write(self.dir / name, data)
        except OSError as e:  # disk full, permissions, ...: the committed shards stay valid
            raise CacheWriteError(
                f"writing {self.dir / name} failed ({e}); the cache keeps its {len(self.shards)} "
                "committed shards. Free space (or fix the folder's permissions) and rerun the "
                "same harvest to resume."
            ) from e
        self.shards.append(shard_entry(index, shard, data))
        self.bytes_written += len(data)
        self._write_manifest(stats)

    def _raise_failed_writes(self, wait: bool = False) -> None:
        """Surface a background write error in the harvesting thread (and optionally wait)."""
        still = []
        for f in self._pending:
            if wait or f.done():
                f.result()  # re-raises the writer's exception, if any
            else:
                still.append(f)
        self._pending = still

    def _write_manifest(self, stats: dict[str, Any] | None = None) -> None:
        manifest = manifest_document(
            self.meta,
            self.shards,
            self.stats.to_json() if stats is None else stats,
            complete=self.complete,
        )
        _atomic_write(self.dir / MANIFEST, json.dumps(manifest, indent=1).encode())

    def close(self) -> None:
        """Write the last (partial) shard and mark the cache complete."""
        if self._buf_rows:
            self._flush(self._buf_rows)
        self.wait()
        self.complete = True
        self._write_manifest()

    def wait(self) -> None:
        """Block until every submitted shard is on disk (raises a write error, if any)."""
        self._raise_failed_writes(wait=True)

    def shutdown(self) -> None:
        """Finish queued shard writes and stop the writer thread (safe to call twice)."""
        try:
            for f in self._pending:
                f.exception()  # waits; errors were raised by close()/add() when they could be
        finally:
            self._pending = []
            self._writer.shutdown(wait=True)


# every name of the cache API stays importable from here (the format, reader and identity
# modules are where they are defined)
__all__ = [
    "DTYPES",
    "FORMAT",
    "IDENTITY_FIELDS",
    "MANIFEST",
    "MASK_NAMES",
    "REQUIRED_TENSORS",
    "SHARD_GLOB",
    "SHARD_META_KEY",
    "VERSION",
    "_atomic_write",
    "_dataset_identity",
    "_diff_keys",
    "_manifest_entry",
    "_sha256",
    "_shard_name",
    "dtype_name",
    "ActivationCache",
    "ActivationCacheWriter",
    "CacheError",
    "CacheDtypeError",
    "CacheIdentityError",
    "CacheWriteError",
    "RunningStats",
    "cache_identity",
    "check_config_cache",
    "check_identity",
    "expected_identity",
    "read_shard_description",
    "rebuild_manifest",
]


#: ``harvest_cache`` used to be re-exported here (one release; see sae_diff.moved)
__getattr__ = moved_names(__name__, {"harvest_cache": "sae_diff.data.harvest"})
