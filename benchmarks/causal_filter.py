"""Causal filter cost: ``intervention_kl`` on the full forward per latent (the implementation
before the split) ÷ the split forward (layers before the hook once per batch, the rest per
latent), measured in one run on the bundled organism's fine-tune, with the quick demo's sizes
(20 candidates + 20 random latents, 6 held-out conversations per behaviour).

    .venv/bin/python benchmarks/causal_filter.py [--latents 40 --n-eval 6 --reps 5 ...]

The full-forward variant is the module's own path for hooks it cannot split at (chosen here by
making ``_split_layer`` answer None), so both sides compute the same thing; the script checks
that they agree and prints max |Δ|. Repetitions of the two are interleaved and summarised by
medians so that load from other processes hits both alike. Single-threaded by default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

from sae_diff.analysis import causal_filter as cf
from sae_diff.dictionaries.io import as_inference
from sae_diff.organisms import load_organism


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--organism", default="default")
    p.add_argument("--latents", type=int, default=40)
    p.add_argument("--n-eval", type=int, default=6, help="conversations per behaviour")
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--mode", default="ablate", choices=list(cf.MODES))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    org = load_organism(args.organism)
    model, hook = org.ft, org.recommended_hook
    d_model = int(model.cfg.d_model)
    sae: Any = as_inference(
        BatchTopKTrainingSAE(
            BatchTopKTrainingSAEConfig(d_in=d_model, d_sae=args.expansion * d_model, k=16)
        )
    )
    _, tokens, valid, assistant = org.eval_batch(n=args.n_eval)
    mask = assistant.bool() & valid.bool()
    latents = list(range(args.latents))

    def run() -> torch.Tensor:
        return cf.intervention_kl(model, sae, tokens, latents, mask, hook_name=hook, mode=args.mode)

    split_layer = cf._split_layer
    layer = split_layer(model, hook)

    def full() -> torch.Tensor:
        cf._split_layer = lambda *_: None  # type: ignore[assignment]  # the full-forward path
        try:
            return run()
        finally:
            cf._split_layer = split_layer

    run()  # warm-up
    t_full, t_split, delta = [], [], 0.0
    for _ in range(args.reps):
        a, kl_full = timed(full)
        b, kl_split = timed(run)
        t_full.append(a)
        t_split.append(b)
        delta = max(delta, float((kl_full - kl_split).abs().max()))
    out = {
        "full_s": statistics.median(t_full),
        "split_s": statistics.median(t_split),
        "ratio": statistics.median(a / b for a, b in zip(t_full, t_split, strict=True)),
        "max_abs_delta": delta,
        "hook": hook,
        "split_layer": layer,
        "n_layers": int(model.cfg.n_layers),
        "d_model": d_model,
        "tokens": list(tokens.shape),
        "latents": args.latents,
        "mode": args.mode,
        "threads": args.threads,
        "load_avg": list(os.getloadavg()),
    }
    print(
        f"{args.organism} ft: {out['n_layers']} layers, d_model {d_model}; hook {hook} "
        f"(split layer {layer}); tokens {tuple(tokens.shape)}; {args.latents} latents; "
        f"{args.mode}; threads {args.threads}; load {os.getloadavg()[0]:.1f}"
    )
    print(f"full forward per latent  {out['full_s']:.3f} s")
    print(f"split forward            {out['split_s']:.3f} s")
    print(f"ratio full / split       {out['ratio']:.2f}  (median of per-repetition ratios)")
    print(f"max |Δ KL|               {delta:.3g}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
