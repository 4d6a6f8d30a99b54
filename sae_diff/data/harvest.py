"""Harvest a paired activation cache: the Python entry, a config form, and a CLI.

    from sae_diff.data.harvest import harvest_cache
    summary = harvest_cache(pair, token_source, "cache/", "blocks.6.hook_resid_post")

    python -m sae_diff.data.harvest harvest.yaml     # or .json; see HarvestConfig

Forward batches never straddle a shard boundary, so a resumed harvest runs exactly the
same batches as an uninterrupted one and writes byte-identical shards.

Under ``torchrun`` (``torch.distributed`` initialised with more than one process) the harvest
is sharded: rank ``r`` computes shards ``r, r + W, r + 2W, ...`` into the one cache folder,
and rank 0 commits the single manifest after a barrier (:func:`harvest_cache_sharded`). The
result is the one-process cache: the same shard files byte for byte and the same manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from sae_diff.data.cache import (
    FORMAT,
    MANIFEST,
    SHARD_GLOB,
    SHARD_META_KEY,
    VERSION,
    ActivationCache,
    ActivationCacheWriter,
    CacheError,
    CacheIdentityError,
    CacheWriteError,
    RunningStats,
    _atomic_write,
    _diff_keys,
    _manifest_entry,
    _sha256,
    _shard_name,
    dtype_name,
    read_shard_description,
)
from sae_diff.data.sources import DatasetSpec, TokenBatch, TokenSource
from sae_diff.pairing.masks import MaskConfig, TokenMasks
from sae_diff.pairing.model import PairedModel


@dataclass
class HarvestSummary:
    """What a harvest did (printed as a plain summary at the end)."""

    out_dir: str
    rows: int
    tokens: int
    shards: int
    bytes: int
    seconds: float
    resumed_from_rows: int = 0

    @property
    def tokens_per_s(self) -> float:
        new_tokens = self.tokens - self.resumed_tokens
        return new_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def resumed_tokens(self) -> int:
        return int(self.resumed_from_rows * (self.tokens / self.rows)) if self.rows else 0

    def __str__(self) -> str:
        resumed = (
            f" (resumed after {self.resumed_from_rows} rows)" if self.resumed_from_rows else ""
        )
        return (
            f"harvest {self.out_dir}: {self.tokens:,} tokens in {self.rows:,} rows, "
            f"{self.shards} shards, {self.bytes / 2**20:.1f} MiB, {self.seconds:.1f} s, "
            f"{self.tokens_per_s:,.0f} tokens/s{resumed}"
        )


def _rebatch(
    batches: Iterator[TokenBatch], batch_size: int, rows_per_shard: int, start_row: int
) -> Iterator[TokenBatch]:
    """Re-cut batches so that none crosses a shard boundary (the batch grid restarts at
    every shard, independently of where a harvest resumed)."""
    pending: list[TokenBatch] = []
    n_pending = 0
    row = start_row

    def take(n: int) -> TokenBatch:
        nonlocal pending, n_pending
        cat = TokenBatch.concat(pending)
        out, rest = cat.select(0, n), cat.select(n, len(cat))
        pending = [rest] if len(rest) else []
        n_pending -= n
        return out

    for b in batches:
        pending.append(b)
        n_pending += len(b)
        while True:
            want = min(batch_size, rows_per_shard - row % rows_per_shard)
            if n_pending < want:
                break
            out = take(want)
            row += want
            yield out
    while n_pending:
        want = min(batch_size, rows_per_shard - row % rows_per_shard, n_pending)
        out = take(want)
        row += want
        yield out


def harvest_cache(
    paired_model: PairedModel,
    token_source: Any,
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
    """Run both models over ``token_source`` and write ``hook_name`` to a sharded cache.

    Args:
        paired_model: the model pair.
        token_source: a :class:`~sae_diff.data.sources.TokenSource` (or anything with
            ``batches(batch_size, start_row, stop_row)`` and ``describe()``).
        out_dir: cache folder; an unfinished cache there with the same configuration is
            resumed after its last committed shard.
        hook_name: the hook to store, e.g. ``"blocks.6.hook_resid_post"``.
        batch_size: rows per forward pass.
        rows_per_shard: rows per shard file.
        dtype: activation storage dtype (``"float32"``, ``"bfloat16"``, ``"float16"``).
        mask_config: mask settings recorded with the cache (high-norm ratio, first n).
        max_rows: stop after this many rows (None: until the source ends).
        overwrite: start again even if ``out_dir`` holds a cache.
        progress: show a progress bar; verbose: print the summary.
    """
    from sae_diff.training import distributed

    # under torchrun: join the process group (NCCL when the models are on a GPU) and shard
    on_gpu = any(p.is_cuda for p in paired_model.base.parameters())
    if distributed.init("cuda" if on_gpu else "cpu").distributed:
        return harvest_cache_sharded(
            paired_model,
            token_source,
            out_dir,
            hook_name,
            batch_size=batch_size,
            rows_per_shard=rows_per_shard,
            dtype=dtype,
            mask_config=mask_config,
            max_rows=max_rows,
            overwrite=overwrite,
            progress=progress,
            verbose=verbose,
        )
    paired_model.validate_hooks([hook_name])
    mask_config = mask_config or MaskConfig()
    meta = _harvest_meta(paired_model, token_source, hook_name, max_rows, mask_config)
    writer = ActivationCacheWriter(
        out_dir,
        meta,
        rows_per_shard=rows_per_shard,
        d_model=paired_model.d_model,
        dtype=dtype,
        mask_config=mask_config,
        overwrite=overwrite,
    )
    start = writer.rows_done
    chat = meta["is_chat"]
    tok = paired_model.tokenizer
    t0 = time.perf_counter()
    bar = tqdm(
        total=max_rows,
        initial=start,
        desc=f"harvest {hook_name}",
        unit="seq",
        disable=not progress,
    )
    try:
        for batch in _rebatch(
            token_source.batches(batch_size, start_row=start, stop_row=max_rows),
            batch_size,
            rows_per_shard,
            start,
        ):
            # padded rows (left or right) run with their attention mask, so real tokens get
            # the activations of the unpadded sequence; the padding mask drops the rest
            am = batch.attention_mask
            acts = paired_model.paired_activations(
                batch.tokens, [hook_name], attention_mask=None if bool(am.all()) else am
            )[hook_name]
            masks = batch.masks(tok, config=mask_config, chat=chat)
            writer.add(
                batch.tokens,
                acts,
                masks,
                attention_mask=batch.attention_mask,
                doc_starts=batch.doc_starts,
                row_index=batch.row_index,
            )
            bar.update(len(batch))
        writer.close()
    finally:
        bar.close()
        writer.shutdown()  # an interrupted harvest still finishes (or reports) its queued shards
    seconds = time.perf_counter() - t0
    total_rows = writer.rows_done
    summary = HarvestSummary(
        out_dir=str(out_dir),
        rows=total_rows,
        tokens=sum(s["n_tokens"] for s in writer.shards),
        shards=len(writer.shards),
        bytes=sum(s["bytes"] for s in writer.shards),
        seconds=seconds,
        resumed_from_rows=start,
    )
    if verbose:
        print(summary)
    return summary


def _harvest_meta(
    paired_model: PairedModel,
    token_source: Any,
    hook_name: str,
    max_rows: int | None,
    mask_config: MaskConfig,
) -> dict[str, Any]:
    """What a harvest records about itself (the writer adds dtype, width and shard size)."""
    return {
        "models": paired_model.describe(),
        "hook_name": hook_name,
        "source": token_source.describe(),
        "max_rows": max_rows,
        "mask_config": asdict(mask_config),
        "is_chat": bool(getattr(token_source, "is_chat", False)),
    }


def _cache_meta(
    meta: dict[str, Any], dtype: str | torch.dtype, d_model: int, rows_per_shard: int
) -> dict[str, Any]:
    """The manifest ``meta`` exactly as ``ActivationCacheWriter`` stores it."""
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


def _shard_file(
    meta: dict[str, Any], shard: dict[str, torch.Tensor], index: int, high_norm_ratio: float
) -> tuple[bytes, RunningStats]:
    """The bytes ``ActivationCacheWriter`` writes for ``shard`` at ``index`` (the
    self-describing safetensors file) and the shard's statistics (tokens kept by the default
    masks). ``shard`` already carries its whole-shard high-norm mask (``model_shards``)."""
    masks = TokenMasks.from_dict({k[5:]: v for k, v in shard.items() if k.startswith("mask_")})
    keep = MaskConfig(first_n=0, only_assistant=False, high_norm_ratio=high_norm_ratio).keep(masks)
    stats = RunningStats(2, int(meta["d_model"]))
    stats.update(shard["acts"][keep])
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
        "stats": stats.to_json(),
    }
    data = st_save(
        dict(sorted(shard.items())), metadata={SHARD_META_KEY: json.dumps(desc, sort_keys=True)}
    )
    return data, stats


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
    shards: list[dict[str, Any]] = []
    stats = RunningStats(2, int(meta["d_model"]))
    row = 0
    for i, p in enumerate(files):
        desc = read_shard_description(p)
        s = desc["shard"]
        if (
            p.name != _shard_name(i)
            or s["index"] != i
            or s["first_row"] != row
            or desc["meta"] != meta
        ):
            raise CacheError(
                f"cannot commit {folder / MANIFEST}: expected {_shard_name(i)} of this harvest starting at row "
                f"{row}, found {p.name} (shard {s['index']}, first row {s['first_row']}"
                f"{', another configuration' if desc['meta'] != meta else ''}). A rank did not finish; rerun "
                "the same sharded harvest to resume it."
            )
        entry = (known or {}).get(p.name)
        if entry is None or int(entry["bytes"]) != p.stat().st_size:
            entry = _manifest_entry(p, desc)
        shards.append(dict(entry))
        stats.merge(RunningStats.from_json(desc["stats"]))
        row += int(s["n_rows"])
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "meta": meta,
        "complete": True,
        "n_rows": row,
        "n_tokens": sum(s["n_tokens"] for s in shards),
        "shards": shards,
        "stats": stats.to_json(),
    }
    _atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def harvest_cache_sharded(
    paired_model: PairedModel,
    token_source: Any,
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
    import torch.distributed as dist

    from sae_diff.data.store import indexed_model_shards
    from sae_diff.training.distributed import barrier, on_main, world

    w = world()
    paired_model.validate_hooks([hook_name])
    mask_config = mask_config or MaskConfig()
    meta = _cache_meta(
        _harvest_meta(paired_model, token_source, hook_name, max_rows, mask_config),
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
                data, _ = _shard_file(meta, shard, index, mask_config.high_norm_ratio)
                try:
                    _atomic_write(folder / _shard_name(index), data)
                except OSError as e:
                    raise CacheWriteError(
                        f"rank {w.rank}: writing {folder / _shard_name(index)} failed ({e}); the shards on "
                        "disk stay valid. Free space (or fix permissions) and rerun the same harvest to "
                        "resume."
                    ) from e
                entries[_shard_name(index)] = {
                    "file": _shard_name(index),
                    "n_rows": int(shard["tokens"].shape[0]),
                    "n_tokens": int(shard["tokens"].numel()),
                    "first_row": int(shard["row_index"][0]),
                    "bytes": len(data),
                    "sha256": _sha256(data),
                }
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


@dataclass
class HarvestConfig:
    """A harvest described in a file (YAML or JSON), for :func:`harvest_from_config`."""

    base: str
    ft: str
    hook_name: str
    out_dir: str
    datasets: list[dict[str, Any]] = field(default_factory=list)
    context_size: int = 128
    packing: bool = True
    proportions: list[float] | None = None
    batch_size: int = 8
    rows_per_shard: int = 256
    dtype: str = "float32"
    max_rows: int | None = None
    device: str = "cpu"
    backend: str = "auto"
    ft_path: str | None = None
    first_n: int = 0
    high_norm_ratio: float = 10.0
    overwrite: bool = False
    #: None: BOS exactly when the tokenizer has one (no fake BOS for Qwen-style tokenizers)
    prepend_bos: bool | None = None
    #: extra chat-template variables, e.g. {"enable_thinking": False}
    chat_template_kwargs: dict[str, Any] | None = None


def load_harvest_config(path: str | os.PathLike[str]) -> HarvestConfig:
    """Read a YAML / JSON harvest config."""
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        raw = yaml.safe_load(text)
    else:
        raw = json.loads(text)
    try:
        return HarvestConfig(**raw)
    except TypeError as e:
        raise ValueError(f"bad harvest config {path}: {e}") from e


def harvest_from_config(
    cfg: HarvestConfig | dict[str, Any] | str | os.PathLike[str],
    *,
    paired_model: PairedModel | None = None,
    progress: bool = True,
) -> HarvestSummary:
    """Load the pair (unless given) and the datasets of ``cfg``, then :func:`harvest_cache`."""
    if isinstance(cfg, (str, os.PathLike)):
        cfg = load_harvest_config(cfg)
    elif isinstance(cfg, dict):
        cfg = HarvestConfig(**cfg)
    if not cfg.datasets:
        raise ValueError("the harvest config lists no datasets")
    if paired_model is None:
        from sae_diff.training.distributed import init

        init(cfg.device)  # under torchrun: device "cuda" is this process's GPU before weights load
        paired_model = PairedModel.from_pretrained(
            cfg.base,
            cfg.ft,
            device=cfg.device,
            hf_model_path_or_local_dir=cfg.ft_path,
            backend=cfg.backend,  # type: ignore[arg-type]
        )
    source = TokenSource(
        [DatasetSpec(**d) for d in cfg.datasets],
        paired_model.tokenizer,
        cfg.context_size,
        proportions=cfg.proportions,
        packing=cfg.packing,
        prepend_bos=cfg.prepend_bos,
        chat_template_kwargs=cfg.chat_template_kwargs,
    )
    return harvest_cache(
        paired_model,
        source,
        cfg.out_dir,
        cfg.hook_name,
        batch_size=cfg.batch_size,
        rows_per_shard=cfg.rows_per_shard,
        dtype=cfg.dtype,
        mask_config=MaskConfig(first_n=cfg.first_n, high_norm_ratio=cfg.high_norm_ratio),
        max_rows=cfg.max_rows,
        overwrite=cfg.overwrite,
        progress=progress,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m sae_diff.data.harvest CONFIG``: harvest a cache from a config file."""
    parser = argparse.ArgumentParser(description="Harvest a paired activation cache.")
    parser.add_argument("config", help="YAML or JSON HarvestConfig")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    harvest_from_config(args.config, progress=not args.no_progress)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
