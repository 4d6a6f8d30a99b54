"""The activation cache's on-disk format: names, version, dtypes, errors, shard
self-descriptions and running statistics, and the one encoding of a shard (its tensors,
statistics, self-describing safetensors bytes and manifest entry) and of a manifest. Shared by
the writer, the sharded harvest, the manifest rebuild, the reader and the identity checks, so
every path writes the same bytes; see :mod:`sae_diff.data.cache` for the layout."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from sae_diff.errors import SaeDiffError
from sae_diff.pairing.masks import MaskConfig, TokenMasks, high_norm_mask

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


# ---------------------------------------------------------------------- shard encoding
Shard = dict[str, torch.Tensor]


def cache_meta(
    meta: dict[str, Any], dtype: str | torch.dtype, d_model: int, rows_per_shard: int
) -> dict[str, Any]:
    """The manifest ``meta`` of a cache: what a harvest records about itself plus the storage
    dtype, width and shard size, normalised through JSON (exactly what a reader compares)."""
    return json.loads(
        json.dumps(
            {
                **meta,
                "dtype": dtype_name(dtype),
                "d_model": int(d_model),
                "rows_per_shard": int(rows_per_shard),
            }
        )
    )


def shard_block(
    tokens: torch.Tensor,
    acts: torch.Tensor,
    masks: TokenMasks | dict[str, torch.Tensor],
    *,
    attention_mask: torch.Tensor,
    doc_starts: torch.Tensor,
    row_index: torch.Tensor,
    dtype: torch.dtype,
) -> Shard:
    """Rows of a shard in the stored layout (CPU; ``acts`` in the storage ``dtype``, masks as
    ``mask_<name>``). The high-norm mask is left out: it is taken over the whole shard
    (:func:`add_high_norm_mask`)."""
    block = {
        "acts": acts.detach().to("cpu", dtype).contiguous(),
        "tokens": tokens.detach().cpu().to(torch.int64),
        "row_index": row_index.cpu().to(torch.int64),
        "attention_mask": attention_mask.cpu().bool(),
        "doc_starts": doc_starts.cpu().bool(),
    }
    for name, v in (masks.to_dict() if isinstance(masks, TokenMasks) else masks).items():
        if name != "high_norm":  # recomputed over the whole shard
            block[f"mask_{name}"] = v.cpu().bool()
    return block


def add_high_norm_mask(shard: Shard, high_norm_ratio: float) -> Shard:
    """Set ``mask_high_norm`` over the whole shard (the median is taken over its valid
    tokens, so it depends on the shard's rows, never on the forward batches)."""
    shard["mask_high_norm"] = high_norm_mask(
        shard["acts"], high_norm_ratio, valid=shard["attention_mask"]
    )
    return shard


def shard_statistics(shard: Shard, d_model: int, high_norm_ratio: float) -> RunningStats:
    """Statistics of the tokens a shard keeps under the default masks (the manifest's running
    statistics are the sum of these, in shard order)."""
    masks = TokenMasks.from_dict({k[5:]: v for k, v in shard.items() if k.startswith("mask_")})
    keep = MaskConfig(first_n=0, only_assistant=False, high_norm_ratio=high_norm_ratio).keep(masks)
    stats = RunningStats(2, int(d_model))
    stats.update(shard["acts"][keep])
    return stats


def encode_shard(meta: dict[str, Any], shard: Shard, index: int, stats: dict[str, Any]) -> bytes:
    """The bytes of shard ``index``: a safetensors file whose one metadata key is its sorted
    JSON self-description (cache meta, row range, ``stats`` of its kept tokens), so a lost
    manifest can be rebuilt exactly (``rebuild_manifest``)."""
    rows, seq = shard["tokens"].shape
    desc = {
        "format": FORMAT,
        "version": VERSION,
        "meta": meta,
        "shard": {
            "index": index,
            "first_row": int(shard["row_index"][0]),
            "n_rows": int(rows),
            "n_tokens": int(rows * seq),
        },
        "stats": stats,
    }
    return st_save(
        dict(sorted(shard.items())), metadata={SHARD_META_KEY: json.dumps(desc, sort_keys=True)}
    )


def shard_entry(index: int, shard: Shard, data: bytes) -> dict[str, Any]:
    """The manifest entry of shard ``index`` written as ``data`` (what
    :func:`_manifest_entry` reads back from the file)."""
    rows, seq = shard["tokens"].shape
    return {
        "file": _shard_name(index),
        "n_rows": int(rows),
        "n_tokens": int(rows * seq),
        "first_row": int(shard["row_index"][0]),
        "bytes": len(data),
        "sha256": _sha256(data),
    }


def manifest_document(
    meta: dict[str, Any],
    shards: list[dict[str, Any]],
    stats: dict[str, Any],
    *,
    complete: bool,
    **extra: Any,
) -> dict[str, Any]:
    """The manifest of a cache: its meta, committed ``shards`` (entries in order), whether it
    is complete, and the running ``stats`` of exactly those shards."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "meta": meta,
        "complete": complete,
        "n_rows": sum(int(s["n_rows"]) for s in shards),
        "n_tokens": sum(s["n_tokens"] for s in shards),
        "shards": shards,
        "stats": stats,
        **extra,
    }
