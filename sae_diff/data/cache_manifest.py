"""A cache's manifest made from its self-describing shards: rebuilt after a loss, or committed
once by rank 0 after a sharded harvest.

Both read the shards' headers (:func:`~sae_diff.data.cache_format.read_shard_description`),
require ``shard_00000, shard_00001, ...`` with contiguous rows and one cache meta, and re-sum
the statistics from the shards' own sums in shard order, which is exactly how a one-process
harvest accumulates them: the result equals the manifest the writer would have written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sae_diff.atomic import atomic_write
from sae_diff.data.cache_format import (
    MANIFEST,
    SHARD_GLOB,
    CacheError,
    CacheIdentityError,
    RunningStats,
    _diff_keys,
    _manifest_entry,
    _shard_name,
    manifest_document,
    read_shard_description,
)


def _contiguous_shards(
    files: list[Path],
    descs: list[dict[str, Any]],
    meta: dict[str, Any],
    known: dict[str, dict[str, Any]],
    gap: Callable[[int, Path, dict[str, Any], int], str],
) -> tuple[list[dict[str, Any]], RunningStats]:
    """Manifest entries and merged statistics of shards that continue each other exactly;
    ``gap(i, path, description, expected_first_row)`` words the error for one that does not.
    ``known`` entries (file name -> entry with its size) are trusted when the size matches
    (a terabyte cache is not hashed twice); any other shard is read and hashed."""
    shards: list[dict[str, Any]] = []
    stats = RunningStats(2, int(meta["d_model"]))
    row = 0
    for i, (p, d) in enumerate(zip(files, descs)):
        s = d["shard"]
        if (
            p.name != _shard_name(i)
            or s["index"] != i
            or s["first_row"] != row
            or d["meta"] != meta
        ):
            raise CacheError(gap(i, p, d, row))
        entry = known.get(p.name)
        if entry is None or int(entry["bytes"]) != p.stat().st_size:
            entry = _manifest_entry(p, d)
        shards.append(dict(entry))
        stats.merge(RunningStats.from_json(d["stats"]))
        row += int(s["n_rows"])
    return shards, stats


def _write(path: Path, manifest: dict[str, Any]) -> None:
    """Durably (fsynced data and folder, then the rename), as the cache writer does."""
    atomic_write(path, json.dumps(manifest, indent=1).encode(), durable=True)


def rebuild_manifest(
    path: str | os.PathLike[str], *, expected_meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Rewrite a lost ``manifest.json`` from the cache's self-describing shards.

    Every shard must carry the same cache meta (and ``expected_meta``, when given), and the
    shards must be ``shard_00000``, ``shard_00001``, ... with contiguous row ranges. The
    statistics are re-summed from the shards' own sums in shard order, so they equal the lost
    manifest's bit for bit; checksums are taken from the files. The rebuilt cache counts as
    complete when it holds the harvest's ``max_rows`` (or all rows of its source) or when its
    last shard is partial; otherwise a harvest with the same settings resumes it. Nothing is
    ever deleted.

    Raises:
        CacheError: a manifest already exists, no shards, a shard that cannot describe
            itself, shards of different caches, a gap, or a meta other than ``expected_meta``.
    """
    folder = Path(path)
    mpath = folder / MANIFEST
    if mpath.exists():
        raise CacheError(f"{mpath} exists; rebuild_manifest only replaces a missing manifest")
    files = sorted(folder.glob(SHARD_GLOB))
    if not files:
        raise CacheError(f"{folder} holds no shard_*.safetensors files: nothing to rebuild")
    descs = [read_shard_description(p) for p in files]
    meta = descs[0]["meta"]
    for p, d in zip(files, descs):
        if d["meta"] != meta:
            diffs = _diff_keys(meta, d["meta"])
            raise CacheError(
                f"{p} belongs to another cache than {files[0].name} ({'; '.join(diffs)}): the "
                "folder mixes two harvests. Move the foreign shards out, then retry."
            )
    if expected_meta is not None and meta != expected_meta:
        diffs = _diff_keys(meta, expected_meta)
        raise CacheIdentityError(
            f"{folder} has no {MANIFEST}, and its shards were harvested with a different "
            f"configuration ({'; '.join(diffs)}). Nothing was changed. Harvest into another "
            "folder, restore the settings the cache was made with, or replace it with "
            "--overwrite.",
            diffs,
        )
    shards, stats = _contiguous_shards(
        files,
        descs,
        meta,
        {},
        lambda i, p, d, row: (
            f"cannot rebuild {mpath}: expected {_shard_name(i)} starting at row {row}, found "
            f"{p.name} (shard {d['shard']['index']}, first row {d['shard']['first_row']}); a "
            "shard is missing. Restore it, or harvest into a new folder."
        ),
    )
    row = sum(int(s["n_rows"]) for s in shards)
    # complete when the harvest's target was reached, or when the last shard is partial (only
    # close() writes a partial shard); otherwise a harvest with the same settings resumes it
    targets = [meta.get("max_rows"), (meta.get("source") or {}).get("n_rows")]
    complete = any(n is not None and row >= int(n) for n in targets) or int(
        shards[-1]["n_rows"]
    ) < int(meta.get("rows_per_shard", 0))
    manifest = manifest_document(
        meta, shards, stats.to_json(), complete=complete, rebuilt_from_shards=True
    )
    _write(mpath, manifest)
    return manifest


def commit_sharded_manifest(
    out_dir: str | os.PathLike[str],
    meta: dict[str, Any],
    known: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write the manifest of a finished sharded harvest (rank 0, after every rank's barrier).

    The shards must be ``shard_00000 ..`` with contiguous rows and this cache's ``meta``
    (read from each shard's header); the statistics are the shards' own sums merged in shard
    order, exactly as a one-process harvest accumulates them, so the manifest equals the
    one-process manifest. ``known`` maps file names to manifest entries (size, sha256) that
    the ranks computed while writing: those files are not read again (a 100 M-token cache is
    terabytes); any other shard is read and hashed here. Written atomically (temporary file,
    fsync, rename).

    Raises:
        CacheError: a shard is missing or belongs to another cache.
    """
    folder = Path(out_dir)
    files = sorted(folder.glob(SHARD_GLOB))
    descs = [read_shard_description(p) for p in files]

    def gap(i: int, p: Path, desc: dict[str, Any], row: int) -> str:
        s = desc["shard"]
        return (
            f"cannot commit {folder / MANIFEST}: expected {_shard_name(i)} of this harvest "
            f"starting at row {row}, found {p.name} (shard {s['index']}, first row "
            f"{s['first_row']}{', another configuration' if desc['meta'] != meta else ''}). A "
            "rank did not finish; rerun the same sharded harvest to resume it."
        )

    shards, stats = _contiguous_shards(files, descs, meta, known or {}, gap)
    manifest = manifest_document(meta, shards, stats.to_json(), complete=True)
    _write(folder / MANIFEST, manifest)
    return manifest


__all__ = ["commit_sharded_manifest", "rebuild_manifest"]
