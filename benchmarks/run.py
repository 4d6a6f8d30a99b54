"""sae_diff benchmark suite (``make bench``): every figure is a ratio measured in this run.

    .venv/bin/python benchmarks/run.py [--quick] [--device cuda] [--name NAME] [--reps N]

Writes ``benchmarks/results/<name>.json`` (machine, torch, threads, load, every timing) and
``benchmarks/results/<name>.md`` (the table, also printed). Timings of the compared variants
are interleaved repetition by repetition and summarised by their medians, so that load from
other processes on a shared machine hits both sides of a ratio alike.

Figures (docs/performance.md explains each):
- training step: dense reference (dense encode, flat top-k, dense decode, SAELens's Adam)
  ÷ ours (sparse kernels + fused Adam)           goal >= 4 (speed-up)
- crosscoder_learning's BatchTopKCrossCoderTrainer step (benchmarks/reference_crosscoder.py)
  ÷ sae_diff's BatchTopK crosscoder step (SAELens's SAETrainer step, fused Adam), on a quiet
  machine and with a competing CPU-bound process started by the suite   goal >= 5 / >= 4
- our step ÷ one fp32 encoder matmul (B x D @ D x n, preallocated output)   goal <= 2.0
- bf16-autocast step ÷ fp32 step                 goal <= 0.7
- BatchTopK selection ÷ flat torch.topk          goal <= 0.15
- diff-SAE training step (BatchTopKDiffSAETraining): sparse_kernels=True ÷ False
  (same SAE class, same fused Adam; only the training forward/backward differs)
- all-target Latent Scaling ÷ encode-only        goal <= 1.3   (sae_diff.analysis)
- paired harvest ÷ two bare forwards (time)      goal <= 1.1   (benchmarks/harvest_throughput.py)
- cache read throughput ÷ training throughput    goal >= 20
- peak memory of a step (measured vs formula)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

# On CPU, PyTorch's allocator can request transparent huge pages for large buffers
# (read once at start-up); page faults on the fresh 100 MB gradient buffers of every step
# otherwise cost several passes over them on a VM. Re-exec with it unless told not to.
if (
    __name__ == "__main__"
    and "--no-thp" not in sys.argv
    and "cuda" not in " ".join(sys.argv)
    and os.environ.get("THP_MEM_ALLOC_ENABLE") is None
):
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402

sys.path.insert(0, str(ROOT))
from sae_diff.dictionaries import kernels  # noqa: E402


@dataclass
class Config:
    """One benchmark size: ``D = n_models * d_model`` input, ``n`` latents, mean L0 ``k``."""

    name: str
    n_models: int
    d_model: int
    n: int
    k: int
    B: int

    @property
    def D(self) -> int:
        return self.n_models * self.d_model


LARGE = Config("large (D=2x768, n=16384, k=32, B=1024)", 2, 768, 16384, 32, 1024)
SMALL = Config("small (D=2x128, n=2048, k=16, B=1024)", 2, 128, 2048, 16, 1024)
GEMMA = Config("gemma-2-2b (D=2x2304, n=73728, k=100, B=4096)", 2, 2304, 73728, 100, 4096)
# a diff-SAE reads one model's width
DIFF_LARGE = Config("diff-large (D=768, n=16384, k=32, B=1024)", 1, 768, 16384, 32, 1024)
DIFF_SMALL = Config("diff-small (D=128, n=2048, k=16, B=1024)", 1, 128, 2048, 16, 1024)
SECTIONS = ("crosscoder", "reference", "diff_sae", "latent_scaling", "harvest")


# ------------------------------------------------------------------------------------ setup


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Dictionary:
    """A flattened crosscoder (W_enc (D, n), W_dec (n, D)) with its optimiser."""

    def __init__(self, cfg: Config, device: torch.device, seed: int, fused: bool) -> None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        w = torch.empty(cfg.n, cfg.D).uniform_(-1, 1, generator=g)
        w = w / w.norm(dim=1, keepdim=True) * 0.1
        self.cfg = cfg
        self.W_dec = torch.nn.Parameter(w.to(device))
        self.W_enc = torch.nn.Parameter(w.t().contiguous().to(device))
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.n, device=device))
        self.b_dec = torch.nn.Parameter(torch.zeros(cfg.D, device=device))
        params = [self.W_enc, self.b_enc, self.W_dec, self.b_dec]
        if fused:
            self.opt = kernels.make_adam(params, lr=1e-5)
        else:  # what SAELens's SAETrainer constructs
            self.opt = torch.optim.Adam(params, lr=1e-5, betas=(0.9, 0.999))
        self.theta = -1.0

    def scale(self) -> torch.Tensor:
        """Crosscoder code normalisation ``s_j = sum_m ||d_j^m||`` (no grad)."""
        with torch.no_grad():
            c = self.cfg
            return self.W_dec.view(c.n, c.n_models, c.d_model).norm(dim=-1).sum(-1)


def sparse_step(m: Dictionary, x: torch.Tensor, autocast: bool = False) -> float:
    """Our training step: sparse kernels (+ bf16 autocast of the encoder matmul), fused Adam."""
    dev = x.device.type
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
        out = kernels.sparse_batchtopk_encode_decode(
            x,
            m.W_enc,
            m.b_enc,
            m.W_dec,
            m.b_dec,
            m.cfg.k,
            scale=m.scale(),
            threshold_hint=m.theta if m.theta > 0 else None,
        )
        loss = (out.xhat.float() - x).pow(2).sum(-1).mean()
    loss.backward()
    m.opt.step()
    m.opt.zero_grad(set_to_none=True)
    mk = out.min_positive_kept_score
    m.theta = mk if m.theta < 0 else 0.999 * m.theta + 0.001 * mk
    return float(loss.detach())


def dense_step(m: Dictionary, x: torch.Tensor) -> float:
    """The faithful dense reference step, as public trainers do it (SAELens BatchTopK)."""
    pre = x @ m.W_enc + m.b_enc
    acts = pre.relu()
    s = m.scale()
    v = acts * s  # selection scores (gradients through s cancel in SAELens; detached here)
    top = torch.topk(v.flatten(), m.cfg.k * x.shape[0], dim=-1)
    f = torch.zeros_like(v.flatten()).scatter(-1, top.indices, top.values).view_as(v) / s
    xhat = f @ m.W_dec + m.b_dec
    loss = (xhat - x).pow(2).sum(-1).mean()
    loss.backward()
    m.opt.step()
    m.opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _timeit(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


# ------------------------------------------------------------------------- step benchmarks


def bench_config(
    cfg: Config, device: torch.device, reps: int, with_ref: bool = True
) -> dict[str, Any]:
    """Interleaved timings of ours / reference / matmul / bf16 / selection for one config."""
    torch.manual_seed(0)
    x = torch.randn(cfg.B, cfg.D, device=device)
    ours = Dictionary(cfg, device, 0, fused=True)
    ours_bf16 = Dictionary(cfg, device, 0, fused=True)
    ref = Dictionary(cfg, device, 0, fused=False) if with_ref else None
    out_buf = torch.empty(cfg.B, cfg.n, device=device)
    K = cfg.B * cfg.k

    def matmul() -> None:
        torch.addmm(ours.b_enc.detach(), x, ours.W_enc.detach(), out=out_buf)

    with torch.no_grad():
        pre = torch.addmm(ours.b_enc, x, ours.W_enc)
        s = ours.scale()
        v = pre.relu() * s

    def sel_ours() -> None:
        kernels.batch_topk(pre, K, scale=s)

    def sel_flat() -> None:
        torch.topk(v.flatten(), K, sorted=False)

    # correctness spot check of the selection at this size
    a = kernels.batch_topk(pre, K, scale=s)
    b = torch.topk(v.flatten(), K, sorted=False).indices
    selection_exact = set((a.row * cfg.n + a.col).tolist()) == set(b.tolist())

    # warm-up (allocations, lazy init, the threshold hint)
    for _ in range(2):
        sparse_step(ours, x)
        sparse_step(ours_bf16, x, autocast=True)
        if ref is not None:
            dense_step(ref, x)
        matmul()
        sel_ours()
        sel_flat()
    # same loss on the same weights? (one fresh pair, one step)
    chk_a, chk_b = Dictionary(cfg, device, 1, True), Dictionary(cfg, device, 1, False)
    loss_a, loss_b = sparse_step(chk_a, x), dense_step(chk_b, x)
    del chk_a, chk_b

    t: dict[str, list[float]] = {k: [] for k in ["ours", "ref", "matmul", "bf16", "sel", "flat"]}
    for _ in range(reps):
        t["matmul"].append(_timeit(matmul, device))
        t["ours"].append(_timeit(lambda: sparse_step(ours, x), device))
        if ref is not None:
            t["ref"].append(_timeit(lambda: dense_step(ref, x), device))
        t["bf16"].append(_timeit(lambda: sparse_step(ours_bf16, x, autocast=True), device))
        t["sel"].append(_timeit(sel_ours, device))
        t["flat"].append(_timeit(sel_flat, device))
    med = {k: _med(v) for k, v in t.items() if v}
    res: dict[str, Any] = {
        "config": cfg.__dict__ | {"D": cfg.D},
        "times_s": t,
        "median_s": med,
        "tokens_per_s_ours": cfg.B / med["ours"],
        "tokens_per_s_bf16": cfg.B / med["bf16"],
        "speedup_vs_dense": med["ref"] / med["ours"] if "ref" in med else None,
        "step_over_matmul": med["ours"] / med["matmul"],
        "bf16_over_fp32": med["bf16"] / med["ours"],
        "selection_over_flat_topk": med["sel"] / med["flat"],
        "selection_exact": selection_exact,
        "loss_sparse_vs_dense_first_step": [loss_a, loss_b],
        "flops_per_token": {
            "dense": 10 * cfg.D * cfg.n,
            "sparse": 2 * cfg.D * cfg.n + 8 * cfg.k * cfg.D,
        },
    }
    if "ref" in med:
        res["tokens_per_s_ref"] = cfg.B / med["ref"]
    return res


# ------------------------------------------------------------- vs crosscoder_learning's step

_COMPETITOR = (
    "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a @ a\n"
)


def bench_vs_reference(cfg: Config, device: torch.device, reps: int) -> dict[str, Any]:
    """sae_diff's BatchTopK crosscoder step vs crosscoder_learning's, quiet and contended.

    Ours: ``BatchTopKCrosscoderTraining`` with its defaults, one ``SAETrainer._train_step`` (the
    runner's step: forward, SAELens's firing statistics, backward, gradient clipping, fused Adam,
    LR schedulers). Reference: ``benchmarks/reference_crosscoder.py``'s ``ReferenceTrainer.update``
    (normalise, dense einsum encode, flat top-k, threshold EMA, dense decode, unsquared-norm loss,
    aux-K bookkeeping, clipping, Adam, schedule), past its threshold warm-up. Both at the same
    size on the same batch, timed interleaved; then the same again while one CPU-bound process
    (a single-threaded 512x512 matmul loop) started here competes for the cores.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from reference_crosscoder import (  # type: ignore[import-not-found]
        ReferenceBatchTopKCrosscoder,
        ReferenceConfig,
        ReferenceTrainer,
    )
    from sae_lens.training.sae_trainer import SAETrainer, SAETrainerConfig

    from sae_diff.dictionaries.batchtopk_crosscoder import (
        BatchTopKCrosscoderTraining,
        BatchTopKCrosscoderTrainingConfig,
    )
    from sae_diff.training.trainer import use_fused_adam

    torch.manual_seed(0)
    x = torch.randn(cfg.B, cfg.n_models, cfg.d_model, device=device)
    sae = BatchTopKCrosscoderTraining(
        BatchTopKCrosscoderTrainingConfig(
            d_in=cfg.d_model, d_sae=cfg.n, k=cfg.k, n_models=cfg.n_models, device=str(device)
        )
    )
    lr = 2e-4 / (cfg.n / 2**14) ** 0.5
    trainer = SAETrainer(
        SAETrainerConfig(
            total_training_samples=10**12,
            train_batch_size_samples=cfg.B,
            lr=lr,
            lr_end=lr,
            device=str(device),
        ),
        sae,
        iter(()),
    )
    use_fused_adam(trainer)
    ref = ReferenceTrainer(
        ReferenceBatchTopKCrosscoder(
            ReferenceConfig(d=cfg.d_model, n=cfg.n, k=cfg.k, n_models=cfg.n_models, steps=10**9),
            device=device,
        )
    )
    step_no = [1001]  # past the reference's threshold warm-up: its steady-state step

    def ours() -> None:
        trainer._train_step(sae, x)

    def ours_all_threads() -> None:
        """The same step with the small ops on all threads (the pre-issue-18 behaviour)."""
        kernels.set_small_op_threads(None)
        try:
            trainer._train_step(sae, x)
        finally:
            kernels.set_small_op_threads(1)

    def theirs() -> None:
        ref.update(step_no[0], x)
        step_no[0] += 1

    for _ in range(2):
        ours()
        theirs()

    def phase() -> dict[str, Any]:
        load0 = os.getloadavg()
        t: dict[str, list[float]] = {"ours": [], "ref": [], "ours_all_threads": []}
        for _ in range(reps):
            t["ours"].append(_timeit(ours, device))
            t["ref"].append(_timeit(theirs, device))
            if torch.get_num_threads() > 1:
                t["ours_all_threads"].append(_timeit(ours_all_threads, device))
        med = {k: _med(v) for k, v in t.items() if v}
        best = {k: min(v) for k, v in t.items() if v}
        # on a shared machine bursts of other load stretch single repetitions several-fold;
        # the best repetition of each side is the figure least affected by them
        return {
            "times_s": t,
            "median_s": med,
            "min_s": best,
            "ratio": med["ref"] / med["ours"],
            "ratio_best": best["ref"] / best["ours"],
            "loadavg": [load0, os.getloadavg()],
        }

    quiet = phase()
    comp = subprocess.Popen(
        [sys.executable, "-c", _COMPETITOR], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(2.0)
        busy = phase()
    finally:
        comp.kill()
        comp.wait()
    out: dict[str, Any] = {}
    if "ours_all_threads" in quiet["median_s"]:
        out["slowdown_ours_all_threads"] = (
            busy["median_s"]["ours_all_threads"] / quiet["median_s"]["ours_all_threads"]
        )
    return out | {
        "config": cfg.__dict__ | {"D": cfg.D},
        "threads": torch.get_num_threads(),
        "quiet": quiet,
        "contended": busy,
        "slowdown_ours": busy["median_s"]["ours"] / quiet["median_s"]["ours"],
        "slowdown_ref": busy["median_s"]["ref"] / quiet["median_s"]["ref"],
    }


# ------------------------------------------------------------------------ diff-SAE step


def bench_diff_sae(cfg: Config, device: torch.device, reps: int) -> dict[str, Any]:
    """``BatchTopKDiffSAETraining`` step with ``sparse_kernels=True`` vs ``False``, interleaved.

    Both sides: the same weights, a ``(B, d_in)`` difference batch (what a store in ``diff``
    mode serves), ``rescale_acts_by_decoder_norm=True`` (SAELens's default), no dead latents,
    ``training_forward_pass`` + backward + fused Adam step. Also records the loss of one step
    from identical weights on each side.
    """
    from sae_lens.saes.sae import TrainStepInput

    from sae_diff.dictionaries.diff_sae import (
        BatchTopKDiffSAETraining,
        BatchTopKDiffSAETrainingConfig,
    )

    def make(sparse: bool) -> tuple[BatchTopKDiffSAETraining, torch.optim.Optimizer]:
        torch.manual_seed(0)
        sae = BatchTopKDiffSAETraining(
            BatchTopKDiffSAETrainingConfig(
                d_in=cfg.D, d_sae=cfg.n, k=cfg.k, device=str(device), sparse_kernels=sparse
            )
        )
        return sae, kernels.make_adam(list(sae.parameters()), lr=1e-5)

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(cfg.B, cfg.D, generator=g).to(device)
    no_dead = torch.zeros(cfg.n, dtype=torch.bool, device=device)

    def step(sae: BatchTopKDiffSAETraining, opt: torch.optim.Optimizer) -> float:
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients={},
                dead_neuron_mask=no_dead,
                n_training_steps=0,
                is_logging_step=False,
            )
        )
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    chk = [step(*make(sparse)) for sparse in (True, False)]  # first step, identical weights
    sp, de = make(True), make(False)
    for _ in range(2):  # warm-up (allocations, Adam state, the threshold hint)
        step(*sp)
        step(*de)
    t: dict[str, list[float]] = {"sparse": [], "dense": []}
    for _ in range(reps):
        t["sparse"].append(_timeit(lambda: step(*sp), device))
        t["dense"].append(_timeit(lambda: step(*de), device))
    med = {k: _med(v) for k, v in t.items()}
    return {
        "config": cfg.__dict__ | {"D": cfg.D},
        "times_s": t,
        "median_s": med,
        "sparse_over_dense": med["sparse"] / med["dense"],
        "tokens_per_s": {k: cfg.B / v for k, v in med.items()},
        "loss_sparse_vs_dense_first_step": chk,
    }


# ------------------------------------------------------------------------------- memory


def _rss_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def memory_probe(cfg_name: str, impl: str, device: str) -> dict[str, Any]:
    """Peak extra memory of one training step (after a warm-up step), in this process."""
    cfg = {c.name: c for c in (LARGE, SMALL, GEMMA)}[cfg_name]
    dev = torch.device(device)
    x = torch.randn(cfg.B, cfg.D, device=dev)
    m = Dictionary(cfg, dev, 0, fused=impl != "dense")
    step = {
        "sparse": lambda: sparse_step(m, x),
        "bf16": lambda: sparse_step(m, x, True),
        "dense": lambda: dense_step(m, x),
    }[impl]
    step()  # Adam state now allocated
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"steady_bytes": base, "step_extra_bytes": peak - base}
    base = _rss_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM (peak RSS)
    except OSError:
        return {"error": "cannot reset peak RSS (/proc/self/clear_refs)"}
    step()
    return {"steady_bytes": base * 1024, "step_extra_bytes": (_rss_kb("VmHWM") - base) * 1024}


def bench_memory(cfg: Config, device: torch.device) -> dict[str, Any]:
    """Peak step memory for ours / bf16 / dense in fresh subprocesses, and the formulas."""
    out: dict[str, Any] = {}
    for impl in ("sparse", "bf16", "dense"):
        cmd = [
            sys.executable,
            __file__,
            "--mem-probe",
            cfg.name,
            impl,
            "--device",
            device.type,
            "--threads",
            str(torch.get_num_threads()),
        ]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True)
            out[impl] = json.loads(r.stdout.strip().splitlines()[-1])
        except (subprocess.SubprocessError, ValueError, IndexError) as e:
            out[impl] = {"error": str(e)[:300]}
    B, n, D, k = cfg.B, cfg.n, cfg.D, cfg.k
    P = 2 * D * n + n + D
    out["formula"] = {
        "steady (params + grads + Adam m, v), fp32": f"16*(2*D*n + n + D) = {16 * P / 2**20:.0f} MiB",
        "sparse step extra": "4*B*n (pre-activations, reused) + B*n (bool mask) + 4*D*n*2 (grads "
        f"dW_enc, dW_dec) + O(B*k*D/B) = {(5 * B * n + 8 * D * n) / 2**20:.0f} MiB",
        "bf16 step extra": "as sparse, with 2*B*n pre-activations and a 2*D*n bf16 copy of W_enc "
        f"= {(3 * B * n + 10 * D * n) / 2**20:.0f} MiB",
        "dense step extra": "about 6 fp32 B*n tensors (pre, relu, scores, top-k scatter, their grads) "
        f"+ grads 8*D*n = {(24 * B * n + 8 * D * n) / 2**20:.0f} MiB",
        "k": k,
    }
    return out


# ----------------------------------------------------------------- other modules (lazy)


def latent_scaling_memory(sae: Any, data: list[torch.Tensor]) -> dict[str, Any]:
    """Peak extra RSS of one all-target Latent Scaling pass, and the formula it should follow:
    the float64 accumulator A (n × 2·M·d); the pending targets x and x̂ (up to T ≈ max(n, 4096)
    tokens × 2·M·d, fp32) plus their concatenation at a flush; one bag sum (n × M·d, fp32); one
    batch's pre-activations and candidate mask (B × n, fp32 + bool)."""
    from sae_diff.analysis.latent_scaling import latent_scaling

    B, M, d = data[0].shape
    n = int(sae.cfg.d_sae)
    pending = min(sum(x.shape[0] for x in data), max(n, 4096))
    formula = 8 * n * 2 * M * d + 8 * pending * 2 * M * d + 4 * n * M * d + 5 * B * n
    base = _rss_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM (peak RSS)
    except OSError:
        return {"error": "cannot reset peak RSS (/proc/self/clear_refs)", "formula_bytes": formula}
    latent_scaling(sae, data, progress=False, firing_shift=False)
    return {
        "extra_bytes": (_rss_kb("VmHWM") - base) * 1024,
        "formula_bytes": formula,
        "formula": "8·n·2Md (A, float64) + 8·T·2Md (pending x, x̂ and their concatenation; T ≈ max(n, 4096) tokens) + 4·n·Md (a bag sum) + 5·B·n",
    }


def bench_latent_scaling(quick: bool) -> dict[str, Any]:
    """All-target one-pass Latent Scaling ÷ encode-only (sae_diff.analysis.latent_scaling)."""
    try:
        from sae_diff.analysis.latent_scaling_reference import latent_scaling_cost_ratio
        from sae_diff.dictionaries.batchtopk_crosscoder import (
            JumpReLUCrosscoder,
            JumpReLUCrosscoderConfig,
        )
    except Exception as e:  # noqa: BLE001 - report, never fail the suite
        return {"available": False, "reason": f"{type(e).__name__}: {e}"}
    try:
        d_in, d_sae, l0 = (128, 1024, 32) if quick else (768, 16384, 32)
        # 16k tokens: the per-call O(n·d) set-up (zeroing the float64 accumulator, the final
        # betas) is then small next to the streamed work, as in any real pass over 1e5+ tokens
        batch, n_batches = (4096, 4) if quick else (1024, 16)
        torch.manual_seed(0)
        data = [torch.randn(batch, 2, d_in) for _ in range(n_batches)]
        cfg = JumpReLUCrosscoderConfig(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu")
        sae = JumpReLUCrosscoder(cfg)
        with torch.no_grad():
            h = sae.hidden_pre(data[0])
            per_latent = max(1, int(batch * l0 / d_sae))  # mean L0 ~ l0 on data[0]
            q = torch.topk(h, per_latent, dim=0).values[-1]
            sae.threshold.copy_(q.clamp(min=0))
        r = latent_scaling_cost_ratio(sae, data, repeats=3, naive=False)
        return {
            "available": True,
            "d_in": d_in,
            "d_sae": d_sae,
            **r,
            "memory": latent_scaling_memory(sae, data),
        }
    except Exception as e:  # noqa: BLE001
        return {"available": False, "reason": f"{type(e).__name__}: {e}"}


def bench_harvest(quick: bool) -> dict[str, Any]:
    """Runs benchmarks/harvest_throughput.py (another module's script) and parses its ratios."""
    script = Path(__file__).resolve().parent / "harvest_throughput.py"
    if not script.exists():
        return {"available": False, "reason": "benchmarks/harvest_throughput.py not present"}
    cmd = [sys.executable, str(script)] + (["--quick"] if quick else [])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    except subprocess.SubprocessError as e:
        return {"available": False, "reason": str(e)[:300]}
    if r.returncode != 0:
        return {"available": False, "reason": (r.stderr or r.stdout)[-600:]}
    out: dict[str, Any] = {"available": True, "output": r.stdout}
    m = re.search(r"harvest / bare = ([0-9.]+)", r.stdout)
    if m:  # the script prints a throughput ratio; the goal is a time ratio
        out["harvest_over_bare_time"] = 1.0 / float(m.group(1))
    m = re.search(r"read / train = ([0-9.]+)", r.stdout)
    if m:
        out["read_over_train_throughput"] = float(m.group(1))
    return out


# ------------------------------------------------------------------------------ report


def _fmt(x: float | None, goal: str, ok: bool | None) -> tuple[str, str, str]:
    if x is None:
        return "n/a", goal, "—"
    return f"{x:.3g}", goal, ("met" if ok else "**not met**")


def table(res: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str]] = []
    for key, r in res["configs"].items():
        sp = r.get("speedup_vs_dense")
        rows.append(
            (
                f"{key}: dense ref step ÷ our step (speed-up)",
                *_fmt(sp, ">= 4", sp is not None and sp >= 4),
            )
        )
        rows.append(
            (
                f"{key}: our step ÷ fp32 encoder matmul",
                *_fmt(r["step_over_matmul"], "<= 2.0", r["step_over_matmul"] <= 2.0),
            )
        )
        rows.append(
            (
                f"{key}: bf16 step ÷ fp32 step",
                *_fmt(r["bf16_over_fp32"], "<= 0.7", r["bf16_over_fp32"] <= 0.7),
            )
        )
        rows.append(
            (
                f"{key}: BatchTopK selection ÷ flat top-k",
                *_fmt(
                    r["selection_over_flat_topk"], "<= 0.15", r["selection_over_flat_topk"] <= 0.15
                ),
            )
        )
        ms = r["median_s"]
        rows.append(
            (
                f"{key}: tokens/s ours / bf16 / dense ref",
                f"{r['tokens_per_s_ours']:,.0f} / {r['tokens_per_s_bf16']:,.0f} / "
                + (f"{r['tokens_per_s_ref']:,.0f}" if "tokens_per_s_ref" in r else "n/a"),
                f"median s: ours {ms['ours']:.3f}, matmul {ms['matmul']:.3f}"
                + (f", ref {ms['ref']:.3f}" if "ref" in ms else ""),
                "—",
            )
        )
        mem = r.get("memory")
        if mem:
            for impl in ("sparse", "bf16", "dense"):
                e = mem.get(impl, {})
                val = (
                    f"{e['step_extra_bytes'] / 2**20:.0f} MiB" if "step_extra_bytes" in e else "n/a"
                )
                rows.append(
                    (f"{key}: peak extra memory of a step ({impl})", val, "formula in JSON", "—")
                )
    for key, r in res.get("reference", {}).items():
        q, b = r["quiet"], r["contended"]
        la = q["loadavg"][0][0]
        lb = b["loadavg"][1][0]
        rows.append(
            (
                f"{key}: crosscoder_learning step ÷ sae_diff step, medians (load {la:.1f})",
                *_fmt(q["ratio"], ">= 5", q["ratio"] >= 5),
            )
        )
        rows.append(
            (
                f"{key}: same, best repetition of each",
                *_fmt(q["ratio_best"], ">= 5", q["ratio_best"] >= 5),
            )
        )
        rows.append(
            (
                f"{key}: same, one CPU-bound process competing, medians (load {lb:.1f})",
                *_fmt(b["ratio"], ">= 4", b["ratio"] >= 4),
            )
        )
        rows.append(
            (
                f"{key}: same, competing, best repetition of each",
                *_fmt(b["ratio_best"], ">= 4", b["ratio_best"] >= 4),
            )
        )
        rows.append(
            (
                f"{key}: slowdown under contention, sae_diff / reference",
                f"{r['slowdown_ours']:.2f} / {r['slowdown_ref']:.2f}",
                "ours <= reference's",
                "met" if r["slowdown_ours"] <= r["slowdown_ref"] * 1.05 else "**not met**",
            )
        )
        if "slowdown_ours_all_threads" in r:
            rows.append(
                (
                    f"{key}: slowdown, sae_diff with small ops on all threads (before issue 18)",
                    f"{r['slowdown_ours_all_threads']:.2f}",
                    "—",
                    "—",
                )
            )
        rows.append(
            (
                f"{key}: step s median (best), sae_diff / reference, as is; competing",
                f"{q['median_s']['ours']:.3f} ({q['min_s']['ours']:.3f}) / {q['median_s']['ref']:.3f} "
                f"({q['min_s']['ref']:.3f}); {b['median_s']['ours']:.3f} ({b['min_s']['ours']:.3f}) / "
                f"{b['median_s']['ref']:.3f} ({b['min_s']['ref']:.3f})",
                f"threads {r['threads']}",
                "—",
            )
        )
    for key, r in res.get("diff_sae", {}).items():
        ms, tps = r["median_s"], r["tokens_per_s"]
        rows.append(
            (
                f"{key}: diff-SAE step, sparse_kernels ÷ dense",
                f"{r['sparse_over_dense']:.3g}",
                "< 1",
                "met" if r["sparse_over_dense"] < 1 else "**not met**",
            )
        )
        rows.append(
            (
                f"{key}: diff-SAE tokens/s sparse / dense",
                f"{tps['sparse']:,.0f} / {tps['dense']:,.0f}",
                f"median s: sparse {ms['sparse']:.3f}, dense {ms['dense']:.3f}",
                "—",
            )
        )
    if "latent_scaling" in res:  # sections left out with --only get no rows
        ls = res["latent_scaling"]
        if ls.get("available"):
            rows.append(
                (
                    "Latent Scaling (all targets) ÷ encode-only",
                    *_fmt(ls["ratio"], "<= 1.3", ls["ratio"] <= 1.3),
                )
            )
            mem = ls.get("memory", {})
            if "extra_bytes" in mem:
                rows.append(
                    (
                        "Latent Scaling peak extra memory",
                        f"{mem['extra_bytes'] / 2**20:,.0f} MiB",
                        f"formula {mem['formula_bytes'] / 2**20:,.0f} MiB",
                        "—",
                    )
                )
        else:
            rows.append(
                ("Latent Scaling (all targets) ÷ encode-only", "not available", "<= 1.3", "—")
            )
    if "harvest" in res:
        hv = res["harvest"]
        if hv.get("available") and "harvest_over_bare_time" in hv:
            h = hv["harvest_over_bare_time"]
            rows.append(("paired harvest ÷ two bare forwards (time)", *_fmt(h, "<= 1.1", h <= 1.1)))
            rt = hv.get("read_over_train_throughput")
            rows.append(
                (
                    "cache read ÷ training throughput",
                    *_fmt(rt, ">= 20", rt is not None and rt >= 20),
                )
            )
        else:
            rows.append(("paired harvest ÷ two bare forwards", "not available", "<= 1.1", "—"))
            rows.append(("cache read ÷ training throughput", "not available", ">= 20", "—"))
    m = res["machine"]
    head = (
        f"# sae_diff benchmark `{res['name']}`\n\n{m['cpu']}; torch {m['torch']}; "
        f"device {m['device']}; threads {m['threads']} ({m.get('threads_choice', '')}); THP_MEM_ALLOC_ENABLE={m['thp']}; "
        f"load average at start {m['loadavg_start']}, end {m['loadavg_end']}\n\n"
    )
    lines = ["| figure | measured | goal | status |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return head + "\n".join(lines) + "\n"


def _machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": f"{cpu}, {os.cpu_count()} logical CPUs",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "mkl": torch.backends.mkl.is_available(),
        "thp": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"),
        "device": str(device),
        "fused_adam": kernels.fused_adam_supported(device),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="small config + the large one, few reps")
    p.add_argument("--name", default=None, help="results/<name>.json (default: <device>[-quick])")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads (default: all cores, or 1 if the 1-min load average "
        "already exceeds the core count: OpenMP barriers under oversubscription "
        "penalise many-small-op code far more than one big matmul)",
    )
    p.add_argument(
        "--no-thp", action="store_true", help="do not re-exec with THP_MEM_ALLOC_ENABLE=1"
    )
    p.add_argument("--no-memory", action="store_true")
    p.add_argument(
        "--only",
        default=None,
        help=f"comma-separated subset of sections to run: {', '.join(SECTIONS)}",
    )
    p.add_argument("--mem-probe", nargs=2, metavar=("CONFIG", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    threads_note = "set by --threads"
    if args.threads is None and args.device == "cpu" and not args.mem_probe:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        args.threads = 1 if load >= (os.cpu_count() or 1) else (os.cpu_count() or 1)
        threads_note = f"auto (1-min load average {load:.1f} on {os.cpu_count()} CPUs)"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mem_probe:
        print(json.dumps(memory_probe(args.mem_probe[0], args.mem_probe[1], args.device)))
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    only = SECTIONS if args.only is None else tuple(x.strip() for x in args.only.split(","))
    if unknown := set(only) - set(SECTIONS):
        sys.exit(f"--only: unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    name = args.name or (
        device.type
        + ("-quick" if args.quick else "")
        + ("" if args.only is None else "-" + "-".join(only))
    )
    reps = args.reps or (3 if args.quick else 7)
    res: dict[str, Any] = {
        "name": name,
        "machine": _machine(device),
        "configs": {},
        "argv": sys.argv,
    }
    res["machine"]["threads_choice"] = threads_note
    configs = [SMALL, LARGE] + ([GEMMA] if device.type == "cuda" and not args.quick else [])
    for cfg in configs if "crosscoder" in only else []:
        print(f"[bench] {cfg.name} ...", flush=True)
        r = bench_config(cfg, device, reps)
        if not args.no_memory:
            r["memory"] = bench_memory(cfg, device)
        res["configs"][cfg.name.split(" ")[0]] = r
    if "reference" in only:
        res["reference"] = {}
        for cfg in ([SMALL] if args.quick else []) + [LARGE]:
            print(f"[bench] vs crosscoder_learning, {cfg.name} ...", flush=True)
            res["reference"][cfg.name.split(" ")[0]] = bench_vs_reference(cfg, device, reps)
    if "diff_sae" in only:
        res["diff_sae"] = {}
        for cfg in (DIFF_SMALL, DIFF_LARGE):
            print(f"[bench] {cfg.name} ...", flush=True)
            res["diff_sae"][cfg.name.split(" ")[0]] = bench_diff_sae(cfg, device, reps)
    if "latent_scaling" in only:
        print("[bench] latent scaling ...", flush=True)
        res["latent_scaling"] = bench_latent_scaling(args.quick)
    if "harvest" in only:
        print("[bench] harvest / cache ...", flush=True)
        res["harvest"] = bench_harvest(args.quick)
    res["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    md = table(res)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
    (RESULTS / f"{name}.md").write_text(md)
    print(md)
    print(f"wrote {RESULTS / (name + '.json')} and .md")


if __name__ == "__main__":
    main()
