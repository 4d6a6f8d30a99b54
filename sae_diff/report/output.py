"""What the diffing study writes: report.json, report.html, the latent and KL dashboards.

:func:`write_outputs` assembles the report dictionary from the study's scores and per-seed
scoreboards (figures over seeds, findings, timings), adds what the reader looks at (the first
seed's latent dashboards and analysis plots, the KL dashboard, the layer-stitching sweep) and
writes both files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypedDict

import pandas as pd
import torch

from sae_diff.analysis.batches import cache_batches
from sae_diff.analysis.examples import LatentExamples, max_activating_examples
from sae_diff.atomic import atomic_write
from sae_diff.data.cache_reader import ActivationCache
from sae_diff.dictionaries.protocol import PairedDictionary
from sae_diff.evaluation.kl import kl_dashboard
from sae_diff.evaluation.stitching import plot_stitching_sweep, stitching_sweep
from sae_diff.organisms.organism import Organism
from sae_diff.report.config import DemoConfig, timed
from sae_diff.report.dashboards import best_match, decoder_direction, histogram, logit_lens
from sae_diff.report.findings import seed_findings
from sae_diff.report.html import write_report_html
from sae_diff.report.inputs import StudyInputs, organism_info
from sae_diff.report.methods import METHODS
from sae_diff.report.scoreboard import rounded, summarise_boards
from sae_diff.report.scoring import GroundTruth, Score, aggregate


class SeedOutputs(TypedDict):
    """One seed's trained dictionaries and what was computed from them (the dashboards, the
    analysis plots and the KL-patching table of the report show the first seed's)."""

    dictionaries: dict[str, PairedDictionary]
    tables: dict[str, pd.DataFrame]
    matrices: dict[str, dict[str, pd.DataFrame]]
    codes: dict[str, torch.Tensor]
    kl_table: pd.DataFrame
    seed: int


def write_outputs(
    cfg: DemoConfig,
    inp: StudyInputs,
    rows: Sequence[Score],
    baseline_info: dict[str, Any],
    per_seed: Sequence[dict[str, Any]],
    first: SeedOutputs,
    start: float,
) -> dict[str, Any]:
    """Write ``report.json`` and ``report.html`` (and ``kl_dashboard.html``) under ``cfg.out``;
    returns the report dictionary.

    ``rows`` are every score row (baselines, then each seed's), ``per_seed`` each seed's
    summary (:class:`sae_diff.report.study.SeedRun`), ``first`` the first seed's dictionaries,
    tables, matrices, codes and KL-patching table (the dashboards show them), ``start`` the
    study's start time (``time.perf_counter()``) for its total.
    """
    org, paired, cache, ev, truth = inp.org, inp.paired, inp.cache, inp.ev, inp.ev.truth
    c_tokens, answer, c_valid = inp.c_tokens, inp.answer, inp.c_valid
    t = time.perf_counter()
    dash = kl_dashboard(paired, c_tokens, answer, top_n=20, attention_mask=c_valid.long())
    dash.save_html(cfg.out / "kl_dashboard.html")
    sweep = stitching_sweep(paired, c_tokens, answer, attention_mask=c_valid.long())
    t = timed(cfg, "kl_dashboard", t)
    examples, dashboards = latent_dashboards(cfg, org, cache, first, truth)
    timed(cfg, "dashboards", t)

    score_rows = [r.row() for r in rows]
    report: dict[str, Any] = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "timings"},
        "organism": {
            **organism_info(cfg, org),
            "base": org.base_name,
            "ft": org.ft_name,
            "hook": inp.hook,
            "behaviours": truth.behaviours,
            "skipped_behaviours": ev.skipped,
            "rows": {o: ev.origins.count(o) for o in dict.fromkeys(ev.origins)},
            "label_counts": truth.counts(),
            "scored_tokens": int(truth.valid.sum()),
        },
        "cache": {
            "tokens": int(cache.n_tokens),
            "shards": int(cache.n_shards),
            "bytes": int(cache.nbytes),
        },
        "seeds": list(cfg.seeds),
        "scores": score_rows,
        "score_summary": json.loads(aggregate(score_rows).to_json(orient="records")),
        "scoreboard": summarise_boards([s["scoreboard"] for s in per_seed]),
        "per_seed": [{k: v for k, v in s.items() if k != "top_scores"} for s in per_seed],
        "baselines": baseline_info,
        "kl_patching": json.loads(
            first["kl_table"].reset_index(drop=True).to_json(orient="records")
        ),
        "top_latents": dashboards,
        "kl_dashboard": {
            "summary": dash.summary,
            "html": "kl_dashboard.html",
            "top": json.loads(dash.table.to_json(orient="records")),
        },
        "stitching_sweep": json.loads(sweep.to_json(orient="records")),
        "latent_tables": {
            f"seed{s}/{n}": f"dictionaries/seed{s}/{n}/latent_table.parquet"
            for s in cfg.seeds
            for n in cfg.methods
            if n in METHODS
        },
    }
    report["findings"] = seed_findings(
        per_seed,
        cfg.nu_eps_max,
        cfg.nu_r_max,
        behaviours=truth.behaviours,
        methods=list(cfg.methods),
        top=cfg.game_top,
        threshold=cfg.game_threshold,
    )
    cfg.timings["total"] = round(time.perf_counter() - start, 2)
    report["timings_s"] = dict(cfg.timings)
    report["torch_threads"] = torch.get_num_threads()
    text = json.dumps(report, indent=2, default=_json_default)
    atomic_write(cfg.out / "report.json", lambda p: p.write_text(text, encoding="utf-8"))
    figures = {
        "Layer stitching: KL against the split layer": plot_stitching_sweep(sweep),
        **make_figures(first["tables"]),
    }
    write_report_html(cfg.out / "report.html", report, examples, first["kl_table"], figures=figures)
    return report


def latent_dashboards(
    cfg: DemoConfig,
    org: Organism,
    cache: ActivationCache,
    first: SeedOutputs,
    truth: GroundTruth,
) -> tuple[dict[str, dict[int, LatentExamples]], dict[str, list[dict[str, Any]]]]:
    """Examples and dashboard figures for each method's top ``n_example_latents`` candidates
    (first seed): contexts from the cache, histogram on the scoring set, Δ / ν, logit lens of
    the ft decoder direction, best-matching behaviour per granularity."""
    examples: dict[str, dict[int, LatentExamples]] = {}
    dashboards: dict[str, list[dict[str, Any]]] = {}
    for name, sae in first["dictionaries"].items():
        kind = METHODS[name]["kind"]
        table, mats = first["tables"][name], first["matrices"][name]
        top = list(mats["conversation"].index[: cfg.n_example_latents])
        examples[name] = max_activating_examples(
            sae,
            cache_batches(cache),
            cache.tokens(),
            top,
            kind=kind if kind == "ft_sae" else None,
            k=5,
            n_quantiles=3,
            per_quantile=2,
            tokenizer=org.tokenizer,
            progress=False,
        )
        rows = []
        for rank, j in enumerate(top, start=1):
            row: dict[str, Any] = {"latent": int(j), "rank": rank}
            for col in ("delta", "tag", "nu_error", "nu_recon", "nu_act", "count_active", "freq"):
                if col in table.columns and pd.notna(table.at[j, col]):
                    v = table.at[j, col]
                    row[col] = v if isinstance(v, str) else rounded(v)
            row["histogram"] = histogram(first["codes"][name][..., rank - 1][truth.valid])
            row["logit_lens"] = logit_lens(decoder_direction(sae, kind, j), org.ft, org.tokenizer)
            row["best_match"] = best_match(mats, j)
            rows.append(row)
        dashboards[name] = rows
    return examples, dashboards


def make_figures(tables: Mapping[str, pd.DataFrame]) -> dict[str, Any]:
    """The analysis plots for the report (plotly figures, titled; the first seed's tables)."""
    # imported here: plotly.express takes about a second to import, and only the written
    # report needs it
    from sae_diff.analysis import plots

    figs: dict[str, Any] = {}
    for name in ("l1_crosscoder", "batchtopk_crosscoder"):
        if name in tables:
            figs[f"{name}: Δ histogram by tag"] = plots.delta_histogram(tables[name])
            figs[f"{name}: ν_ε vs ν_r (ft-only vs shared)"] = plots.nu_scatter(tables[name])
    for name, table in tables.items():
        figs[f"{name}: β distributions"] = plots.beta_distributions(table)
        figs[f"{name}: firing frequency vs ratio"] = plots.frequency_vs_ratio(table)
    return figs


def _json_default(o: Any) -> Any:
    """JSON for what report.json holds besides plain values: paths, tensors, numpy scalars."""
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


__all__ = ["SeedOutputs", "latent_dashboards", "make_figures", "write_outputs"]
