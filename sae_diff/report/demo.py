"""The main job: the whole diffing study on an organism, scored against ground truth, over seeds.

``sae-diff demo`` (``make demo``) harvests a paired cache (pretraining text + chat), then for
each training seed trains an L1 crosscoder, a BatchTopK crosscoder, a BatchTopK diff-SAE, a
chat-SAE, issue 17's crosscoder variants (JumpReLU, shared-latent L1 / BatchTopK, dedicated)
and a base-SAE for stage-wise diffing and the causal filter, all at the same width (``--methods``
selects a subset), builds their latent tables with Latent Scaling, runs the
KL-patching evaluation and scores every method against the organism's planted behaviours at
three granularities (trigger tokens, response tokens, whole conversations), always against
control conversations. Dictionary-free baselines (mean activation difference, PCA of the
difference, per-token KL) and a supervised probe (the ceiling) are scored the same way. It
writes ``report.json`` (every score as rows of ``scores``) and ``report.html`` (scoreboard
with intervals over seeds, findings, latent dashboards).

This module is the command line (``main``, the terminal summary); the study itself lives in
one module per concept of ``sae_diff.report``: ``methods`` (the methods table), ``config``
(:class:`DemoConfig`), ``inputs`` (cache and scoring set), ``training`` (each method's
dictionary), ``base_sae_methods`` (stage-wise diffing, the causal filter), ``scoreboard`` (per
method figures), ``study`` (:func:`run_demo`, the seeds) and ``output`` (report.json / .html).
Their names that used to live here still import from here, with a DeprecationWarning.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from sae_diff.moved import moved_names, to
from sae_diff.report.config import DemoConfig
from sae_diff.report.methods import DEFAULT_METHODS
from sae_diff.report.study import run_demo

#: the names this module used to define, and the module each moved to
__getattr__ = moved_names(
    __name__,
    {
        **to(
            "sae_diff.report.methods",
            ["METHODS", "ANALYSIS_METHODS", "CORE_METHODS", "BASELINES"],
        ),
        **to(
            "sae_diff.report.inputs",
            ["harvest", "EvalSet", "evaluation_set", "organism_info"],
        ),
        **to("sae_diff.report.training", ["train_dictionary", "train_base_sae"]),
        **to("sae_diff.report.base_sae_methods", ["base_sae_methods"]),
        **to(
            "sae_diff.report.scoreboard",
            [
                "encode_tokens",
                "ft_specific_ranking",
                "nu_filter",
                "method_rows",
                "crosscoder_artefacts",
                "summarise_boards",
            ],
        ),
        **to("sae_diff.report.output", ["latent_dashboards", "make_figures"]),
    },
)


def print_summary(report: dict[str, Any]) -> None:
    """A short plain-text scoreboard for the terminal: conversation-level best AUROC per method
    and behaviour (mean ± std over seeds), then the findings."""
    summ = pd.DataFrame(report["score_summary"])
    if not summ.empty:
        conv = summ[summ["granularity"] == "conversation"].copy()
        conv["cell"] = [
            f"{m:.3f}±{s:.3f}" if m is not None and not pd.isna(m) else "–"
            for m, s in zip(conv["best_auroc_mean"], conv["best_auroc_std"])
        ]
        with pd.option_context("display.width", 200, "display.max_columns", 50):
            print("Conversation-level best AUROC (mean ± std over seeds):")
            print(conv.pivot(index="method", columns="behaviour", values="cell").to_string())
    for r in report["scoreboard"]:
        if r.get("note"):
            print(f"{r['method']}: {r['note']}")
    for f in report["findings"]:
        print(f"- {f['question']}\n  {f['answer']}")
    print(f"Total time: {report['timings_s']['total']:.0f} s; report in {report['config']['out']}")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers (e.g. 0,1,2), got {text!r}"
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sae-diff demo", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", type=Path, default=Path("demo_output"), help="output folder (default demo_output/)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="CI size: same pipeline, smaller numbers (< 2 min)"
    )
    ap.add_argument(
        "--organism",
        default="default",
        help="shipped organism name (default, or another shipped name) or an organism directory",
    )
    ap.add_argument("--seed", type=int, default=0, help="data seed (harvest, folds)")
    ap.add_argument(
        "--seeds",
        type=_int_list,
        default=(0, 1, 2),
        help="training seeds, comma-separated (default 0,1,2; every figure is reported over them)",
    )
    ap.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated subset of {','.join(DEFAULT_METHODS)} (default: all)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; use 1 on a busy machine)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    make = DemoConfig.quick_config if args.quick else DemoConfig
    try:
        cfg = make(
            out=args.out,
            organism=args.organism,
            seed=args.seed,
            seeds=args.seeds,
            methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        )
    except ValueError as e:
        ap.error(str(e))
    report = run_demo(cfg)
    print_summary(report)
    return 0


__all__ = ["DEFAULT_METHODS", "DemoConfig", "main", "print_summary", "run_demo"]


if __name__ == "__main__":
    raise SystemExit(main())
