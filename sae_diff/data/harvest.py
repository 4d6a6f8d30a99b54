"""Harvest a paired activation cache: the Python entry, a config form, and a CLI.

    from sae_diff.data.harvest import harvest_cache
    summary = harvest_cache(pair, token_source, "cache/", "blocks.6.hook_resid_post")

    python -m sae_diff.data.harvest harvest.yaml     # or .json; see HarvestConfig

Forward batches never straddle a shard boundary, so a resumed harvest runs exactly the
same batches as an uninterrupted one and writes byte-identical shards.
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
from tqdm.auto import tqdm

from sae_diff.data.cache import ActivationCacheWriter
from sae_diff.data.sources import DatasetSpec, TokenBatch, TokenSource
from sae_diff.pairing.masks import MaskConfig
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
    paired_model.validate_hooks([hook_name])
    mask_config = mask_config or MaskConfig()
    source_desc = token_source.describe()
    meta = {
        "models": paired_model.describe(),
        "hook_name": hook_name,
        "source": source_desc,
        "max_rows": max_rows,
        "mask_config": asdict(mask_config),
        "is_chat": bool(getattr(token_source, "is_chat", False)),
    }
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
