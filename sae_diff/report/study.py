"""Running the diffing study: the shared inputs once, the baselines once, every method per seed.

:func:`run_demo` is the whole study (``sae-diff demo``): load the organism, harvest the
cache and build the scoring set (:func:`sae_diff.report.inputs.prepare_inputs`), score the
dictionary-free baselines (:func:`score_baselines`), train and score every method for each
training seed (:func:`run_seed`), then write the report (:mod:`sae_diff.report.output`).
Every step is a library call; this module only wires them together and times them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from sae_diff.analysis.batches import cache_batches
from sae_diff.analysis.latent_table import latent_table, save_latent_table
from sae_diff.evaluation.patching import gap_closed_summary, kl_patching_table
from sae_diff.report import baselines as BL
from sae_diff.report.base_sae_methods import base_sae_methods
from sae_diff.report.config import DemoConfig, timed
from sae_diff.report.dashboards import logit_lens
from sae_diff.report.inputs import StudyInputs, prepare_inputs
from sae_diff.report.methods import ANALYSIS_METHODS, METHODS
from sae_diff.report.output import SeedOutputs, write_outputs
from sae_diff.report.scoreboard import (
    crosscoder_artefacts,
    encode_tokens,
    ft_specific_ranking,
    method_rows,
)
from sae_diff.report.scoring import Score, granularity_matrices, summarise
from sae_diff.report.training import train_dictionary


def score_baselines(cfg: DemoConfig, inp: StudyInputs) -> tuple[list[Score], dict[str, Any]]:
    """The dictionary-free baselines' scores (deterministic: one row each, seed ``None``) and
    what report.json says about them (their candidates, directions' logit lens). The
    supervised probe is cross-fitted per training seed (:func:`run_seed`); only its
    description is here."""
    org, truth, diffs = inp.org, inp.ev.truth, inp.diffs
    rows: list[Score] = []
    info: dict[str, Any] = {}
    matrices: dict[str, dict[str, pd.DataFrame]] = {}
    train_diff = (inp.sample[:, 1] - inp.sample[:, 0]).double()
    u = BL.mean_diff_direction(train_diff)
    matrices["mean_diff"] = granularity_matrices(BL.project(diffs, u[None]), truth)
    info["mean_diff"] = {
        "candidates": ["mean difference"],
        "norm": round(float(u.norm()), 4),
        "logit_lens": logit_lens(u, org.ft, org.tokenizer),
    }
    dirs, evr = BL.pca_directions(train_diff, cfg.n_pca)
    matrices["pca_diff"] = granularity_matrices(BL.project(diffs, BL.signed(dirs)), truth)
    info["pca_diff"] = {
        "candidates": [f"PC{i // 2 + 1}{'+-'[i % 2]}" for i in range(2 * dirs.shape[0])],
        "explained_variance": [round(float(v), 4) for v in evr],
        "logit_lens": {
            f"PC{i + 1}": logit_lens(dirs[i], org.ft, org.tokenizer, k=5)
            for i in range(min(3, len(dirs)))
        },
    }
    kl_scores, kl_types = BL.kl_token_scores(inp.kl, inp.ev.tokens, truth.valid, cfg.n_kl_types)
    matrices["kl_tokens"] = granularity_matrices(kl_scores, truth)
    info["kl_tokens"] = {
        "candidates": ["per-token KL"] + [f"token {org.tokenizer.decode([i])!r}" for i in kl_types]
    }
    for name, mats in matrices.items():
        rows += summarise(mats, name, None, cfg.top_n)
    info["probe"] = {"candidates": ["supervised mean-difference probe (2-fold cross-fitted)"]}
    return rows, info


@dataclass
class SeedRun:
    """One training seed's results.

    ``scores``: the probe's and every method's score rows; ``summary``: the seed's entry of
    report.json's ``per_seed`` (scoreboard, crosscoder artefacts, the game's top scores);
    ``outputs``: what the dashboards read (dictionaries, latent tables, granularity matrices,
    candidate codes, the KL-patching table).
    """

    scores: list[Score]
    summary: dict[str, Any]
    outputs: SeedOutputs


def run_seed(cfg: DemoConfig, inp: StudyInputs, seed: int) -> SeedRun:
    """Train every selected method with training seed ``seed``, build their latent tables,
    score their candidates, run the base-SAE methods and the KL-patching evaluation."""
    t = time.perf_counter()
    truth, cache = inp.ev.truth, inp.cache
    probe = summarise(BL.probe_matrices(inp.diffs, truth, seed=seed), "probe", seed)
    folder = cfg.out / "dictionaries" / f"seed{seed}"
    dictionaries = {
        name: train_dictionary(
            cfg, name, cache, inp.d_model, inp.meta, seed=seed, path=folder / name
        )
        for name in cfg.methods
        if name in METHODS
    }
    t = timed(cfg, "train", t)
    tables: dict[str, pd.DataFrame] = {}
    for name, sae in dictionaries.items():
        kind = METHODS[name]["kind"]
        table = latent_table(sae, cache_batches(cache), kind=kind if kind == "ft_sae" else None)
        save_latent_table(table, folder / name / "latent_table.parquet")
        tables[name] = table
    t = timed(cfg, "latent_tables", t)
    matrices: dict[str, dict[str, pd.DataFrame]] = {}
    codes: dict[str, torch.Tensor] = {}
    seed_rows: list[Score] = []
    game_rows: list[Score] = []
    for name, sae in dictionaries.items():
        kind = METHODS[name]["kind"]
        cand = ft_specific_ranking(tables[name], kind)[: cfg.top_n]
        codes[name] = encode_tokens(sae, kind, inp.acts)[..., cand].float()
        matrices[name] = granularity_matrices(codes[name], truth, cand.tolist())
        seed_rows += summarise(matrices[name], name, seed)
        game_rows += summarise(matrices[name], name, seed, cfg.game_top)
    base_rows: list[dict[str, Any]] = []
    if any(m in ANALYSIS_METHODS for m in cfg.methods):
        t = timed(cfg, "scoring", t)
        ranked = base_sae_methods(
            cfg,
            inp.org,
            inp.paired,
            cache,
            inp.hook,
            inp.d_model,
            seed,
            folder,
            inp.sample,
            inp.c_tokens,
            inp.answer,
        )
        for name, (sae1, cand, row) in ranked.items():
            codes_all = encode_tokens(sae1, "ft_sae", inp.acts)[..., cand].float()
            mats = granularity_matrices(codes_all, truth, cand.tolist())
            seed_rows += summarise(mats, name, seed)
            game_rows += summarise(mats, name, seed, cfg.game_top)
            base_rows.append(row)
        t = timed(cfg, "base_sae_methods", t)
    t = timed(cfg, "scoring", t)
    patchable = {n: d for n, d in dictionaries.items() if METHODS[n]["kind"] != "ft_sae"}
    gap = pd.DataFrame()
    if patchable:
        kl_table = kl_patching_table(
            inp.paired,
            patchable,
            inp.c_tokens,
            inp.answer,
            nu={n: tables[n] for n in patchable},
            random_seeds=cfg.random_seeds,
            token_patches={"template": inp.template},
            attention_mask=inp.c_valid.long(),
            progress=True,
        )
        kl_table.to_csv(folder / "kl_patching.csv")
        gap = gap_closed_summary(kl_table)
    else:
        kl_table = pd.DataFrame()
    timed(cfg, "kl_patching", t)
    board = method_rows(cfg, dictionaries, tables, gap, inp.sample) + base_rows
    summary = {
        "seed": seed,
        "scoreboard": board,
        "crosscoder_artefacts": crosscoder_artefacts(cfg, tables),
        "top_scores": {cfg.game_top: [r.row() for r in game_rows]},
    }
    outputs: SeedOutputs = {
        "dictionaries": dictionaries,
        "tables": tables,
        "matrices": matrices,
        "codes": codes,
        "kl_table": kl_table,
        "seed": seed,
    }
    return SeedRun(probe + seed_rows, summary, outputs)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the whole study; returns the report dictionary (also written to ``report.json``)."""
    start = t = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    inp, t = prepare_inputs(cfg, t)
    rows, baseline_info = score_baselines(cfg, inp)
    timed(cfg, "baselines", t)
    per_seed: list[dict[str, Any]] = []
    first: SeedOutputs | None = None  # the dashboards show the first seed's dictionaries
    for seed in cfg.seeds:
        run = run_seed(cfg, inp, seed)
        rows += run.scores
        per_seed.append(run.summary)
        first = first or run.outputs
    if first is None:  # DemoConfig checks this, but its fields can be set after __init__
        raise ValueError("DemoConfig.seeds is empty; give at least one training seed.")
    return write_outputs(cfg, inp, rows, baseline_info, per_seed, first, start)


__all__ = [
    "SeedRun",
    "run_demo",
    "run_seed",
    "score_baselines",
]
