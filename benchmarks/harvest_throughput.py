"""Harvest and cache-read throughput on a small random model pair (CPU, offline).

Prints, all measured in this one run:

1. paired harvest (both forwards + masks + sharded, checksummed cache writes) vs two bare
   forward passes of the same models over the same tokens, stopping at the same layer
   (the minimum any harvest must do): tokens/s of each and their ratio;
2. cache read (``PairedActivationsStore.from_cache``: verified shard reads, masks, mixing
   buffer) vs training (SAELens ``SAETrainer`` steps of a BatchTopK SAE on that store):
   tokens/s of each and their ratio (> 1: reading is not the bottleneck).

    .venv/bin/python benchmarks/harvest_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_diff.data.harvest import harvest_cache
from sae_diff.data.sources import TensorTokenSource
from sae_diff.data.store import PairedActivationsStore
from sae_diff.pairing.model import PairedModel


def make_pair(n_layers: int, d_model: int, n_ctx: int, d_vocab: int) -> PairedModel:
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_ctx=n_ctx,
        d_head=32,
        n_heads=d_model // 32,
        d_mlp=4 * d_model,
        d_vocab=d_vocab,
        act_fn="gelu",
        normalization_type="LN",
        device="cpu",
        seed=0,
    )
    base = HookedTransformer(cfg)
    ft = HookedTransformer(copy.deepcopy(cfg))
    with torch.no_grad():
        ft.load_state_dict(
            {
                k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                for k, v in base.state_dict().items()
            }
        )
    base.eval()
    ft.eval()
    return PairedModel(base, ft, base_name="bench-base", ft_name="bench-ft")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller run (CI smoke)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # shared machines: one thread gives stable ratios
    n_layers, d_model, ctx = 4, 128, 64
    rows = 64 if args.quick else 128
    batch = 16
    layer = 2
    hook = f"blocks.{layer}.hook_resid_post"
    pair = make_pair(n_layers, d_model, ctx, d_vocab=2048)
    tokens = torch.randint(1, 2048, (rows, ctx))
    tokens[:, 0] = 0
    n_tok = rows * ctx

    with torch.no_grad():  # warm-up
        pair.base(tokens[:batch], stop_at_layer=layer + 1)

    # interleave repetitions to share machine noise fairly; keep the best of each
    bare_s, harvest_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(3):
            t0 = time.perf_counter()
            with torch.no_grad():
                for i in range(0, rows, batch):
                    pair.base(tokens[i : i + batch], stop_at_layer=layer + 1)
                    pair.ft(tokens[i : i + batch], stop_at_layer=layer + 1)
            bare_s.append(time.perf_counter() - t0)
            s = harvest_cache(
                pair,
                TensorTokenSource(tokens),
                f"{tmp}/cache{rep}",
                hook,
                batch_size=batch,
                rows_per_shard=64,
                progress=False,
                verbose=False,
            )
            harvest_s.append(s.seconds)
        bare_tps, harv_tps = n_tok / min(bare_s), n_tok / min(harvest_s)
        print(
            f"model: {n_layers} layers, d_model {d_model}, ctx {ctx}; {n_tok:,} tokens, hook {hook}"
        )
        print(f"two bare forwards (stop_at_layer={layer + 1}): {bare_tps:12,.0f} tokens/s")
        print(f"paired harvest to disk cache           : {harv_tps:12,.0f} tokens/s")
        print(
            f"harvest / bare = {harv_tps / bare_tps:.3f}  (overhead {100 * (1 - harv_tps / bare_tps):.1f}%)"
        )
        print(s)

        # cache read vs training
        cache_dir = f"{tmp}/cache0"
        train_batch = 1024
        store = PairedActivationsStore.from_cache(
            cache_dir, mode="diff", batch_size=train_batch, buffer_size=8 * train_batch
        )
        n_read = 0
        t0 = time.perf_counter()
        while n_read < 2 * n_tok:
            n_read += next(store).shape[0]
        read_tps = n_read / (time.perf_counter() - t0)
        steps = 10 if args.quick else 20
        sae = BatchTopKTrainingSAE(
            BatchTopKTrainingSAEConfig(d_in=d_model, d_sae=4 * d_model, k=32)
        )
        trainer_cfg = SAETrainerConfig(
            total_training_samples=steps * train_batch,
            train_batch_size_samples=train_batch,
            lr=1e-4,
            lr_end=1e-4,
        )
        store2 = PairedActivationsStore.from_cache(
            cache_dir, mode="diff", batch_size=train_batch, buffer_size=8 * train_batch
        )
        t0 = time.perf_counter()
        SAETrainer(trainer_cfg, sae, store2).fit()
        train_tps = steps * train_batch / (time.perf_counter() - t0)
        print(f"cache read (store, diff mode)  : {read_tps:12,.0f} tokens/s")
        print(
            f"SAETrainer (BatchTopK, 4x)     : {train_tps:12,.0f} tokens/s (includes its own reads)"
        )
        print(f"read / train = {read_tps / train_tps:.1f}")


if __name__ == "__main__":
    main()
