"""The harvest spread over a ``torch.distributed`` process group (under ``torchrun``).

Rank ``r`` computes shards ``r, r + W, r + 2W, ...`` into the one cache folder, each exactly as
the one-process harvest computes it and encoded by the same
:func:`~sae_diff.data.cache_format.encode_shard`; after a barrier rank 0 commits the single
manifest (:func:`~sae_diff.data.cache_manifest.commit_sharded_manifest`). The result is the
one-process cache: the same shard files byte for byte and the same manifest.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from sae_diff.atomic import atomic_write
from sae_diff.data.cache_format import (
    MANIFEST,
    SHARD_GLOB,
    CacheError,
    CacheIdentityError,
    CacheWriteError,
    _diff_keys,
    _manifest_entry,
    _shard_name,
    cache_meta,
    encode_shard,
    read_shard_description,
    shard_entry,
    shard_statistics,
)
from sae_diff.data.cache_manifest import commit_sharded_manifest
from sae_diff.data.cache_reader import ActivationCache
from sae_diff.data.harvest_summary import HarvestSummary, harvest_meta
from sae_diff.data.shards import indexed_model_shards
from sae_diff.data.token_batch import RowSource
from sae_diff.pairing.masks import MaskConfig
from sae_diff.pairing.model import PairedModel
from sae_diff.process_group import barrier, on_main, world


def _shard_done(path: Path, meta: dict[str, Any], index: int) -> bool:
    """Whether ``path`` is a finished shard ``index`` of this cache (a resumed sharded harvest
    skips it). Files are only ever renamed into place whole, so a parsable one is complete."""
    if not path.is_file():
        return False
    try:
        desc = read_shard_description(path)
    except CacheError:
        return False
    return bool(desc["meta"] == meta and desc["shard"]["index"] == index)


def harvest_cache_sharded(
    paired_model: PairedModel,
    token_source: RowSource,
    out_dir: str | os.PathLike[str],
    hook_name: str,
    *,
    batch_size: int = 8,
    rows_per_shard: int = 256,
    dtype: str | torch.dtype = "float32",
    mask_config: MaskConfig | None = None,
    max_rows: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    verbose: bool = True,
) -> HarvestSummary:
    """:func:`harvest_cache` spread over the ``torch.distributed`` process group.

    Every rank reads the token stream (tokenising is cheap) and runs the models on its own
    shards only: shard ``i`` belongs to rank ``i % W``. Each shard is computed exactly as the
    one-process harvest computes it (same forward batches, masks, high-norm median) and
    written atomically under its final name ``shard_<i>.safetensors``; no manifest exists
    until, after a barrier, rank 0 commits the single manifest
    (:func:`commit_sharded_manifest`). A rerun resumes: finished shards of the same
    configuration are kept. Arguments as :func:`harvest_cache`; every rank must call it.

    Raises:
        CacheIdentityError: ``out_dir`` holds a cache of another configuration (every rank
            raises; nothing is changed).
    """
    w = world()
    paired_model.validate_hooks([hook_name])
    mask_config = mask_config or MaskConfig()
    meta = cache_meta(
        harvest_meta(paired_model, token_source, hook_name, max_rows, mask_config),
        dtype,
        paired_model.d_model,
        rows_per_shard,
    )
    folder = Path(out_dir)
    t0 = time.perf_counter()

    def prepare() -> bool:
        """Rank 0, before anyone writes: clear or check the folder; True if already complete."""
        folder.mkdir(parents=True, exist_ok=True)
        for p in folder.glob("*.tmp"):  # half-written copies of a shard or manifest, never data
            if p.name.startswith(("shard_", MANIFEST)):
                p.unlink()
        if overwrite:
            for p in [*folder.glob(SHARD_GLOB), folder / MANIFEST]:
                p.unlink(missing_ok=True)
            return False
        if (folder / MANIFEST).exists():
            old = ActivationCache(folder, allow_incomplete=True)
            diffs = _diff_keys(old.meta, meta)
            if diffs:
                raise CacheIdentityError(
                    f"{folder} holds a cache harvested with a different configuration ({'; '.join(diffs)}). "
                    "Nothing was changed. Harvest into another folder, restore the settings the cache was "
                    "made with, or replace it explicitly with --overwrite (overwrite=True).",
                    diffs,
                )
            return bool(old.manifest.get("complete"))
        for p in folder.glob(SHARD_GLOB):  # shards of an interrupted sharded harvest: same cache?
            desc = read_shard_description(p)
            if desc["meta"] != meta:
                diffs = _diff_keys(desc["meta"], meta)
                raise CacheIdentityError(
                    f"{p} belongs to a harvest with a different configuration ({'; '.join(diffs)}). Nothing "
                    "was changed. Harvest into another folder or pass --overwrite.",
                    diffs,
                )
        return False

    done_flag = [on_main(prepare)]
    dist.broadcast_object_list(done_flag, src=0)
    n_mine = 0
    entries: dict[
        str, dict[str, Any]
    ] = {}  # this rank's shards: manifest entries (sha256 computed here)

    def want(i: int) -> bool:
        if i % w.size != w.rank:
            return False
        path = folder / _shard_name(i)
        if _shard_done(
            path, meta, i
        ):  # finished by an interrupted run: hash it here, not on rank 0
            entries[path.name] = _manifest_entry(path, read_shard_description(path))
            return False
        return True

    if not done_flag[0]:
        bar = tqdm(
            desc=f"harvest {hook_name} (rank {w.rank}/{w.size})",
            unit="shard",
            disable=not (progress and w.is_main),
        )
        try:
            for index, shard in indexed_model_shards(
                paired_model,
                token_source,
                hook_name,
                batch_size=batch_size,
                rows_per_shard=rows_per_shard,
                mask_config=mask_config,
                dtype=dtype,
                stop_row=max_rows,
                want=want,
            ):
                stats = shard_statistics(shard, paired_model.d_model, mask_config.high_norm_ratio)
                data = encode_shard(meta, shard, index, stats.to_json())
                try:
                    atomic_write(folder / _shard_name(index), data, durable=True)
                except OSError as e:
                    raise CacheWriteError(
                        f"rank {w.rank}: writing {folder / _shard_name(index)} failed ({e}); the shards on "
                        "disk stay valid. Free space (or fix permissions) and rerun the same harvest to "
                        "resume."
                    ) from e
                entries[_shard_name(index)] = shard_entry(index, shard, data)
                n_mine += 1
                bar.update(1)
        finally:
            bar.close()
        gathered: list[Any] = [None] * w.size if w.is_main else []
        dist.gather_object(entries, gathered if w.is_main else None, dst=0)  # also the barrier
        known = {k: v for part in gathered if part for k, v in part.items()}
        on_main(lambda: commit_sharded_manifest(folder, meta, known))
    barrier()
    cache = ActivationCache(folder)
    summary = HarvestSummary(
        out_dir=str(out_dir),
        rows=cache.n_rows,
        tokens=cache.n_tokens,
        shards=cache.n_shards,
        bytes=cache.nbytes,
        seconds=time.perf_counter() - t0,
    )
    if verbose and w.is_main:
        print(f"{summary} ({w.size} processes; this rank computed {n_mine} shards)")
    return summary


__all__ = ["harvest_cache_sharded"]
