"""Trainer fidelity: sae_diff's default BatchTopK crosscoder vs the reference trainer.

The reference is crosscoder_learning's ``BatchTopKCrossCoderTrainer`` (its defaults). Both train
on the same cached paired activations, see the same batches in the same order for a given seed,
and are evaluated by the same code on the same data. Prints (and writes as JSON) a table of
dead fraction, FVE per model, inference L0 and the relative-decoder-norm (Δ) histogram, mean and
range over seeds, and the Δ-histogram distance between trainers next to the distance between
seeds of one trainer (the noise level).

    # a cache of the organism (~100k tokens at blocks.2.hook_resid_pre), anywhere outside the repo
    sae-diff harvest --config my_organism.yaml        # cache_path: /tmp/organism_l2
    .venv/bin/python benchmarks/fidelity.py --cache /tmp/organism_l2 --seeds 0 1 2 \\
        [--reference-path /tmp/crosscoder_learning]   # a checkout of the original, if importable

Trainers: ``sae_diff`` (the library's defaults, SAELens's ``SAETrainer`` as the runner uses it);
``reference`` (the original crosscoder_learning code, when ``--reference-path`` is given and it
imports); ``reimpl`` (``benchmarks/reference_crosscoder.py``, our re-statement of it, which
also serves the speed benchmark). Hyper-parameters are the reference's: lr ``2e-4/sqrt(n/2^14)``
with 1000 warm-up steps, Adam (0.9, 0.999), gradient clipping at 1, k_aux = d/2, aux weight 1/32.

Metric definitions (all on raw activations, after folding each trainer's normalisation):
- dead (top-k): latents never selected by the batch top-k in one pass over the data in training
  batches; dead (inference): never active with the exported threshold;
- FVE per model: ``1 - sum ||x - xhat||^2 / sum ||x - mean||^2`` with the inference encoder;
- L0: mean active latents per token with the inference encoder;
- Δ = 0.5((|d^b| - |d^c|)/max + 1) of decoder rows rescaled by one common per-model scalar
  (the reference's normalisation of this data), so both trainers are measured in the same
  space; histogram of the latents alive at inference, 10 bins of 0.1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_crosscoder import (  # noqa: E402
    ReferenceBatchTopKCrosscoder,
    ReferenceConfig,
    ReferenceTrainer,
)


@dataclass
class Affine:
    """A trained crosscoder in one raw-space form: ``p = relu(x W_enc + b_enc)``, inference
    ``f = p * 1[p > theta_p]``, training selection score ``p * s``."""

    W_enc: torch.Tensor  # (m, d, n)
    b_enc: torch.Tensor  # (n,)
    W_dec: torch.Tensor  # (n, m, d)
    b_dec: torch.Tensor  # (m, d)
    s: torch.Tensor  # (n,)
    theta_p: torch.Tensor  # (n,)


def load_cache(path: str) -> torch.Tensor:
    """Kept paired activations ``(N, 2, d)`` of a sae_diff cache, with its own mask config."""
    from sae_diff.data.cache_reader import ActivationCache
    from sae_diff.pairing.masks import MaskConfig

    cache = ActivationCache(path)
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    mc = MaskConfig(**manifest["meta"]["mask_config"])
    return torch.cat(list(cache.iter_blocks(mask_config=mc, shuffle=False))).float()


def batches(acts: torch.Tensor, seed: int, B: int) -> Iterator[torch.Tensor]:
    """Seeded reshuffled epochs of full batches (the same stream for every trainer)."""
    for epoch in itertools.count():
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(acts.shape[0], generator=g)
        for i in range(0, acts.shape[0] - B + 1, B):
            yield acts[perm[i : i + B]]


# ------------------------------------------------------------------------------ trainers
def train_sae_diff(acts: torch.Tensor, seed: int, a: argparse.Namespace) -> Affine:
    from sae_lens.training.sae_trainer import SAETrainer, SAETrainerConfig

    from sae_diff.dictionaries.normalisation import prepare_crosscoder
    from sae_diff.dictionaries.registry import training_config, training_sae
    from sae_diff.training.trainer import use_fused_adam

    d = acts.shape[-1]
    torch.manual_seed(seed)
    sae: Any = training_sae(
        training_config("batchtopk_crosscoder", d_in=d, d_sae=a.n, k=a.k, **a.sae_kw)
    )
    prepare_crosscoder(sae, batches(acts, seed, a.batch), n_batches=10)
    lr = a.lr if a.lr is not None else 2e-4 / math.sqrt(a.n / 2**14)
    tcfg = SAETrainerConfig(
        total_training_samples=a.steps * a.batch,
        train_batch_size_samples=a.batch,
        lr=lr,
        lr_end=lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=a.warmup,
        dead_feature_window=1000,
        feature_sampling_window=2000,
    )
    trainer = SAETrainer(tcfg, sae, batches(acts, seed, a.batch))
    use_fused_adam(trainer)
    trainer.fit()
    with torch.no_grad():
        s = sae.code_scale().detach().clone()
        inf = sae.to_inference()
        return Affine(
            inf.W_enc.detach(),
            inf.b_enc.detach(),
            inf.W_dec.detach(),
            inf.b_dec.detach(),
            s,
            inf.threshold.detach().clone(),
        )


def _fold_reference(
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    s: torch.Tensor,
    theta: float,
) -> Affine:
    """Reference layout (W_enc (m, d, n), W_dec (m, n, d)) on x_n = (x - mu) g -> raw space."""
    W_enc, W_dec, b_enc, b_dec = (t.detach().double() for t in (W_enc, W_dec, b_enc, b_dec))
    mu, g = mean.double(), scale.double()
    W_raw = W_enc * g[:, None, None]
    b_raw = b_enc - torch.einsum("md,mdn->n", mu * g[:, None], W_enc)
    Wd_raw = (W_dec / g[:, None, None]).permute(1, 0, 2)
    bd_raw = b_dec / g[:, None] + mu
    s = s.detach().double().reshape(-1)
    theta_p = max(theta, 0.0) / s.clamp(min=1e-12)
    return Affine(
        W_raw.float(),
        b_raw.float(),
        Wd_raw.contiguous().float(),
        bd_raw.float(),
        s.float(),
        theta_p.float(),
    )


def train_reimpl(acts: torch.Tensor, seed: int, a: argparse.Namespace) -> Affine:
    kw = dict(a.reimpl_kw)
    mean, scale = ReferenceBatchTopKCrosscoder.normalisation_from_data(
        acts, kw.pop("target_rms", 1.0)
    )
    cfg = ReferenceConfig(
        d=acts.shape[-1],
        n=a.n,
        k=a.k,
        steps=a.steps,
        lr=a.lr,
        warmup_steps=a.warmup,
        seed=seed,
        **kw,
    )
    model = ReferenceBatchTopKCrosscoder(cfg, mean, scale)
    trainer = ReferenceTrainer(model)
    for step, x in zip(range(a.steps), batches(acts, seed, a.batch), strict=False):
        trainer.update(step, x)
    return _fold_reference(
        model.W_enc,
        model.b_enc,
        model.W_dec,
        model.b_dec,
        mean,
        scale,
        model.code_scale(),
        float(model.threshold),
    )


def train_reference(acts: torch.Tensor, seed: int, a: argparse.Namespace) -> Affine:
    if a.reference_path not in sys.path:
        sys.path[:0] = [a.reference_path, os.path.join(a.reference_path, "stubs")]
    from dictionary_learning.trainers.crosscoder import BatchTopKCrossCoderTrainer  # type: ignore[import-not-found]

    x64 = acts.double()
    mean, std = x64.mean(0).float(), x64.std(0).float()
    trainer = BatchTopKCrossCoderTrainer(
        steps=a.steps,
        activation_dim=acts.shape[-1],
        dict_size=a.n,
        k=a.k,
        layer=0,
        lm_name="organism",
        lr=a.lr,
        warmup_steps=a.warmup,
        seed=seed,
        device="cpu",
        activation_mean=mean,
        activation_std=std,
        target_rms=1.0,
    )
    for step, x in zip(range(a.steps), batches(acts, seed, a.batch), strict=False):
        trainer.update(step, x.clone())
    ae: Any = trainer.ae
    return _fold_reference(
        ae.encoder.weight,
        ae.encoder.bias,
        ae.decoder.weight,
        ae.decoder.bias,
        ae.activation_mean,
        ae.activation_global_scale,
        ae.get_code_normalization(),
        float(ae.threshold),
    )


TRAINERS = {"sae_diff": train_sae_diff, "reference": train_reference, "reimpl": train_reimpl}


# ------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(
    m: Affine, acts: torch.Tensor, k: int, B: int, common_scale: torch.Tensor
) -> dict[str, Any]:
    n = m.b_enc.shape[0]
    picked = torch.zeros(n, dtype=torch.bool)
    active = torch.zeros(n, dtype=torch.bool)
    err = torch.zeros(2, dtype=torch.float64)
    l0 = 0.0
    mean = acts.double().mean(0)
    var = (acts.double() - mean).pow(2).sum((0, 2))
    for i in range(0, acts.shape[0], B):
        x = acts[i : i + B]
        p = torch.relu(torch.einsum("bmd,mdn->bn", x, m.W_enc) + m.b_enc)
        if x.shape[0] == B:
            v = (p * m.s).flatten()
            idx = v.topk(k * B, sorted=False).indices
            picked[(idx % n)[v[idx] > 0]] = True
        f = p * (p > m.theta_p)
        active |= (f > 0).any(0)
        l0 += float((f > 0).sum())
        xhat = torch.einsum("bn,nmd->bmd", f, m.W_dec) + m.b_dec
        err += (x.double() - xhat.double()).pow(2).sum((0, 2))
    fve = (1 - err / var).tolist()
    norms = (m.W_dec.double() * common_scale.double()[None, :, None]).norm(dim=-1)  # (n, m)
    nb, nc = norms[:, 0], norms[:, 1]
    delta = 0.5 * ((nb - nc) / torch.maximum(nb, nc).clamp(min=1e-12) + 1)
    live = delta[active]
    counts = torch.histc(live, bins=10, min=0.0, max=1.0)
    hist = (counts / counts.sum().clamp(min=1)).tolist()
    return {
        "dead_topk": 1 - float(picked.float().mean()),
        "dead_inference": 1 - float(active.float().mean()),
        "fve_base": fve[0],
        "fve_ft": fve[1],
        "l0": l0 / acts.shape[0],
        "delta_hist": hist,
        "ft_only": float((live < 0.1).float().mean()),
        "shared": float(((live - 0.5).abs() < 0.1).float().mean()),
        "base_only": float((live > 0.9).float().mean()),
    }


def _l1(h1: list[float], h2: list[float]) -> float:
    return sum(abs(a - b) for a, b in zip(h1, h2, strict=True))


def summarise(results: dict[str, list[dict[str, Any]]]) -> str:
    keys = [
        "dead_topk",
        "dead_inference",
        "fve_base",
        "fve_ft",
        "l0",
        "ft_only",
        "shared",
        "base_only",
    ]
    names = list(results)
    lines = [
        "| metric | "
        + " | ".join(f"{t} (mean [min, max], {len(results[t])} seeds)" for t in names)
        + " |",
        "|---|" + "---|" * len(names),
    ]
    for key in keys:
        cells = []
        for t in names:
            vals = [r[key] for r in results[t]]
            cells.append(f"{statistics.mean(vals):.4f} [{min(vals):.4f}, {max(vals):.4f}]")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    for t in names:
        hist = [
            statistics.mean(col) for col in zip(*[r["delta_hist"] for r in results[t]], strict=True)
        ]
        lines.append(f"| Δ hist (0.1 bins) | {t}: " + " ".join(f"{h:.3f}" for h in hist) + " |")
    lines.append("")
    lines.append("Δ-histogram L1 distances (sum |h1 - h2| over bins):")
    for t1, t2 in itertools.combinations_with_replacement(names, 2):
        pairs = [
            (a, b)
            for i, a in enumerate(results[t1])
            for j, b in enumerate(results[t2])
            if (t1 != t2) or (i < j)
        ]
        if pairs:
            ds = [_l1(a["delta_hist"], b["delta_hist"]) for a, b in pairs]
            what = "between seeds" if t1 == t2 else "between trainers"
            lines.append(
                f"- {t1} vs {t2} ({what}): mean {statistics.mean(ds):.3f} [{min(ds):.3f}, {max(ds):.3f}]"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cache", help="a sae_diff activation cache (paired)")
    ap.add_argument("--acts", help="or a torch file holding (N, 2, d) float activations")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--trainers", nargs="+", default=["sae_diff", "reimpl"], choices=sorted(TRAINERS)
    )
    ap.add_argument(
        "--reference-path",
        default=None,
        help="directory holding crosscoder_learning's "
        "dictionary_learning package (adds 'reference' to the trainers)",
    )
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument(
        "--lr", type=float, default=None, help="default: the reference's 2e-4/sqrt(n/2^14)"
    )
    ap.add_argument(
        "--sae-kw", default="{}", help="JSON overrides of sae_diff's config (ablations)"
    )
    ap.add_argument(
        "--reimpl-kw",
        default="{}",
        help="JSON overrides of the re-implementation (ablations, e.g. squared_loss, target_rms)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON file for every per-seed result")
    a = ap.parse_args(argv)
    a.sae_kw = json.loads(a.sae_kw)
    a.reimpl_kw = json.loads(a.reimpl_kw)
    torch.set_num_threads(a.threads)
    if a.reference_path and "reference" not in a.trainers:
        a.trainers.append("reference")
    if "reference" in a.trainers and not a.reference_path:
        ap.error("--trainers reference needs --reference-path")
    if bool(a.cache) == bool(a.acts):
        ap.error("give exactly one of --cache and --acts")
    acts = load_cache(a.cache) if a.cache else torch.load(a.acts, weights_only=True).float()
    if acts.ndim != 3 or acts.shape[1] != 2:
        raise SystemExit(f"expected paired activations (N, 2, d), got {tuple(acts.shape)}")
    _, common_scale = ReferenceBatchTopKCrosscoder.normalisation_from_data(acts)
    print(
        f"data: {acts.shape[0]:,} tokens x 2 x {acts.shape[-1]}; n={a.n} k={a.k} steps={a.steps} "
        f"B={a.batch}; load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results: dict[str, list[dict[str, Any]]] = {t: [] for t in a.trainers}
    for seed in a.seeds:
        for t in a.trainers:
            t0 = time.perf_counter()
            model = TRAINERS[t](acts, seed, a)
            r = evaluate(model, acts, a.k, a.batch, common_scale)
            r.update(seed=seed, seconds=round(time.perf_counter() - t0, 1))
            results[t].append(r)
            print(
                f"{t} seed {seed}: "
                + ", ".join(f"{k}={v:.4f}" for k, v in r.items() if isinstance(v, float)),
                flush=True,
            )
            if a.out:
                Path(a.out).write_text(
                    json.dumps(
                        {"args": {k: v for k, v in vars(a).items()}, "results": results},
                        indent=1,
                        default=str,
                    )
                )
    print()
    print(summarise(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
