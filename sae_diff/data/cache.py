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
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from sae_diff.errors import SaeDiffError
from sae_diff.pairing.masks import MASK_NAMES, MaskConfig, TokenMasks, high_norm_mask

FORMAT = "sae_diff.activation_cache"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CacheError(SaeDiffError, RuntimeError):
    """A cache is missing, partial, corrupt or was harvested with another configuration."""


def dtype_name(dtype: str | torch.dtype) -> str:
    """Canonical cache dtype name ("float32", "bfloat16", "float16")."""
    if isinstance(dtype, torch.dtype):
        for k, v in DTYPES.items():
            if v == dtype:
                return k
    elif dtype in DTYPES:
        return dtype
    raise ValueError(f"unsupported cache dtype {dtype!r}; use one of {sorted(DTYPES)}")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename durable too
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class RunningStats:
    """Per-model running sums (float64) over kept tokens: mean vector, mean norm, mean
    squared norm. ``scaling_factors`` gives SAELens's ``sqrt(d) / E||x||`` per model."""

    n_models: int
    d: int
    count: int = 0
    sum: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    sum_norm: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    sum_sq_norm: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    def __post_init__(self) -> None:
        if self.sum.numel() == 0:
            self.sum = torch.zeros(self.n_models, self.d, dtype=torch.float64)
            self.sum_norm = torch.zeros(self.n_models, dtype=torch.float64)
            self.sum_sq_norm = torch.zeros(self.n_models, dtype=torch.float64)

    def update(self, acts: torch.Tensor) -> None:
        """Add ``(n_tokens, n_models, d)`` activations."""
        x = acts.to(torch.float64)
        self.count += int(x.shape[0])
        self.sum += x.sum(0)
        sq = x.pow(2).sum(-1)
        self.sum_sq_norm += sq.sum(0)
        self.sum_norm += sq.sqrt().sum(0)

    @property
    def mean(self) -> torch.Tensor:
        """(n_models, d) mean activation."""
        return self.sum / max(self.count, 1)

    @property
    def mean_norm(self) -> torch.Tensor:
        """(n_models,) mean L2 norm."""
        return self.sum_norm / max(self.count, 1)

    @property
    def mean_sq_norm(self) -> torch.Tensor:
        """(n_models,) mean squared L2 norm."""
        return self.sum_sq_norm / max(self.count, 1)

    def scaling_factors(self) -> torch.Tensor:
        """(n_models,) scalars s_m with E||s_m x_m|| = sqrt(d) (METHODS §6)."""
        return (self.d**0.5) / self.mean_norm.clamp_min(1e-12)

    def to_json(self) -> dict[str, Any]:
        """Exact JSON form (float64 values round-trip through ``repr``)."""
        return {
            "n_models": self.n_models,
            "d": self.d,
            "count": self.count,
            "sum": self.sum.tolist(),
            "sum_norm": self.sum_norm.tolist(),
            "sum_sq_norm": self.sum_sq_norm.tolist(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunningStats:
        """Inverse of :meth:`to_json`."""
        f64 = torch.float64
        return cls(
            n_models=d["n_models"],
            d=d["d"],
            count=d["count"],
            sum=torch.tensor(d["sum"], dtype=f64),
            sum_norm=torch.tensor(d["sum_norm"], dtype=f64),
            sum_sq_norm=torch.tensor(d["sum_sq_norm"], dtype=f64),
        )


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: cached {a!r} vs now {b!r}"]


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
        self.meta = json.loads(
            json.dumps(
                {
                    **meta,
                    "dtype": self.dtype_name,
                    "d_model": self.d_model,
                    "rows_per_shard": self.rows_per_shard,
                }
            )
        )
        self.shards: list[dict[str, Any]] = []
        self.stats = RunningStats(2, self.d_model)
        self.resumed_from_rows = 0
        manifest = self.dir / MANIFEST
        if overwrite:
            for p in list(self.dir.glob("shard_*.safetensors*")) + [manifest]:
                p.unlink(missing_ok=True)
        elif manifest.exists():
            old = json.loads(manifest.read_text())
            diffs = _diff_keys(old.get("meta", {}), self.meta)
            if diffs:
                raise CacheError(
                    f"{self.dir} holds a cache harvested with a different configuration "
                    f"({'; '.join(diffs[:5])}). Use another out_dir, or overwrite=True to "
                    "start it again."
                )
            reader = ActivationCache(self.dir, allow_incomplete=True)  # verifies shard sizes
            self.shards = list(old["shards"])
            self.stats = RunningStats.from_json(old["stats"])
            self.resumed_from_rows = sum(s["n_rows"] for s in self.shards)
            del reader
        # leftovers of an interrupted write: temp files and shards never committed
        committed = {s["file"] for s in self.shards}
        for p in self.dir.glob("shard_*.safetensors*"):
            if p.name not in committed:
                p.unlink()
        self._buf: list[dict[str, torch.Tensor]] = []
        self._buf_rows = 0
        self._rows_submitted = self.rows_done
        self.bytes_written = 0
        self.complete = False
        # shards are serialised, hashed and written by one background thread, in order, so
        # disk I/O overlaps the next forward passes; the manifest only ever lists shards that
        # are on disk, with the statistics of exactly those shards
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer")
        self._pending: list[Future[None]] = []

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
        m = masks.to_dict() if isinstance(masks, TokenMasks) else dict(masks)
        block = {
            "acts": acts.detach().to("cpu", self.dtype).contiguous(),
            "tokens": tokens.detach().cpu().to(torch.int64),
            "row_index": row_index.cpu().to(torch.int64),
            "attention_mask": attention_mask.cpu().bool(),
            "doc_starts": doc_starts.cpu().bool(),
        }
        for name, v in m.items():
            if name != "high_norm":  # recomputed over the whole shard
                block[f"mask_{name}"] = v.cpu().bool()
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
        shard = self._take(n)
        valid = shard["attention_mask"]
        shard["mask_high_norm"] = high_norm_mask(
            shard["acts"], self.mask_config.high_norm_ratio, valid=valid
        )
        masks = TokenMasks.from_dict({k[5:]: v for k, v in shard.items() if k.startswith("mask_")})
        keep = MaskConfig(
            first_n=0, only_assistant=False, high_norm_ratio=self.mask_config.high_norm_ratio
        ).keep(masks)
        self.stats.update(shard["acts"][keep])
        self._rows_submitted += int(shard["tokens"].shape[0])
        self._raise_failed_writes()
        self._pending.append(self._writer.submit(self._write_shard, shard, self.stats.to_json()))

    def _write_shard(self, shard: dict[str, torch.Tensor], stats: dict[str, Any]) -> None:
        data = st_save(
            dict(sorted(shard.items())),
            metadata={"format": f"{FORMAT}/{VERSION}"},  # one key: byte-stable header
        )
        idx = len(self.shards)
        name = f"shard_{idx:05d}.safetensors"
        _atomic_write(self.dir / name, data)
        rows, seq = shard["tokens"].shape
        self.shards.append(
            {
                "file": name,
                "n_rows": int(rows),
                "n_tokens": int(rows * seq),
                "first_row": int(shard["row_index"][0]),
                "bytes": len(data),
                "sha256": _sha256(data),
            }
        )
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
        n_rows = self.rows_done
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "meta": self.meta,
            "complete": self.complete,
            "n_rows": n_rows,
            "n_tokens": sum(s["n_tokens"] for s in self.shards),
            "shards": self.shards,
            "stats": self.stats.to_json() if stats is None else stats,
        }
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


class ActivationCache:
    """Read a cache folder: verified shards, block-shuffled iteration, statistics.

    Args:
        path: the cache folder.
        allow_incomplete: open a cache whose harvest has not finished.

    Raises:
        CacheError: no manifest, a missing shard or one of the wrong size (on open), a
            checksum mismatch (when a shard is loaded), or an unfinished harvest.
    """

    def __init__(self, path: str | os.PathLike[str], *, allow_incomplete: bool = False) -> None:
        self.dir = Path(path)
        self._verified: dict[int, int] = {}  # shard index -> mtime_ns when its sha256 matched
        mpath = self.dir / MANIFEST
        if not mpath.exists():
            raise CacheError(
                f"no {MANIFEST} in {self.dir}: not an activation cache (or its harvest never "
                "committed a shard); harvest it with sae_diff.data.harvest.harvest_cache"
            )
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"{mpath} is not valid JSON ({e}); the cache is corrupt") from e
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise CacheError(
                f"{mpath}: unsupported cache format {self.manifest.get('format')!r} "
                f"v{self.manifest.get('version')} (this code reads {FORMAT} v{VERSION})"
            )
        if not self.manifest["complete"] and not allow_incomplete:
            raise CacheError(
                f"the harvest of {self.dir} did not finish ({self.manifest['n_rows']} rows "
                "committed); run harvest_cache again with the same arguments to resume, or "
                "open it with allow_incomplete=True"
            )
        self.meta: dict[str, Any] = self.manifest["meta"]
        self.shards: list[dict[str, Any]] = self.manifest["shards"]
        for s in self.shards:
            p = self.dir / s["file"]
            if not p.exists():
                raise CacheError(f"shard {p} is missing (listed in {mpath})")
            size = p.stat().st_size
            if size != s["bytes"]:
                raise CacheError(
                    f"shard {p} has {size} bytes but the manifest says {s['bytes']}: it is "
                    "partial or corrupt; delete it and its manifest entry, or re-harvest"
                )
        self.stats = RunningStats.from_json(self.manifest["stats"])

    # -- properties
    @property
    def hook_name(self) -> str:
        return str(self.meta["hook_name"])

    @property
    def d_model(self) -> int:
        return int(self.meta["d_model"])

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.meta["dtype"]]

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    @property
    def nbytes(self) -> int:
        return sum(int(s["bytes"]) for s in self.shards)

    def __len__(self) -> int:
        return self.n_shards

    # -- reading
    def load_shard(self, i: int, verify: bool = True) -> dict[str, torch.Tensor]:
        """All tensors of shard ``i``, read in one contiguous block and checksum-verified.

        A shard is hashed on its first read by this reader; later reads (epochs) re-hash only
        if the file's size or modification time changed."""
        s = self.shards[i]
        p = self.dir / s["file"]
        data = p.read_bytes()
        stamp = p.stat().st_mtime_ns
        verify = verify and self._verified.get(i) != stamp
        if len(data) != s["bytes"]:
            raise CacheError(
                f"shard {p} has {len(data)} bytes, expected {s['bytes']}: partial or corrupt"
            )
        if verify and _sha256(data) != s["sha256"]:
            raise CacheError(
                f"shard {p} fails its sha256 checksum: the file is corrupt; re-harvest it "
                "(delete the file and rerun harvest_cache after trimming the manifest) or "
                "restore it from a copy"
            )
        if verify:
            self._verified[i] = stamp
        try:
            return st_load(data)
        except Exception as e:  # pragma: no cover - only reachable with verify=False
            raise CacheError(f"shard {p} cannot be parsed as safetensors: {e}") from e

    def verify(self) -> None:
        """Checksum every shard (raises :class:`CacheError` naming the first bad file)."""
        for i in range(self.n_shards):
            self.load_shard(i)

    def masks(self, shard: dict[str, torch.Tensor]) -> TokenMasks:
        """The TokenMasks stored in a loaded shard."""
        return TokenMasks.from_dict({k[5:]: v for k, v in shard.items() if k.startswith("mask_")})

    def keep_mask(
        self, shard: dict[str, torch.Tensor], mask_config: MaskConfig | None
    ) -> torch.Tensor:
        """(rows, seq) bool of the tokens ``mask_config`` keeps (first-n recomputed from
        document starts when its n differs from the harvest's)."""
        from sae_diff.pairing.masks import first_n_mask

        cfg = mask_config or MaskConfig()
        masks = self.masks(shard)
        if cfg.first_n > 0:
            masks.first_n = first_n_mask(shard["tokens"], cfg.first_n, shard["doc_starts"])
        return cfg.keep(masks)

    def iter_blocks(
        self,
        *,
        mask_config: MaskConfig | None = None,
        shuffle: bool = True,
        seed: int = 0,
        block_rows: int | None = None,
        verify: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Kept activations ``(n_tokens, 2, d)`` block by block: shards in a seeded random
        order, each cut into contiguous blocks of ``block_rows`` rows (default: the whole
        shard) in random order. Shuffle within the buffer downstream (the store does)."""
        order = list(range(self.n_shards))
        rng = random.Random(seed)
        if shuffle:
            rng.shuffle(order)
        for i in order:
            shard = self.load_shard(i, verify=verify)
            keep = self.keep_mask(shard, mask_config)
            acts = shard["acts"]
            rows = acts.shape[0]
            step = block_rows or rows
            starts = list(range(0, rows, step))
            if shuffle:
                rng.shuffle(starts)
            for r0 in starts:
                yield acts[r0 : r0 + step][keep[r0 : r0 + step]]

    def tokens(self) -> torch.Tensor:
        """All tokens ``(n_rows, seq)`` in harvest order."""
        return torch.cat([self.load_shard(i)["tokens"] for i in range(self.n_shards)])

    def read_all(self) -> dict[str, torch.Tensor]:
        """Every tensor of every shard concatenated in harvest order (small caches only)."""
        parts = [self.load_shard(i) for i in range(self.n_shards)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}


__all__ = [
    "MASK_NAMES",
    "ActivationCache",
    "ActivationCacheWriter",
    "CacheError",
    "RunningStats",
    "harvest_cache",
]


def harvest_cache(*args: Any, **kwargs: Any) -> Any:
    """Harvest a cache; see :func:`sae_diff.data.harvest.harvest_cache` (re-exported here)."""
    from sae_diff.data.harvest import harvest_cache as _harvest

    return _harvest(*args, **kwargs)
