"""The activation cache's on-disk format: names, version, dtypes, errors, shard
self-descriptions and running statistics (shared by the writer, the reader and the identity
checks; see :mod:`sae_diff.data.cache` for the layout)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_diff.errors import SaeDiffError

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
