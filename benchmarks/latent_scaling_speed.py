"""Latent Scaling cost: one-pass all-target LS ÷ encode-only, and the speed-up over the naive
per-latent implementation, measured in one run on a tiny random JumpReLU crosscoder.

    .venv/bin/python benchmarks/latent_scaling_speed.py [--d-in 128 --d-sae 1024 --l0 32 ...]

Prints one line per quantity and a final JSON line. Single-threaded by default (``--threads``)
so that the ratio does not depend on how many cores are free on a shared machine.
"""

from __future__ import annotations

import argparse
import json

import torch

import sae_diff  # noqa: F401  (registers the architectures)
from sae_diff.analysis.latent_scaling_reference import latent_scaling_cost_ratio
from sae_diff.dictionaries.batchtopk_crosscoder import JumpReLUCrosscoder, JumpReLUCrosscoderConfig


def tiny_crosscoder(d_in: int, d_sae: int, l0: float, calib: torch.Tensor) -> JumpReLUCrosscoder:
    """Random JumpReLU crosscoder whose per-latent thresholds give mean L0 ≈ ``l0`` on ``calib``."""
    cfg = JumpReLUCrosscoderConfig(
        d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu", norm_factors=[0.9, 1.1]
    )
    sae = JumpReLUCrosscoder(cfg)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        h = sae.hidden_pre(calib)
        sae.threshold.copy_(h.quantile(1 - l0 / d_sae, dim=0).clamp(min=0))
    return sae


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-in", type=int, default=128)
    p.add_argument("--d-sae", type=int, default=1024)
    p.add_argument("--l0", type=float, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--naive-latents",
        type=int,
        default=64,
        help="time the naive reference on k and 2k latents and extrapolate to all (0: all)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = [torch.randn(args.batch, 2, args.d_in) for _ in range(args.batches)]
    sae = tiny_crosscoder(args.d_in, args.d_sae, args.l0, data[0])
    l0 = float((sae.encode(data[0]) != 0).sum(-1).float().mean())
    out = latent_scaling_cost_ratio(
        sae, data, repeats=args.repeats, naive_latents=args.naive_latents or None
    )
    out.update(
        {
            "d_in": args.d_in,
            "d_sae": args.d_sae,
            "l0": l0,
            "tokens": args.batch * args.batches,
            "threads": args.threads,
        }
    )
    print(
        f"tiny crosscoder d_in={args.d_in} d_sae={args.d_sae} L0={l0:.1f} "
        f"tokens={args.batch * args.batches} threads={args.threads}"
    )
    print(f"encode only           {out['encode_s']:.3f} s")
    print(f"one-pass LS (all)     {out['latent_scaling_s']:.3f} s")
    print(f"LS / encode           {out['ratio']:.2f}  (target <= 1.3; median of per-round ratios)")
    print(f"  codes via sae.encode {out['ratio_dense_codes']:.2f}")
    print(f"naive per-latent      {out['naive_s']:.3f} s")
    print(f"speed-up over naive   {out['naive_speedup']:.1f}x")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
