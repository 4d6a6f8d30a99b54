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
#: the one safetensors metadata key of a shard: a sorted JSON self-description (one key keeps
#: the header byte-stable; safetensors writes several keys in a random order)
SHARD_META_KEY = "sae_diff.activation_cache"
SHARD_GLOB = "shard_*.safetensors"
REQUIRED_TENSORS = ("acts", "tokens", "row_index", "attention_mask", "doc_starts")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CacheError(SaeDiffError, RuntimeError):
    """A cache is missing, partial, corrupt or was harvested with another configuration."""


class CacheDtypeError(CacheError, ValueError):
    """A dtype a cache cannot store (it keeps float32, bfloat16 or float16)."""


class CacheWriteError(CacheError, OSError):
    """Writing a shard failed (disk full, permissions); the committed shards stay valid."""


class CacheIdentityError(CacheError):
    """A cache holds activations of another setup (models, hook, data, masks, dtype, ...) than
    the config asks for; ``mismatches`` lists every differing field."""

    def __init__(self, message: str, mismatches: list[str]) -> None:
        super().__init__(message)
        self.mismatches = mismatches


def dtype_name(dtype: str | torch.dtype) -> str:
    """Canonical cache dtype name ("float32", "bfloat16", "float16")."""
    if isinstance(dtype, torch.dtype):
        for k, v in DTYPES.items():
            if v == dtype:
                return k
    elif dtype in DTYPES:
        return dtype
    raise CacheDtypeError(
        f"unsupported cache dtype {dtype!r}: a cache stores one of {sorted(DTYPES)}. Set cache_dtype "
        "to one of them (the models may still run in another dtype)."
    )


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

    def merge(self, other: RunningStats) -> None:
        """Add another accumulator's sums (exactly what :meth:`update` on its tokens adds:
        the shard-by-shard sums of a harvest and of a rebuilt manifest agree bit for bit)."""
        self.count += other.count
        self.sum += other.sum
        self.sum_sq_norm += other.sum_sq_norm
        self.sum_norm += other.sum_norm

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


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def read_shard_description(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The self-description a shard carries in its safetensors header (cache meta, its row
    range, statistics of its kept tokens). Reads the header only.

    Raises:
        CacheError: the file is not a safetensors file, or was written by an sae_diff without
            self-describing shards.
    """
    from safetensors import safe_open

    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:
        raise CacheError(f"shard {p} cannot be parsed as safetensors ({e}): it is corrupt") from e
    raw = header.get(SHARD_META_KEY)
    if raw is None:
        raise CacheError(
            f"shard {p} carries no self-description (it was written by an older sae_diff), so "
            "the manifest cannot be rebuilt from it. Restore manifest.json from a copy, or "
            "harvest into a new folder (--overwrite replaces this one)."
        )
    try:
        desc: dict[str, Any] = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CacheError(f"shard {p} has a corrupt self-description ({e})") from e
    if desc.get("format") != FORMAT or desc.get("version") != VERSION:
        raise CacheError(
            f"shard {p}: unsupported format {desc.get('format')!r} v{desc.get('version')} "
            f"(this code reads {FORMAT} v{VERSION})"
        )
    return desc


def _manifest_entry(p: Path, desc: dict[str, Any]) -> dict[str, Any]:
    data = p.read_bytes()
    s = desc["shard"]
    return {
        "file": p.name,
        "n_rows": int(s["n_rows"]),
        "n_tokens": int(s["n_tokens"]),
        "first_row": int(s["first_row"]),
        "bytes": len(data),
        "sha256": _sha256(data),
    }


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
    shards: list[dict[str, Any]] = []
    stats = RunningStats(2, int(meta["d_model"]))
    row = 0
    for i, (p, d) in enumerate(zip(files, descs)):
        s = d["shard"]
        if p.name != _shard_name(i) or s["index"] != i or s["first_row"] != row:
            raise CacheError(
                f"cannot rebuild {mpath}: expected {_shard_name(i)} starting at row {row}, found "
                f"{p.name} (shard {s['index']}, first row {s['first_row']}); a shard is missing. "
                "Restore it, or harvest into a new folder."
            )
        shards.append(_manifest_entry(p, d))
        stats.merge(RunningStats.from_json(d["stats"]))
        row += int(s["n_rows"])
    # complete when the harvest's target was reached, or when the last shard is partial (only
    # close() writes a partial shard); otherwise a harvest with the same settings resumes it
    targets = [meta.get("max_rows"), (meta.get("source") or {}).get("n_rows")]
    complete = any(n is not None and row >= int(n) for n in targets) or int(shards[-1]["n_rows"]) < int(
        meta.get("rows_per_shard", 0)
    )
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "meta": meta,
        "complete": complete,
        "n_rows": row,
        "n_tokens": sum(s["n_tokens"] for s in shards),
        "shards": shards,
        "stats": stats.to_json(),
        "rebuilt_from_shards": True,
    }
    _atomic_write(mpath, json.dumps(manifest, indent=1).encode())
    return manifest


# ---------------------------------------------------------------------- identity
#: what a cache's activations depend on; ``check_identity`` compares these fields
IDENTITY_FIELDS: tuple[str, ...] = (
    "base_model",
    "base_revision",
    "ft_model",
    "ft_revision",
    "hook_name",
    "d_model",
    "tokenizer_hash",
    "chat_template_hash",
    "datasets",
    "context_size",
    "high_norm_ratio",
    "dtype",
)
_DATASET_KEYS = ("path", "kind", "column", "split", "name", "revision", "weight", "start", "stop")


def _dataset_identity(d: dict[str, Any]) -> dict[str, Any]:
    """The fields of a dataset description that change which tokens are read."""
    if "tensor" in d:
        return {"tensor": d["tensor"]}
    if "path" in d:
        return {k: d.get(k) for k in _DATASET_KEYS}
    return {"object": d.get("object")}


def cache_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """The identity of a cache (models and revisions, hook, width, tokenizer and chat-template
    hashes, datasets, context size, high-norm ratio, dtype) from its manifest ``meta``."""
    models = meta.get("models") or {}
    source = meta.get("source") or {}
    base, ft = models.get("base") or {}, models.get("ft") or {}
    return {
        "base_model": base.get("name"),
        "base_revision": base.get("revision"),
        "ft_model": ft.get("name"),
        "ft_revision": ft.get("revision"),
        "hook_name": meta.get("hook_name"),
        "d_model": meta.get("d_model"),
        "tokenizer_hash": models.get("tokenizer_hash"),
        "chat_template_hash": models.get("chat_template_hash"),
        "datasets": [_dataset_identity(d) for d in source.get("datasets", [])],
        "context_size": source.get("context_size"),
        "high_norm_ratio": (meta.get("mask_config") or {}).get("high_norm_ratio"),
        "dtype": meta.get("dtype"),
    }


def expected_identity(cfg: Any, pair: Any = None) -> dict[str, Any]:
    """What a run config expects of its cache, without loading any model weights.

    Fields the config does not determine are ``None`` (not checked): the tokenizer and
    chat-template hashes and the revisions unless ``pair`` (a loaded ``PairedModel``) is
    given, the datasets of an organism's own corpus, the model names when the config leaves
    them to the organism. Pass ``pair`` once the models are loaded to check everything.

    Args:
        cfg: a :class:`~sae_diff.training.config.PairedRunnerConfig`.
        pair: optional loaded pair; its ``describe()`` supplies names, revisions and hashes.
    """
    from sae_diff.data.sources import DatasetSpec

    datasets: list[dict[str, Any]] | None
    if cfg.dataset_mixture:
        datasets = [_dataset_identity(DatasetSpec(**d).describe()) for d in cfg.dataset_mixture]
    elif cfg.dataset_path:
        spec = DatasetSpec(cfg.dataset_path, column=cfg.dataset_column, split=cfg.dataset_split)
        datasets = [_dataset_identity(spec.describe())]
    elif cfg.organism is None and cfg.smoke_test_models is not None:
        datasets = [{"tensor": "smoke-test random tokens"}]
    else:
        datasets = None  # the organism's own corpus: identified by the organism's models
    try:  # the storage dtype: cache_dtype when set, else the models' dtype
        dtype: str | None = dtype_name(getattr(cfg, "cache_dtype", None) or cfg.dtype)
    except ValueError:
        dtype = None
    smoke = cfg.smoke_test_models is not None and cfg.organism is None
    out: dict[str, Any] = {
        "base_model": cfg.base_model_name or ("smoke-base" if smoke else None),
        "base_revision": None,
        "ft_model": cfg.model_name or None,
        "ft_revision": None,
        "hook_name": cfg.hook_name or None,
        "d_model": int(cfg.sae.d_in),
        "tokenizer_hash": None,
        "chat_template_hash": None,
        "datasets": datasets,
        "context_size": int(cfg.context_size),
        "high_norm_ratio": cfg.mask_high_norm,  # None (mask off): the cached ratio is unused
        "dtype": dtype,
    }
    if pair is not None:
        got = cache_identity({"models": pair.describe()})
        for k in ("base_model", "base_revision", "ft_model", "ft_revision", "tokenizer_hash",
                  "chat_template_hash"):
            out[k] = got[k]
    return out


def check_identity(
    cache: ActivationCache | dict[str, Any] | str | os.PathLike[str],
    expected: dict[str, Any],
    *,
    what: str = "the config",
) -> None:
    """Raise :class:`CacheIdentityError` listing EVERY field where ``cache`` differs from
    ``expected`` (see :func:`expected_identity`); ``None`` in ``expected`` skips a field.

    Call it before training from, or appending to, a cache: a cache harvested at another
    hook, of other models or data trains without any other error and yields a dictionary whose
    ``cfg.json`` describes activations it never saw.

    Args:
        cache: an open cache, its folder, or a manifest ``meta`` dict.
        expected: identity fields (:data:`IDENTITY_FIELDS`) and their expected values.
        what: how to name the expectation in the message (e.g. "the checkpoint's config").
    """
    if isinstance(cache, dict):
        meta, where = cache, "the cache"
    else:
        c = cache if isinstance(cache, ActivationCache) else ActivationCache(
            cache, allow_incomplete=True
        )
        meta, where = c.meta, str(c.dir)
    have = cache_identity(meta)
    unknown = sorted(set(expected) - set(IDENTITY_FIELDS))
    if unknown:
        raise ValueError(f"unknown identity field(s) {unknown}; use {list(IDENTITY_FIELDS)}")
    mismatches = [
        f"{k}: cache has {have[k]!r}, {what} says {v!r}"
        for k, v in expected.items()
        if v is not None and have.get(k) != v
    ]
    if mismatches:
        raise CacheIdentityError(
            f"{where} was harvested for another setup than {what} "
            f"({len(mismatches)} difference{'s' if len(mismatches) > 1 else ''}: "
            f"{'; '.join(mismatches)}). Nothing was changed. Point cache_path at a new folder "
            "and run `sae-diff harvest`, or fix the config; `sae-diff harvest --overwrite` "
            "replaces this cache.",
            mismatches,
        )


def check_config_cache(cfg: Any, *, pair: Any = None, what: str = "the config") -> None:
    """Check ``cfg.cache_path`` against the run config ``cfg`` before training from it or
    harvesting into it: the storage dtype is one a cache can hold, the path is a folder, and a
    cache (or, with a lost manifest, its first shard's self-description) there was harvested
    for this setup (:func:`check_identity` with :func:`expected_identity`). Nothing happens
    when the folder holds no cache yet. Loads no model; pass ``pair`` once the models are
    loaded to compare revisions and tokenizer hashes too.

    Raises:
        CacheDtypeError, CacheError, CacheIdentityError: naming the problem and the fix.
    """
    if not getattr(cfg, "cache_path", None):
        return
    dtype_name(getattr(cfg, "cache_dtype", None) or cfg.dtype)  # a dtype the cache can store
    folder = Path(cfg.cache_path)
    if folder.exists() and not folder.is_dir():
        raise CacheError(
            f"cache_path {str(folder)!r} is a file, not a cache folder; point cache_path at a "
            "folder (it is created when missing)."
        )
    expected = expected_identity(cfg, pair=pair)
    if (folder / MANIFEST).is_file():
        check_identity(ActivationCache(folder, allow_incomplete=True), expected, what=what)
    elif folder.is_dir() and (shards := sorted(folder.glob(SHARD_GLOB))):
        check_identity(read_shard_description(shards[0])["meta"], expected, what=what)


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
        shard_stats = RunningStats(2, self.d_model)
        shard_stats.update(shard["acts"][keep])
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
        rows, seq = shard["tokens"].shape
        desc = {
            "format": FORMAT,
            "version": VERSION,
            "meta": self.meta,
            "shard": {
                "index": index,
                "first_row": int(shard["row_index"][0]),
                "n_rows": int(rows),
                "n_tokens": int(rows * seq),
            },
            "stats": shard_stats,
        }
        # self-describing: the cache identity, row range and statistics travel with the shard,
        # so a lost manifest can be rebuilt exactly (rebuild_manifest)
        data = st_save(
            dict(sorted(shard.items())),
            metadata={SHARD_META_KEY: json.dumps(desc, sort_keys=True)},
        )
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
            if any(self.dir.glob(SHARD_GLOB)):
                raise CacheError(
                    f"{self.dir} holds shards but no {MANIFEST} (it was deleted or lost). The "
                    "shards describe themselves: rebuild it with `sae-diff harvest` using the "
                    "same config (it rebuilds and resumes) or "
                    f"sae_diff.data.cache.rebuild_manifest({str(self.dir)!r}). Nothing was deleted."
                )
            raise CacheError(
                f"no {MANIFEST} in {self.dir}: not an activation cache (or its harvest never "
                "committed a shard); harvest it with `sae-diff harvest` or "
                "sae_diff.data.harvest.harvest_cache"
            )
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(
                f"{mpath} is not valid JSON ({e}): the manifest is corrupt. The shards describe "
                "themselves: move the manifest aside and run the same `sae-diff harvest` (or "
                "sae_diff.data.cache.rebuild_manifest) to rebuild it; no shard is touched."
            ) from e
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
        try:
            tensors = st_load(data)
        except Exception as e:  # only reachable with verify=False or a matching bad checksum
            raise CacheError(f"shard {p} cannot be parsed as safetensors: {e}") from e
        self._check_shard(p, s, tensors)
        if verify:
            self._verified[i] = stamp
        return tensors

    def _check_shard(self, p: Path, entry: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
        """A shard's tensors must be what the manifest promises: a well-formed file with a
        valid checksum can still hold the wrong thing (e.g. only the base model)."""
        missing = [k for k in REQUIRED_TENSORS if k not in t]
        if missing:
            raise CacheError(
                f"shard {p} lacks tensors {missing}: it was not written by this cache's harvest. "
                "Restore it from a copy or re-harvest the cache."
            )
        rows, want = int(entry["n_rows"]), (2, self.d_model)
        acts, tokens = t["acts"], t["tokens"]
        problems = []
        if acts.dim() != 4 or tuple(acts.shape[2:]) != want or acts.shape[0] != rows:
            problems.append(
                f"acts has shape {tuple(acts.shape)}, expected ({rows}, seq, 2, {self.d_model}) "
                "(index 0 = base, 1 = ft)"
            )
        elif acts.dtype != self.dtype:
            problems.append(f"acts are {acts.dtype}, the manifest says {self.dtype}")
        if tokens.dim() != 2 or tokens.shape[0] != rows or (
            acts.dim() == 4 and tuple(tokens.shape) != tuple(acts.shape[:2])
        ):
            problems.append(f"tokens have shape {tuple(tokens.shape)}, not (rows, seq) of acts")
        for k, v in t.items():
            if (k.startswith("mask_") or k in ("attention_mask", "doc_starts")) and tuple(
                v.shape
            ) != tuple(tokens.shape):
                problems.append(f"{k} has shape {tuple(v.shape)}, tokens {tuple(tokens.shape)}")
        if problems:
            raise CacheError(
                f"shard {p} is malformed: {'; '.join(problems)}. Restore it from a copy or "
                "re-harvest the cache."
            )

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
        """(rows, seq) bool of the tokens ``mask_config`` keeps: the same rule the training
        store applies (``MaskConfig.keep``; first-n = the first n positions of each row)."""
        return (mask_config or MaskConfig()).keep(self.masks(shard))

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
    "harvest_cache",
]


def harvest_cache(*args: Any, **kwargs: Any) -> Any:
    """Harvest a cache; see :func:`sae_diff.data.harvest.harvest_cache` (re-exported here)."""
    from sae_diff.data.harvest import harvest_cache as _harvest

    return _harvest(*args, **kwargs)
