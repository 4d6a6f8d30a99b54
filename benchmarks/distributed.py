"""Data-parallel training throughput: 2 gloo processes (torchrun) / 1 process.

    python benchmarks/distributed.py                 # D = 2x128, n = 2048, k = 16, B = 2048
    python benchmarks/distributed.py --json out.json --repeats 3

Both runs are the real ``sae-diff`` runner (``PairedSAETrainingRunner``, BatchTopK
crosscoder, sparse kernels) reading the same on-disk cache (harvested once from the
smoke-test pair, d_model 128, float32), each process with ONE thread
(``OMP_NUM_THREADS=1``), so the ratio measures scaling over processes on a 2-core CPU:
the 2-process run trains on the same global batch, each rank on half of it, with a gradient
all-reduce, the global BatchTopK all-gather and the statistics reductions per step.
Throughput is training tokens/s over the steps after a warm-up (startup, cache opening and
normalisation estimates excluded), taken from rank 0's step timestamps. A second figure,
tokens per CPU-second of the busiest process, estimates the ratio an idle machine would
give (a loaded machine deschedules one rank while the other waits for it in a collective). The 1- and
2-process runs are interleaved ``--repeats`` times and the medians compared. The load
average is printed next to the figures: on a busy machine the 2-process run competes for
the cores it needs, and the ratio falls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def config(
    root: Path, *, d: int, n: int, k: int, batch: int, steps: int, harvest_tokens: int | None = None
) -> dict[str, Any]:
    tokens = harvest_tokens if harvest_tokens is not None else steps * batch
    return {
        "model_name": "bench-ft",
        "base_model_name": "bench-base",
        "smoke_test_models": {
            "n_layers": 1,
            "d_model": d,
            "n_heads": 4,
            "d_vocab": 256,
            "n_ctx": 128,
        },
        "model_from_pretrained_kwargs": {},
        "hook_name": "blocks.0.hook_resid_post",
        "context_size": 128,
        "store_batch_size_prompts": 16,
        "cache_rows_per_shard": 64,
        "n_batches_in_buffer": 4,
        "training_tokens": tokens,
        "train_batch_size_tokens": batch,
        "lr": 1e-4,
        "lr_warm_up_steps": 0,
        "n_norm_batches": 2,
        "n_eval_batches": 1,
        "eval_at_end": False,
        "verbose": False,
        "seed": 0,
        "n_checkpoints": 0,
        "save_final_checkpoint": False,
        "sae": {"architecture": "batchtopk_crosscoder", "d_in": d, "d_sae": n, "k": k},
        "cache_path": str(root / "cache"),
        "checkpoint_path": None,
        "output_path": None,
    }


def worker(cfg_path: str, warmup: int, out: str) -> None:
    """One process of a run: train, record step times (rank 0 writes them to ``out``)."""
    import torch

    torch.set_num_threads(1)
    import sae_diff  # noqa: F401
    from sae_diff.training import distributed
    from sae_diff.training.config import config_from_dict
    from sae_diff.training.runner import PairedSAETrainingRunner
    from sae_diff.training.trainer import ResumableSAETrainer

    stamps: list[float] = []
    cpu: list[float] = []
    step = ResumableSAETrainer.step

    def timed(self: Any, batch: Any) -> Any:
        result = step(self, batch)
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        return result

    ResumableSAETrainer.step = timed  # type: ignore[method-assign]
    cfg = config_from_dict(json.loads(Path(cfg_path).read_text()))
    PairedSAETrainingRunner(cfg).run()
    w = distributed.world()
    steps = len(stamps) - 1 - warmup
    cpu_s = torch.tensor([cpu[-1] - cpu[warmup]], dtype=torch.float64)
    if w.distributed:  # the busiest rank bounds the step rate on an idle machine
        torch.distributed.all_reduce(cpu_s, op=torch.distributed.ReduceOp.MAX)
    if w.is_main:
        seconds = stamps[-1] - stamps[warmup]
        Path(out).write_text(
            json.dumps(
                {
                    "steps": steps,
                    "seconds": seconds,
                    "world_size": w.size,
                    "tokens_per_s": steps * cfg.train_batch_size_tokens / seconds,
                    # CPU seconds of the busiest process: what the step costs with a core to itself
                    "tokens_per_cpu_s": steps * cfg.train_batch_size_tokens / float(cpu_s),
                }
            )
        )


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }


def run_once(cfg_path: Path, nproc: int, warmup: int, tmp: Path) -> dict[str, Any]:
    out = tmp / f"result_{nproc}_{time.time_ns()}.json"
    me = [
        str(Path(__file__).resolve()),
        "--worker",
        str(cfg_path),
        "--warmup",
        str(warmup),
        "--out",
        str(out),
    ]
    if nproc == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *me,
        ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{nproc}-process run failed:\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--d", type=int, default=128, help="d_model of each model (D = 2d)")
    p.add_argument("--n", type=int, default=2048, help="latents")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch", type=int, default=2048, help="global batch (tokens)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.warmup, args.out)
        return 0

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="sae_diff_bench_dist_") as d:
        tmp = Path(d)
        # harvest a cache once (a quarter of the training tokens; training loops over it)
        import sae_diff  # noqa: F401
        from sae_diff.training.config import config_from_dict
        from sae_diff.training.data import harvest

        harvest_tokens = max(args.steps * args.batch // 4, 8 * args.batch)
        harvest(
            config_from_dict(
                config(
                    tmp,
                    d=args.d,
                    n=args.n,
                    k=args.k,
                    batch=args.batch,
                    steps=args.steps,
                    harvest_tokens=harvest_tokens,
                )
            ),
            progress=False,
        )
        cfg = config(tmp, d=args.d, n=args.n, k=args.k, batch=args.batch, steps=args.steps)
        cfg_path = tmp / "cfg.json"
        cfg_path.write_text(json.dumps(cfg))
        load0 = os.getloadavg()
        runs: dict[int, list[float]] = {1: [], 2: []}
        cpu_runs: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(args.repeats):
            for nproc in (1, 2):
                r = run_once(cfg_path, nproc, args.warmup, tmp)
                runs[nproc].append(r["tokens_per_s"])
                cpu_runs[nproc].append(r["tokens_per_cpu_s"])
        load1 = os.getloadavg()
    one, two = statistics.median(runs[1]), statistics.median(runs[2])
    # 2 processes on 2 idle cores: each rank's CPU time per step bounds the rate; the ratio of
    # CPU-time rates estimates the idle-machine ratio (communication waits are not CPU time)
    cpu_ratio = statistics.median(cpu_runs[2]) / statistics.median(cpu_runs[1])
    result = {
        "benchmark": "distributed_training_throughput",
        "shape": {
            "D": f"2x{args.d}",
            "n": args.n,
            "k": args.k,
            "B": args.batch,
            "steps": args.steps,
            "warmup": args.warmup,
        },
        "tokens_per_s_1proc": runs[1],
        "tokens_per_s_2proc": runs[2],
        "ratio_2proc_over_1proc": two / one,
        "goal": 1.6,
        "cpu_count": os.cpu_count(),
        "tokens_per_cpu_s_1proc": cpu_runs[1],
        "tokens_per_cpu_s_2proc_busiest_rank": cpu_runs[2],
        "cpu_time_ratio_estimate": cpu_ratio,
        "loadavg_before": load0,
        "loadavg_after": load1,
    }
    print(
        f"2-process gloo / 1-process training throughput: {two / one:.2f}x "
        f"(1 proc {one:,.0f} tok/s, 2 procs {two:,.0f} tok/s, medians of {args.repeats}; "
        f"D=2x{args.d}, n={args.n}, k={args.k}, B={args.batch}; goal >= 1.6x; "
        f"load average {load0[0]:.2f} -> {load1[0]:.2f} on {os.cpu_count()} CPUs)"
    )
    print(
        f"CPU-time estimate for an idle 2-core machine: {cpu_ratio:.2f}x (tokens per CPU-second of the "
        "busiest rank; excludes time spent waiting for the other rank)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
