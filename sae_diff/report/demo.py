"""The main job: the whole diffing study on a bundled organism, scored against ground truth.

``sae-diff demo`` (``make demo``) harvests a paired cache (pretraining text + chat), trains an
L1 crosscoder, a BatchTopK crosscoder, a BatchTopK diff-SAE and a chat-SAE at the same width,
builds their latent tables with Latent Scaling, runs the KL-patching evaluation, scores every
method against the organism's planted behaviours and writes ``report.json`` and ``report.html``.

Every step is a library call; this module only wires them together and times them.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

from sae_diff.analysis.batches import cache_batches
from sae_diff.analysis.examples import max_activating_examples
from sae_diff.analysis.latent_table import latent_table, save_latent_table
from sae_diff.data.cache import ActivationCache
from sae_diff.data.harvest import harvest_cache
from sae_diff.data.sources import TokenSource
from sae_diff.data.store import PairedActivationsStore, select_mode
from sae_diff.dictionaries.normalisation import prepare_crosscoder
from sae_diff.dictionaries.registry import training_config, training_sae
from sae_diff.evaluation.kl import kl_dashboard
from sae_diff.evaluation.patching import gap_closed_summary, kl_patching_table
from sae_diff.evaluation.stitching import plot_stitching_sweep, stitching_sweep
from sae_diff.organisms import load_organism
from sae_diff.report.findings import seed_findings
from sae_diff.report.html import write_report_html
from sae_diff.report.scoring import score_behaviours
from sae_diff.training.evaluator import fraction_of_variance_explained
from sae_diff.training.runner import use_fused_adam

METHODS: dict[str, dict[str, Any]] = {
    "l1_crosscoder": {"architecture": "crosscoder", "mode": "paired", "kind": "crosscoder"},
    "batchtopk_crosscoder": {"architecture": "batchtopk_crosscoder", "mode": "paired", "kind": "crosscoder"},
    "diff_sae": {"architecture": "batchtopk_diff_sae", "mode": "diff", "kind": "diff_sae"},
    "chat_sae": {"architecture": "batchtopk", "mode": "ft", "kind": "ft_sae"},
}


@dataclass
class DemoConfig:
    """Sizes of the study. ``quick()`` is the CI size (same pipeline, smaller numbers)."""

    out: Path = Path("demo_output")
    organism: str = "default"
    hook: str | None = None
    context_size: int = 64
    n_pretrain_docs: int = 1500
    n_chat_docs: int = 1500
    chat_share: float = 0.5
    max_rows: int = 1600
    expansion: int = 8
    k: int = 16
    l1_coefficient: float = 2.0
    train_steps: int = 1200
    batch_size: int = 512
    lr: float = 2e-3
    threshold_ema_decay: float = 0.99
    # METHODS.md's 1/32 (on the variance-normalised residual) left 74% of latents dead after 600
    # steps on the organism; 8 gave 12% dead and higher FVE (docs/methods.md).
    crosscoder_aux_coefficient: float = 8.0
    eval_per_behaviour: int = 16
    random_seeds: int = 5
    top_n: int = 50
    nu_eps_max: float = 0.3
    nu_r_max: float = 0.6
    n_example_latents: int = 5
    seed: int = 0
    quick: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def quick_config(cls, **kw: Any) -> DemoConfig:
        base: dict[str, Any] = {"n_pretrain_docs": 300, "n_chat_docs": 300, "max_rows": 320, "train_steps": 250,
                "batch_size": 256, "eval_per_behaviour": 6, "random_seeds": 2, "quick": True}
        base.update(kw)
        return cls(**base)


def _timed(cfg: DemoConfig, name: str, t0: float) -> float:
    now = time.perf_counter()
    cfg.timings[name] = round(now - t0, 2)
    return now


def harvest(cfg: DemoConfig, org: Any, paired: Any, hook: str) -> ActivationCache:
    """Pretraining text + chat, mixed by token share, harvested once into a disk cache."""
    texts = org.pretraining_dataset("train", n=cfg.n_pretrain_docs, seed=cfg.seed)
    chats = org.chat_dataset("train", n=cfg.n_chat_docs, seed=cfg.seed)
    source = TokenSource([texts, chats], org.tokenizer, cfg.context_size,
                         proportions=[1 - cfg.chat_share, cfg.chat_share], max_rows=cfg.max_rows)
    harvest_cache(paired, source, cfg.out / "cache", hook, batch_size=32, rows_per_shard=128,
                  max_rows=cfg.max_rows, verbose=True)
    return ActivationCache(cfg.out / "cache")


def train_dictionary(cfg: DemoConfig, name: str, cache: ActivationCache, d_model: int, meta: dict[str, Any]) -> SAE[Any]:
    """Train one method's dictionary on the cache with SAELens's SAETrainer; save; reload."""
    spec = METHODS[name]
    d_sae = cfg.expansion * d_model
    store = PairedActivationsStore.from_cache(cache, mode=spec["mode"], batch_size=cfg.batch_size, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    if spec["architecture"] == "batchtopk":
        sae: Any = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(
            d_in=d_model, d_sae=d_sae, k=cfg.k, normalize_activations="expected_average_only_in"))
    else:
        kw: dict[str, Any] = {"l1_coefficient": cfg.l1_coefficient} if spec["architecture"] == "crosscoder" else {"k": cfg.k}
        if spec["architecture"] == "batchtopk_crosscoder":
            kw["threshold_ema_decay"] = cfg.threshold_ema_decay
            kw["aux_loss_coefficient"] = cfg.crosscoder_aux_coefficient
        if spec["architecture"] == "batchtopk_diff_sae":
            kw["normalize_activations"] = "expected_average_only_in"
        sae = training_sae(training_config(spec["architecture"], d_in=d_model, d_sae=d_sae, **kw))
        if spec["mode"] == "paired":
            prepare_crosscoder(sae, store, n_batches=4)
    for key, value in meta.items():
        sae.cfg.metadata[key] = value
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.train_steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr, lr_end=cfg.lr / 10, lr_scheduler_name="cosineannealing", lr_warm_up_steps=cfg.train_steps // 20,
        dead_feature_window=max(cfg.train_steps // 5, 50), feature_sampling_window=max(cfg.train_steps // 2, 100),
        n_batches_for_norm_estimate=8)
    trainer = SAETrainer(trainer_cfg, sae, store)
    use_fused_adam(trainer)
    trainer.fit()
    path = cfg.out / "dictionaries" / name
    sae.save_inference_model(path)
    return SAE.load_from_disk(path)


def encode_tokens(sae: SAE[Any], kind: str, acts: torch.Tensor) -> torch.Tensor:
    """Codes ``(N, S, d_sae)`` of paired activations ``(N, S, 2, d)`` for any method."""
    with torch.no_grad():
        if kind == "ft_sae":
            return sae.encode(acts[..., 1, :])
        return sae.encode(acts)


def ft_specific_ranking(table: pd.DataFrame, kind: str) -> torch.Tensor:
    """Latents ordered by how ft-specific they look; never-active latents are dropped.

    Crosscoders: Δ ascending (0 = ft-only). SAEs: |ν_act| ascending (ν near 0 = genuinely
    ft-specific; missing ν last, then by firing count descending)."""
    live = table[table.get("count_active", pd.Series(1, index=table.index)) > 0]
    if kind == "crosscoder":
        order = live.sort_values(["delta", "count_active"], ascending=[True, False])
    else:
        order = live.assign(_nu=live["nu_act"].abs().fillna(math.inf)).sort_values(["_nu", "count_active"], ascending=[True, False])
    return torch.tensor(order.index.to_numpy(), dtype=torch.long)


def nu_filter(table: pd.DataFrame, kind: str, cfg: DemoConfig) -> pd.Series:
    """Latents that survive the ν filter (genuinely ft-specific per Latent Scaling)."""
    if kind == "crosscoder":
        return (table["tag"] == "ft_only") & (table["nu_error"] < cfg.nu_eps_max) & (table["nu_recon"] < cfg.nu_r_max)
    return table["nu_act"].abs() < cfg.nu_eps_max


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the whole study; returns the report dictionary (also written to ``report.json``)."""
    start = t = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    org = load_organism(cfg.organism)
    paired = org.paired()
    hook = cfg.hook or org.recommended_hook
    d_model = paired.d_model
    meta = {"base_model_name": paired.base_name, "model_name": paired.ft_name, "hook_name": hook}
    t = _timed(cfg, "load", t)

    cache = harvest(cfg, org, paired, hook)
    t = _timed(cfg, "harvest", t)

    dictionaries = {name: train_dictionary(cfg, name, cache, d_model, meta) for name in METHODS}
    t = _timed(cfg, "train", t)

    tables: dict[str, pd.DataFrame] = {}
    for name, sae in dictionaries.items():
        kind = METHODS[name]["kind"]
        table = latent_table(sae, cache_batches(cache), kind=kind if kind.endswith("_sae") and kind != "diff_sae" else None)
        save_latent_table(table, cfg.out / "dictionaries" / name / "latent_table.parquet")
        tables[name] = table
    t = _timed(cfg, "latent_tables", t)

    _, tokens, valid, assistant = org.eval_batch(n=cfg.eval_per_behaviour)
    labels = org.behaviour_masks(tokens)
    with torch.no_grad():
        acts = paired.paired_activations(tokens, [hook], attention_mask=valid.long())[hook]
    scored = valid.clone()
    scored[:, 0] = False  # BOS
    scores: dict[str, Any] = {}
    matrices: dict[str, pd.DataFrame] = {}
    for name, sae in dictionaries.items():
        kind = METHODS[name]["kind"]
        codes = encode_tokens(sae, kind, acts)[scored]
        ranking = ft_specific_ranking(tables[name], kind)
        scores[name], matrices[name] = score_behaviours(codes, ranking, {b: m[scored] for b, m in labels.items()}, top_n=cfg.top_n)
    t = _timed(cfg, "scoring", t)

    answer = assistant & valid
    dashboard = kl_dashboard(paired, tokens, answer, top_n=20, attention_mask=valid.long())
    dashboard.save_html(cfg.out / "kl_dashboard.html")
    sweep = stitching_sweep(paired, tokens, answer, attention_mask=valid.long())
    template = torch.isin(tokens, torch.tensor(org.tokenizer.all_special_ids)) & valid
    patchable = {n: d for n, d in dictionaries.items() if METHODS[n]["kind"] != "ft_sae"}
    nus = {n: tables[n] for n in patchable}
    kl_table = kl_patching_table(paired, patchable, tokens, answer, nu=nus, random_seeds=cfg.random_seeds,
                                 token_patches={"template": template}, attention_mask=valid.long(), progress=True)
    kl_table.to_csv(cfg.out / "kl_patching.csv")
    gap = gap_closed_summary(kl_table)
    t = _timed(cfg, "kl_patching", t)

    examples = {}
    for name, sae in dictionaries.items():
        kind = METHODS[name]["kind"]
        top = ft_specific_ranking(tables[name], kind)[: cfg.n_example_latents].tolist()
        examples[name] = max_activating_examples(
            sae, cache_batches(cache), cache.tokens(), top, kind=kind if kind == "ft_sae" else None,
            k=5, n_quantiles=2, per_quantile=2, tokenizer=org.tokenizer, progress=False)
    t = _timed(cfg, "examples", t)

    report = build_report(cfg, org, hook, cache, dictionaries, tables, scores, gap, kl_table, labels, scored)
    report["top_latents"] = {name: top_latent_rows(tables[name], matrices[name], list(ex)) for name, ex in examples.items()}
    report["kl_dashboard"] = {"summary": dashboard.summary, "html": "kl_dashboard.html",
                              "top": json.loads(dashboard.table.drop(columns=["context"], errors="ignore").to_json(orient="records"))}
    report["stitching_sweep"] = json.loads(sweep.to_json(orient="records"))
    report["latent_tables"] = {n: f"dictionaries/{n}/latent_table.parquet" for n in tables}
    report["findings"] = seed_findings(report, cfg.nu_eps_max, cfg.nu_r_max)
    cfg.timings["total"] = round(time.perf_counter() - start, 2)
    report["timings_s"] = dict(cfg.timings)
    (cfg.out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    figures = {"Layer stitching: KL against the split layer": plot_stitching_sweep(sweep), **make_figures(tables)}
    write_report_html(cfg.out / "report.html", report, examples, kl_table, figures=figures)
    return report


def top_latent_rows(table: pd.DataFrame, matrix: pd.DataFrame, latents: list[int]) -> list[dict[str, Any]]:
    """What the report says about each shown latent: geometry, ν, activity, matched behaviour."""
    rows = []
    for j in latents:
        row: dict[str, Any] = {"latent": int(j)}
        for col in ("delta", "tag", "nu_error", "nu_recon", "nu_act", "count_active"):
            if col in table.columns and pd.notna(table.at[j, col]):
                v = table.at[j, col]
                row[col] = v if isinstance(v, str) else _f(v)
        if j in matrix.index and matrix.loc[j].notna().any():
            b = str(matrix.loc[j].idxmax())
            row["matched_behaviour"], row["auroc"] = b, _f(matrix.at[j, b])
        rows.append(row)
    return rows


def make_figures(tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """The analysis plots for the report (plotly figures, titled)."""
    from sae_diff.analysis import plots

    figs: dict[str, Any] = {}
    for name in ("l1_crosscoder", "batchtopk_crosscoder"):
        figs[f"{name}: Δ histogram by tag"] = plots.delta_histogram(tables[name])
        figs[f"{name}: ν_ε vs ν_r (ft-only vs shared)"] = plots.nu_scatter(tables[name])
    for name, table in tables.items():
        figs[f"{name}: β distributions"] = plots.beta_distributions(table)
        figs[f"{name}: firing frequency vs ratio"] = plots.frequency_vs_ratio(table)
    return figs


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _f(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else round(x, 4)


def build_report(cfg: DemoConfig, org: Any, hook: str, cache: ActivationCache, dictionaries: dict[str, SAE[Any]],
                 tables: dict[str, pd.DataFrame], scores: dict[str, Any], gap: pd.DataFrame, kl_table: pd.DataFrame,
                 labels: dict[str, torch.Tensor], scored: torch.Tensor) -> dict[str, Any]:
    """Every number the HTML shows, as plain JSON-able data."""
    rows = []
    sample = _sample_acts(cache)
    for name, sae in dictionaries.items():
        kind = METHODS[name]["kind"]
        table = tables[name]
        fve = _fve_per_model(sae, METHODS[name]["mode"], sample)
        row: dict[str, Any] = {
            "method": name,
            "architecture": METHODS[name]["architecture"],
            "d_sae": int(sae.cfg.d_sae),
            "fve_base": _f(fve.get("base", float("nan"))),
            "fve_ft": _f(fve.get("ft", float("nan"))),
            "fve_diff": _f(fve.get("diff", float("nan"))),
            "l0": _f(fve["l0"]),
            "dead_fraction": _f((table["count_active"] == 0).mean()),
        }
        if kind == "crosscoder":
            row["n_ft_only"] = int((table["tag"] == "ft_only").sum())
        else:
            row["n_ft_only"] = None
        row["n_nu_filtered"] = int(nu_filter(table, kind, cfg).sum())
        for s in scores[name]:
            row[f"auroc_{s.behaviour}"] = _f(s.best_auroc)
            row[f"rank_{s.behaviour}"] = s.rank
            row[f"latent_{s.behaviour}"] = s.latent
        if name in gap.index:
            g = gap.loc[name]
            row.update({
                "kl_closed_reconstruction": _f(g["reconstruction"]),
                "kl_closed_error": _f(g["error"]),
                "kl_closed_nu_subset": _f(g["nu_subset_closed"]),
                "kl_nu_subset": g["nu_subset"],
                "kl_closed_random": _f(g["nu_random"]),
                "kl_closed_random_std": _f(g["nu_random_std"]),
            })
        rows.append(row)
    crosscoder_artefacts = {}
    for name in ("l1_crosscoder", "batchtopk_crosscoder"):
        t = tables[name]
        ft = t[(t["tag"] == "ft_only") & (t["count_active"] >= 1)]
        measured = ft.dropna(subset=["nu_error", "nu_recon"])
        crosscoder_artefacts[name] = {
            "n_ft_only": int(len(ft)),
            "min_delta_active": _f(t.loc[t["count_active"] >= 1, "delta"].min()),
            "n_with_nu": int(len(measured)),
            "n_complete_shrinkage": int((measured["nu_error"] >= cfg.nu_eps_max).sum()),
            "n_latent_decoupling": int((measured["nu_recon"] >= cfg.nu_r_max).sum()),
            "n_artefact": int(((measured["nu_error"] >= cfg.nu_eps_max) | (measured["nu_recon"] >= cfg.nu_r_max)).sum()),
        }
    return {
        "config": {k: v for k, v in asdict(cfg).items() if k != "timings"},
        "organism": {"name": cfg.organism, "base": org.base_name, "ft": org.ft_name, "hook": hook,
                     "behaviours": list(labels), "label_tokens": {b: int(m[scored].sum()) for b, m in labels.items()},
                     "scored_tokens": int(scored.sum())},
        "cache": {"tokens": int(cache.n_tokens), "shards": int(cache.n_shards), "bytes": int(cache.nbytes)},
        "scoreboard": rows,
        "crosscoder_artefacts": crosscoder_artefacts,
        "kl_patching": json.loads(kl_table.reset_index(drop=True).to_json(orient="records")),
    }


def _sample_acts(cache: ActivationCache, max_tokens: int = 20000) -> torch.Tensor:
    """The first ``max_tokens`` kept paired activations of the cache (read once per report)."""
    xs, n = [], 0
    for batch in cache_batches(cache):
        xs.append(batch.acts.float())
        n += batch.acts.shape[0]
        if n >= max_tokens:
            break
    return torch.cat(xs)[:max_tokens]


@torch.no_grad()
def _fve_per_model(sae: SAE[Any], mode: str, x: torch.Tensor) -> dict[str, float]:
    """Fraction of variance explained of what the dictionary reads (per model for crosscoders,
    the difference for the diff-SAE, ft for the chat-SAE), plus mean L0."""
    x_in = select_mode(x, mode, getattr(sae.cfg, "diff_sign", "ft_minus_base"))
    f = sae.encode(x_in)
    rec = sae.decode(f)
    if mode == "paired":
        out = {m: fraction_of_variance_explained(x_in[:, i], rec[:, i]) for i, m in enumerate(("base", "ft"))}
    else:
        out = {mode: fraction_of_variance_explained(x_in, rec)}
    out["l0"] = float((f > 0).float().sum(-1).mean())
    return out


def print_summary(report: dict[str, Any]) -> None:
    """A short plain-text scoreboard for the terminal."""
    board = pd.DataFrame(report["scoreboard"]).set_index("method")
    cols = [c for c in board.columns if c.startswith(("fve", "l0", "dead", "n_", "auroc", "kl_closed_re", "kl_closed_er"))]
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(board[cols].to_string())
    for f in report["findings"]:
        print(f"- {f['question']}\n  {f['answer']}")
    print(f"Total time: {report['timings_s']['total']:.0f} s; report in {report['config']['out']}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sae-diff demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default demo_output/)")
    ap.add_argument("--quick", action="store_true", help="CI size: same pipeline, smaller numbers (< 2 min)")
    ap.add_argument("--organism", default="default", help="bundled organism name or a directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; use 1 on a busy machine)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    make = DemoConfig.quick_config if args.quick else DemoConfig
    cfg = make(out=args.out, organism=args.organism, seed=args.seed)
    report = run_demo(cfg)
    print_summary(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
