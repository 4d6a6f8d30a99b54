"""Reading an activation cache: :class:`ActivationCache` (verified shards, batches,
statistics). The format is :mod:`sae_diff.data.cache_format`; writing is :mod:`sae_diff.data.cache`."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load

from sae_diff.data.cache_format import (
    DTYPES,
    FORMAT,
    MANIFEST,
    REQUIRED_TENSORS,
    SHARD_GLOB,
    VERSION,
    CacheError,
    RunningStats,
    _sha256,
)
from sae_diff.pairing.masks import MaskConfig, TokenMasks


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
                    f"sae_diff.data.cache_manifest.rebuild_manifest({str(self.dir)!r}). Nothing was deleted."
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
                "sae_diff.data.cache_manifest.rebuild_manifest) to rebuild it; no shard is touched."
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
        if (
            tokens.dim() != 2
            or tokens.shape[0] != rows
            or (acts.dim() == 4 and tuple(tokens.shape) != tuple(acts.shape[:2]))
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
