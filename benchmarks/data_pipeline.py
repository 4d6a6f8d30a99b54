"""The one data pipeline: training on the fly vs from a cache, bf16 vs fp32 cache reads.

On the bundled organism (4 layers, d = 128, its text + chat corpus, offline), all measured
in this one run, interleaved (each measurement ``--repeats`` times, alternating, median):

1. **on-the-fly ÷ cached training throughput**: SAELens ``SAETrainer`` steps of a BatchTopK
   crosscoder fed by ``PairedActivationsStore.from_model`` (both forwards inside the loop, no
   disk) vs ``PairedActivationsStore.from_cache`` on a cache harvested beforehand (harvest
   time reported apart). Tokens trained per second.
2. **bf16 ÷ fp32 cache read throughput**: the store draining paired batches (shard reads,
   masks, shuffling buffer, exact upcast to float32) from a bfloat16 cache vs a float32
   cache of the same tokens; also the bytes on disk.

    .venv/bin/python benchmarks/data_pipeline.py [--quick] [--device cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer

from sae_diff.data.cache_reader import ActivationCache
from sae_diff.data.harvest import harvest_cache
from sae_diff.data.sources import TokenSource
from sae_diff.data.store import PairedActivationsStore
from sae_diff.dictionaries.registry import training_config, training_sae
from sae_diff.organisms import load_organism
from sae_diff.pairing.masks import MaskConfig


def timed(fn: Callable[[], Any], results: list[float]) -> None:
    """Append ``fn``'s wall time to ``results``."""
    t0 = time.perf_counter()
    fn()
    results.append(time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows and steps")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    org = load_organism("default", device=args.device)
    pair = org.paired()
    hook = org.recommended_hook
    rows = 96 if args.quick else 256
    ctx = 128
    rows_per_shard, fwd, batch = 32, 16, 512
    steps = 24 if args.quick else 64
    masks = MaskConfig()

    def source() -> TokenSource:
        return TokenSource(
            [
                org.pretraining_dataset("train", n=400, seed=0),
                org.chat_dataset("train", n=400, seed=0),
            ],
            org.tokenizer,
            ctx,
            proportions=[0.5, 0.5],
            max_rows=rows,
        )

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        caches = {}
        for dtype in ("float32", "bfloat16"):
            t0 = time.perf_counter()
            harvest_cache(
                pair,
                source(),
                Path(tmp) / dtype,
                hook,
                batch_size=fwd,
                rows_per_shard=rows_per_shard,
                dtype=dtype,
                mask_config=masks,
                max_rows=rows,
                progress=False,
                verbose=False,
            )
            if dtype == "float32":  # (includes the first tokenisation of the corpus)
                out["harvest_tokens_per_s"] = rows * ctx / (time.perf_counter() - t0)
            caches[dtype] = ActivationCache(Path(tmp) / dtype)
        out["bf16_bytes_over_fp32_bytes"] = caches["bfloat16"].nbytes / caches["float32"].nbytes

        common = {
            "mode": "paired",
            "batch_size": batch,
            "buffer_size": 8 * batch,
            "seed": 0,
            "device": args.device,
        }

        def train(store: PairedActivationsStore) -> None:
            torch.manual_seed(0)
            sae = training_sae(
                training_config(
                    "batchtopk_crosscoder", d_in=pair.d_model, d_sae=8 * pair.d_model, k=16
                )
            )
            cfg = SAETrainerConfig(
                total_training_samples=steps * batch,
                train_batch_size_samples=batch,
                lr=1e-3,
                lr_end=1e-3,
                device=args.device,
            )
            SAETrainer(cfg, sae.to(args.device), store).fit()

        def cached() -> None:
            train(PairedActivationsStore.from_cache(caches["float32"], mask_config=masks, **common))

        def on_the_fly() -> None:
            train(
                PairedActivationsStore.from_model(
                    pair,
                    source(),
                    hook,
                    store_batch_size_prompts=fwd,
                    rows_per_shard=rows_per_shard,
                    mask_config=masks,
                    stop_row=rows,
                    **common,
                )
            )

        n_read = 4 * caches["float32"].n_tokens  # several epochs

        def read(dtype: str) -> Callable[[], None]:
            def go() -> None:
                store = PairedActivationsStore.from_cache(
                    caches[dtype], mask_config=masks, **common
                )
                n = 0
                while n < n_read:
                    n += next(store).shape[0]

            return go

        times: dict[str, list[float]] = {k: [] for k in ("cached", "fly", "fp32", "bf16")}
        for _ in range(args.repeats):  # interleaved
            timed(cached, times["cached"])
            timed(on_the_fly, times["fly"])
            timed(read("float32"), times["fp32"])
            timed(read("bfloat16"), times["bf16"])
    med = {k: statistics.median(v) for k, v in times.items()}
    out["train_cached_tokens_per_s"] = steps * batch / med["cached"]
    out["train_on_the_fly_tokens_per_s"] = steps * batch / med["fly"]
    out["on_the_fly_over_cached"] = med["cached"] / med["fly"]
    out["read_fp32_tokens_per_s"] = n_read / med["fp32"]
    out["read_bf16_tokens_per_s"] = n_read / med["bf16"]
    out["bf16_read_over_fp32_read"] = med["fp32"] / med["bf16"]
    print(
        f"data pipeline (organism d={pair.d_model}, ctx {ctx}, {rows} rows, batch {batch}, {steps} steps, "
        f"{args.threads} thread(s), {args.device}, median of {args.repeats} interleaved)"
    )
    for k, v in out.items():
        print(f"  {k:32s} {v:14,.3f}")
    return out


if __name__ == "__main__":
    main()
