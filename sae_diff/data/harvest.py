"""Harvest a paired activation cache: the Python entry (and a deprecated config form and CLI).

    from sae_diff.data.harvest import harvest_cache
    summary = harvest_cache(pair, token_source, "cache/", "blocks.6.hook_resid_post")

    sae-diff harvest --config run.yaml      # a PairedRunnerConfig file: the one config

Forward batches never straddle a shard boundary, so a resumed harvest runs exactly the
same batches as an uninterrupted one and writes byte-identical shards.

Under ``torchrun`` (``torch.distributed`` initialised with more than one process) the harvest
is sharded (:func:`~sae_diff.data.harvest_sharded.harvest_cache_sharded`): rank ``r`` computes
shards ``r, r + W, r + 2W, ...`` into the one cache folder, and rank 0 commits the single
manifest after a barrier. The result is the one-process cache: the same shard files byte for
byte and the same manifest.

:class:`HarvestConfig`, :func:`load_harvest_config`, :func:`harvest_from_config` and
``python -m sae_diff.data.harvest CONFIG`` are deprecated for one release: the one config is
:class:`sae_diff.training.config.PairedRunnerConfig` (:meth:`HarvestConfig.runner_config_fields`
translates a harvest config into it).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_diff import process_group
from sae_diff.data.cache import ActivationCacheWriter
from sae_diff.data.harvest_sharded import harvest_cache_sharded
from sae_diff.data.harvest_summary import HarvestSummary, harvest_meta
from sae_diff.data.shards import indexed_model_shards
from sae_diff.data.sources import DatasetSpec, TokenSource
from sae_diff.data.token_batch import RowSource
from sae_diff.moved import moved_names
from sae_diff.pairing.masks import MaskConfig
from sae_diff.pairing.model import PairedModel


def harvest_cache(
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
    # under torchrun: join the process group (NCCL when the models are on a GPU) and shard
    on_gpu = any(p.is_cuda for p in paired_model.base.parameters())
    if process_group.init("cuda" if on_gpu else "cpu").distributed:
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
    meta = harvest_meta(paired_model, token_source, hook_name, max_rows, mask_config)
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
    t0 = time.perf_counter()
    bar = tqdm(
        total=max_rows,
        initial=start,
        desc=f"harvest {hook_name}",
        unit="seq",
        disable=not progress,
    )
    try:
        # the shards exactly as on-the-fly training computes them (one forward-batch grid that
        # restarts at every shard, one masking); resumed harvests start at a shard boundary
        for _, shard in indexed_model_shards(
            paired_model,
            token_source,
            hook_name,
            batch_size=batch_size,
            rows_per_shard=rows_per_shard,
            mask_config=mask_config,
            dtype=dtype,
            start_row=start,
            stop_row=max_rows,
        ):
            writer.add(
                shard["tokens"],
                shard["acts"],
                {k[5:]: v for k, v in shard.items() if k.startswith("mask_")},
                attention_mask=shard["attention_mask"],
                doc_starts=shard["doc_starts"],
                row_index=shard["row_index"],
            )
            bar.update(int(shard["tokens"].shape[0]))
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


#: what replaces the file form of a harvest (named in every deprecation warning below)
REPLACEMENT = (
    "write a sae_diff.training.config.PairedRunnerConfig file (HarvestConfig.runner_config_fields() "
    "gives its fields) and run `sae-diff harvest --config FILE`"
)


@dataclass
class HarvestConfig:
    """A harvest described in a file (YAML or JSON), for :func:`harvest_from_config`.

    Deprecated (goes in the next release): the one config is
    :class:`sae_diff.training.config.PairedRunnerConfig`, harvested with
    ``sae-diff harvest --config FILE``; :meth:`runner_config_fields` translates this one.
    """

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

    def __post_init__(self) -> None:
        warnings.warn(
            f"HarvestConfig is deprecated and goes in the next release: {REPLACEMENT}.",
            DeprecationWarning,
            stacklevel=3,
        )

    def runner_config_fields(self) -> dict[str, Any]:
        """The equivalent :class:`~sae_diff.training.config.PairedRunnerConfig` fields (add
        ``sae=`` and write them to a config file for ``sae-diff harvest --config FILE``).

        ``proportions`` become each dataset's ``weight`` (the mixture's token shares);
        ``packing`` becomes ``disable_concat_sequences = not packing``. ``max_rows`` becomes
        ``training_tokens = max_rows * context_size`` (``sae-diff harvest`` writes
        ``ceil(training_tokens / context_size)`` rows); ``max_rows=None`` ("until the source
        ends") has no equivalent: a runner config always harvests its training tokens, so
        set ``training_tokens`` yourself. ``overwrite`` is not a config field: pass
        ``sae-diff harvest --overwrite``. Masks not named here (BOS, padding) keep the same
        defaults on both sides.
        """
        if self.proportions is not None and len(self.proportions) != len(self.datasets):
            raise ValueError(
                f"got {len(self.proportions)} proportions for {len(self.datasets)} datasets; "
                "give one per dataset (or none, to use each dataset's weight)."
            )
        mixture = [dict(d) for d in self.datasets]
        if self.proportions is not None:
            mixture = [{**d, "weight": float(p)} for d, p in zip(mixture, self.proportions)]
        fields: dict[str, Any] = {
            "base_model_name": self.base,
            "model_name": self.ft,
            "hook_name": self.hook_name,
            "cache_path": self.out_dir,
            "dataset_mixture": mixture or None,
            "context_size": self.context_size,
            "disable_concat_sequences": not self.packing,
            "store_batch_size_prompts": self.batch_size,
            "cache_rows_per_shard": self.rows_per_shard,
            "cache_dtype": self.dtype,
            "device": self.device,
            "model_backend": self.backend,
            "ft_weights_path": self.ft_path,
            "mask_first_n": self.first_n,
            "mask_high_norm": self.high_norm_ratio,
            "prepend_bos": self.prepend_bos,
            "chat_template_kwargs": self.chat_template_kwargs,
        }
        if self.max_rows is not None:
            fields["training_tokens"] = self.max_rows * self.context_size
        return fields


def load_harvest_config(path: str | os.PathLike[str]) -> HarvestConfig:
    """Read a YAML / JSON harvest config (deprecated with :class:`HarvestConfig`)."""
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
    """Load the pair (unless given) and the datasets of ``cfg``, then :func:`harvest_cache`.

    Deprecated with :class:`HarvestConfig` (the harvest itself is unchanged)."""
    if isinstance(cfg, (str, os.PathLike)):
        cfg = load_harvest_config(cfg)
    elif isinstance(cfg, dict):
        cfg = HarvestConfig(**cfg)
    if not cfg.datasets:
        raise ValueError("the harvest config lists no datasets")
    if paired_model is None:
        process_group.init(
            cfg.device
        )  # under torchrun: device "cuda" is this process's GPU before weights load
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
    """``python -m sae_diff.data.harvest CONFIG``: harvest a cache from a config file
    (deprecated: ``sae-diff harvest --config FILE`` with a runner config)."""
    warnings.warn(
        f"python -m sae_diff.data.harvest is deprecated and goes in the next release: {REPLACEMENT}.",
        DeprecationWarning,
        stacklevel=2,
    )
    parser = argparse.ArgumentParser(
        description="Harvest a paired activation cache (deprecated: use `sae-diff harvest --config FILE`)."
    )
    parser.add_argument("config", help="YAML or JSON HarvestConfig")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    harvest_from_config(args.config, progress=not args.no_progress)
    return 0


__all__ = [
    "HarvestConfig",
    "HarvestSummary",
    "harvest_cache",
    "harvest_cache_sharded",
    "harvest_from_config",
    "load_harvest_config",
    "main",
]

#: moved out of this module (one release; see sae_diff.moved)
__getattr__ = moved_names(__name__, {"commit_sharded_manifest": "sae_diff.data.cache_manifest"})


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
