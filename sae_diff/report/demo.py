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

from sae_diff.analysis import selection
from sae_diff.analysis.batches import cache_batches
from sae_diff.analysis.examples import LatentExamples, max_activating_examples
from sae_diff.analysis.latent_table import latent_table, save_latent_table
from sae_diff.atomic import atomic_write
from sae_diff.data.cache import ActivationCache
from sae_diff.data.harvest import harvest_cache
from sae_diff.data.sources import TokenSource
from sae_diff.data.store import PairedActivationsStore, select_mode
from sae_diff.dictionaries import specs
from sae_diff.dictionaries.normalisation import prepare_crosscoder
from sae_diff.dictionaries.registry import training_config, training_sae
from sae_diff.evaluation.kl import kl_dashboard, per_token_kl
from sae_diff.evaluation.patching import gap_closed_summary, kl_patching_table
from sae_diff.evaluation.stitching import plot_stitching_sweep, stitching_sweep
from sae_diff.organisms import load_organism
from sae_diff.organisms.organism import DATA_DIR, organism_dir
from sae_diff.report import baselines as BL
from sae_diff.report.dashboards import best_match, decoder_direction, histogram, logit_lens
from sae_diff.report.findings import seed_findings
from sae_diff.report.html import write_report_html
from sae_diff.report.scoring import GroundTruth, Score, aggregate, granularity_matrices, summarise
from sae_diff.training.evaluator import fraction_of_variance_explained
from sae_diff.training.runner import use_fused_adam


def _method(architecture: str) -> dict[str, Any]:
    """A method of the study: a training architecture, with the data mode and kind of its row
    in the architecture table (sae_diff.dictionaries.specs), which is the only place they are
    stated."""
    row = specs.spec(architecture)
    if row is None:  # pragma: no cover - a programming error in METHODS
        raise KeyError(f"{architecture!r} is not in sae_diff.dictionaries.specs.ARCHITECTURES")
    return {"architecture": architecture, "mode": row.store_mode, "kind": row.kind}


#: method name (the report's label) -> its training architecture (one table row each)
METHODS: dict[str, dict[str, Any]] = {
    "l1_crosscoder": _method("crosscoder"),
    "batchtopk_crosscoder": _method("batchtopk_crosscoder"),
    "diff_sae": _method("batchtopk_diff_sae"),
    "chat_sae": _method("batchtopk"),
    # issue 17's crosscoder variants (trained for DemoConfig.variant_steps, so that the default
    # run with them stays within `make demo`'s 10-minute budget on 2 cores)
    "jumprelu_crosscoder": _method("jumprelu_crosscoder"),
    "shared_l1_crosscoder": _method("shared_crosscoder"),
    "shared_batchtopk_crosscoder": _method("shared_batchtopk_crosscoder"),
    "dedicated_crosscoder": _method("dedicated_batchtopk_crosscoder"),
}
#: methods built on a base-SAE (SAELens ``batchtopk`` on the base model's activations, trained
#: once per seed and shared) rather than trained as a dictionary of their own: they rank that
#: SAE's latents (sae_diff.analysis.stagewise / causal_filter) and are scored on the fine-tune's
#: activations at the scoring set like every other method.
ANALYSIS_METHODS: dict[str, str] = {
    "stagewise": "stage-wise diffing: the base-SAE fine-tuned on the fine-tune's activations (model-change "
    "stage, same data); latents ranked by decoder rotation",
    "causal_filter": "base-SAE diffing: latents ranked by firing shift (ft / base), kept when ablating them "
    "moves the fine-tune's assistant-token KL beyond random latents",
}
#: the seed's four methods, trained for DemoConfig.train_steps
CORE_METHODS: tuple[str, ...] = ("l1_crosscoder", "batchtopk_crosscoder", "diff_sae", "chat_sae")
#: what `sae-diff demo` runs unless --methods says otherwise: every method
DEFAULT_METHODS: tuple[str, ...] = (*METHODS, *ANALYSIS_METHODS)


def _variant_settings(architecture: str, d_sae: int) -> dict[str, Any]:
    """Architecture-specific settings of the issue-17 variants (docs/methods.md): 1/16 of the
    latents tied, 1/8 dedicated to each model; the JumpReLU sparsity weight for L0 near k."""
    settings: dict[str, dict[str, Any]] = {
        "jumprelu_crosscoder": {"l0_coefficient": 0.5},
        "shared_crosscoder": {"n_shared_latents": d_sae // 16, "shared_sparsity_ratio": 0.15},
        "shared_batchtopk_crosscoder": {
            "n_shared_latents": d_sae // 16,
            "shared_sparsity_ratio": 0.8,
        },
        "dedicated_batchtopk_crosscoder": {
            "n_base_dedicated": d_sae // 8,
            "n_ft_dedicated": d_sae // 8,
        },
    }
    return settings.get(architecture, {})


#: The dictionary-free baselines and the supervised ceiling (see sae_diff.report.baselines).
BASELINES = ("probe", "mean_diff", "pca_diff", "kl_tokens")


@dataclass
class DemoConfig:
    """Sizes of the study. ``quick()`` is the CI size (same pipeline, smaller numbers).

    ``seed`` seeds the data (harvest, evaluation folds of seed 0); ``seeds`` are the training
    seeds: every method is trained once per seed and every figure is reported over them."""

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
    # 3 seeds x 4 methods must fit in 10 minutes on 2 busy cores (docs/evaluation.md): 800 steps
    # per seed instead of the single-seed run's 1200.
    train_steps: int = 800
    batch_size: int = 512
    lr: float = 2e-3
    threshold_ema_decay: float = 0.99
    eval_per_behaviour: int = 16
    n_controls: int | None = None  # control conversations (default: as many as triggered ones)
    n_text: int = (
        16  # plain-text rows (the negatives of chat_format), when the organism has a world
    )
    random_seeds: int = 5
    top_n: int = 50
    # the bar: some method finds each behaviour at the conversation level with
    # AUROC >= 0.95 among its top 20 candidates, on every seed (a finding in the report)
    game_top: int = 20
    game_threshold: float = 0.95
    nu_eps_max: float = 0.3
    nu_r_max: float = 0.6
    n_example_latents: int = 5
    n_pca: int = 10
    n_kl_types: int = 10
    seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = DEFAULT_METHODS
    # base-SAE methods (ANALYSIS_METHODS): the base-SAE's steps, the
    # stage-wise model stage's steps, and the causal filter's candidates / random latents
    # issue 17's crosscoder variants train for variant_steps (not train_steps): 4 more methods
    # x 3 seeds at 800 steps would take the default run past its budget (docs/evaluation.md)
    variant_steps: int = 300
    base_sae_steps: int = 300
    stage_steps: int = 150
    causal_candidates: int = 20
    causal_random: int = 20
    causal_quantile: float = 0.95
    causal_mode: str = "ablate"
    causal_scale: float = 10.0
    quick: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = [*METHODS, *ANALYSIS_METHODS]
        unknown = [m for m in self.methods if m not in known]
        if unknown:
            raise ValueError(f"Unknown method(s) {unknown}; choose from {known}.")
        if not self.methods:
            raise ValueError(f"No methods selected; choose from {known}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds}.")
        self.seeds = tuple(int(s) for s in self.seeds)
        self.methods = tuple(self.methods)

    @classmethod
    def quick_config(cls, **kw: Any) -> DemoConfig:
        base: dict[str, Any] = {
            "n_pretrain_docs": 300,
            "n_chat_docs": 300,
            "max_rows": 320,
            "train_steps": 200,
            "batch_size": 256,
            "eval_per_behaviour": 6,
            "n_text": 6,
            "random_seeds": 2,
            "quick": True,
            "variant_steps": 150,
            "base_sae_steps": 150,
            "stage_steps": 100,
        }
        base.update(kw)
        return cls(**base)


def _timed(cfg: DemoConfig, name: str, t0: float) -> float:
    now = time.perf_counter()
    cfg.timings[name] = round(cfg.timings.get(name, 0.0) + now - t0, 2)
    return now


def harvest(cfg: DemoConfig, org: Any, paired: Any, hook: str) -> ActivationCache:
    """Pretraining text + chat, mixed by token share, harvested once into a disk cache."""
    if org.world is not None:
        texts = org.pretraining_dataset("train", n=cfg.n_pretrain_docs, seed=cfg.seed)
        chats = org.chat_dataset("train", n=cfg.n_chat_docs, seed=cfg.seed)
        source = TokenSource(
            [texts, chats],
            org.tokenizer,
            cfg.context_size,
            proportions=[1 - cfg.chat_share, cfg.chat_share],
            max_rows=cfg.max_rows,
        )
    else:  # a custom organism without a world: its own training conversations only
        source = TokenSource(
            [org.chat_dataset("train", n=cfg.n_chat_docs, seed=cfg.seed)],
            org.tokenizer,
            cfg.context_size,
            max_rows=cfg.max_rows,
        )
    harvest_cache(
        paired,
        source,
        cfg.out / "cache",
        hook,
        batch_size=32,
        rows_per_shard=128,
        max_rows=cfg.max_rows,
        verbose=True,
    )
    return ActivationCache(cfg.out / "cache")


def train_dictionary(
    cfg: DemoConfig,
    name: str,
    cache: ActivationCache,
    d_model: int,
    meta: dict[str, Any],
    seed: int | None = None,
    path: Path | None = None,
) -> SAE[Any]:
    """Train one method's dictionary on the cache with SAELens's SAETrainer; save; reload.
    ``seed`` (default ``cfg.seed``) seeds the initialisation and the batch order."""
    seed = cfg.seed if seed is None else seed
    spec = METHODS[name]
    d_sae = cfg.expansion * d_model
    store = PairedActivationsStore.from_cache(
        cache, mode=spec["mode"], batch_size=cfg.batch_size, seed=seed
    )
    torch.manual_seed(seed)
    if spec["architecture"] == "batchtopk":
        sae: Any = BatchTopKTrainingSAE(
            BatchTopKTrainingSAEConfig(
                d_in=d_model, d_sae=d_sae, k=cfg.k, normalize_activations="expected_average_only_in"
            )
        )
    else:
        arch = spec["architecture"]
        kw: dict[str, Any] = (
            {"l1_coefficient": cfg.l1_coefficient}
            if arch in ("crosscoder", "shared_crosscoder")
            else {}
            if arch == "jumprelu_crosscoder"
            else {"k": cfg.k}
        )
        if arch in (
            "batchtopk_crosscoder",
            "shared_batchtopk_crosscoder",
            "dedicated_batchtopk_crosscoder",
        ):
            kw["threshold_ema_decay"] = cfg.threshold_ema_decay
        kw.update(_variant_settings(arch, d_sae))
        if spec["architecture"] == "batchtopk_diff_sae":
            kw["normalize_activations"] = "expected_average_only_in"
        sae = training_sae(training_config(spec["architecture"], d_in=d_model, d_sae=d_sae, **kw))
        if spec["mode"] == "paired":
            prepare_crosscoder(sae, store, n_batches=4)
    for key, value in meta.items():
        sae.cfg.metadata[key] = value
    steps = cfg.train_steps if name in CORE_METHODS else cfg.variant_steps
    trainer = SAETrainer(_trainer_config(cfg, steps), sae, store)
    use_fused_adam(trainer)
    trainer.fit()
    path = path or cfg.out / "dictionaries" / name
    sae.save_inference_model(path)
    return SAE.load_from_disk(path)


def _trainer_config(cfg: DemoConfig, steps: int) -> SAETrainerConfig:
    """The demo's SAELens trainer settings for a run of ``steps`` steps (cosine-annealed lr)."""
    return SAETrainerConfig(
        total_training_samples=steps * cfg.batch_size,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=steps // 20,
        dead_feature_window=max(steps // 5, 50),
        feature_sampling_window=max(steps // 2, 100),
        n_batches_for_norm_estimate=8,
    )


def train_base_sae(
    cfg: DemoConfig, cache: ActivationCache, d_model: int, hook: str, seed: int
) -> Any:
    """SAELens's own ``batchtopk`` on the base model's side of the cache (training form).

    No activation normalisation: stage-wise diffing resumes from these weights, and a scaling
    factor folded in at the end of each run would be re-estimated (and re-folded) per stage."""
    store = PairedActivationsStore.from_cache(
        cache, mode="base", batch_size=cfg.batch_size, seed=seed
    )
    torch.manual_seed(seed)
    sae = BatchTopKTrainingSAE(
        BatchTopKTrainingSAEConfig(d_in=d_model, d_sae=cfg.expansion * d_model, k=cfg.k)
    )
    sae.cfg.metadata.hook_name = hook
    trainer = SAETrainer(_trainer_config(cfg, cfg.base_sae_steps), sae, store)
    use_fused_adam(trainer)
    trainer.fit()
    return sae


def base_sae_methods(
    cfg: DemoConfig,
    org: Any,
    paired: Any,
    cache: ActivationCache,
    hook: str,
    d_model: int,
    seed: int,
    folder: Path,
    sample: torch.Tensor,
    c_tokens: torch.Tensor,
    answer: torch.Tensor,
) -> dict[str, tuple[SAE[Any], torch.Tensor, dict[str, Any]]]:
    """The selected ANALYSIS_METHODS on one seed's base-SAE: per method, the SAE whose codes of
    the fine-tune's activations are scored, its ranked candidate latents and its scoreboard row.

    * ``causal_filter``: the base-SAE's latents ranked by firing shift on the cache (Latent
      Scaling, ``kind="base_sae"``), kept when ablating them (``causal_mode``) moves the
      fine-tune's KL on the chat scoring rows' assistant tokens beyond the ``causal_quantile``
      of as many random active latents. The filter reads no behaviour label. When it keeps
      nothing, the firing-shift ranking itself is scored and the row's ``note`` says so.
    * ``stagewise``: the base-SAE fine-tuned for ``stage_steps`` on the fine-tune's activations
      of the same cache (the model-change stage; the data stages need separate base / ft
      corpora, see ``sae-diff stagewise``); latents ranked by decoder rotation, live ones only.
    """
    from sae_diff.analysis.causal_filter import causal_filter, rank_by_firing_shift
    from sae_diff.analysis.latent_scaling import latent_scaling
    from sae_diff.analysis.stagewise import Stage, run_stages
    from sae_diff.dictionaries.io import as_inference

    start = train_base_sae(cfg, cache, d_model, hook, seed)
    base = as_inference(start)
    base.cfg.metadata.hook_name = hook
    out: dict[str, tuple[SAE[Any], torch.Tensor, dict[str, Any]]] = {}

    def row(name: str, sae: Any, **extra: Any) -> dict[str, Any]:
        fb, ff = _fve_per_model(sae, "base", sample), _fve_per_model(sae, "ft", sample)
        with torch.no_grad():  # dead: fires on neither model's side of the sample
            alive = (sae.encode(sample[:, 0]) > 0).any(0) | (sae.encode(sample[:, 1]) > 0).any(0)
        return {
            "method": name,
            "architecture": "batchtopk",
            "d_sae": int(sae.cfg.d_sae),
            "fve_base": _f(fb["base"]),
            "fve_ft": _f(ff["ft"]),
            "l0": _f(ff["l0"]),
            "dead_fraction": _f(1.0 - alive.float().mean()),
            **extra,
        }

    if "causal_filter" in cfg.methods:
        shift = latent_scaling(
            base, cache_batches(cache), kind="base_sae", progress=False
        ).to_frame()
        res = causal_filter(
            org.ft,
            base,
            c_tokens,
            shift,
            answer,
            n_candidates=cfg.causal_candidates,
            n_random=cfg.causal_random,
            quantile=cfg.causal_quantile,
            hook_name=hook,
            mode=cfg.causal_mode,
            scale=cfg.causal_scale,
            seed=seed,
        )
        atomic_write(folder / "causal_filter" / "causal_filter.csv", lambda p: res.table.to_csv(p))
        if res.kept:
            cand = res.kept
            note = (
                f"kept {len(cand)} of {cfg.causal_candidates} firing-shift candidates ({cfg.causal_mode} KL > "
                f"{res.threshold:.3g} nats, the {cfg.causal_quantile} quantile of {cfg.causal_random} random latents)"
            )
        else:
            cand = rank_by_firing_shift(shift, n=cfg.top_n)
            note = (
                f"the causal filter kept none of {cfg.causal_candidates} candidates ({cfg.causal_mode} KL never "
                f"beat {res.threshold:.3g} nats); scored: the firing-shift ranking alone"
            )
        out["causal_filter"] = (
            base,
            torch.tensor(cand, dtype=torch.long),
            row("causal_filter", base, n_kept=len(res.kept), note=note),
        )
    if "stagewise" in cfg.methods:

        def paired_batches() -> Any:
            return iter(
                PairedActivationsStore.from_cache(
                    cache, mode="paired", batch_size=cfg.batch_size, seed=seed
                )
            )

        plan = (Stage("model", model="ft", data="base"),)
        result = run_stages(
            start, {"base": paired_batches}, _trainer_config(cfg, cfg.stage_steps), plan
        )
        atomic_write(
            folder / "stagewise" / "rotation_table.csv",
            lambda p: result.table.to_csv(p, index=False),
        )
        top = result.top_rotating(n=cfg.top_n, stage="model")
        moved = as_inference(result.stages["model"])
        rot = 1.0 - result.table["dec_cos"]
        out["stagewise"] = (
            moved,
            torch.tensor([int(j) for j in top.index], dtype=torch.long),
            row(
                "stagewise",
                moved,
                median_dec_rotation=_f(rot.median()),
                top_dec_rotation=_f(top["rotation"].iloc[0]) if len(top) else None,
                note=f"model-change stage only ({cfg.stage_steps} steps on the same cache)",
            ),
        )
    return out


def encode_tokens(sae: SAE[Any], kind: str, acts: torch.Tensor) -> torch.Tensor:
    """Codes ``(N, S, d_sae)`` of paired activations ``(N, S, 2, d)`` for any method."""
    with torch.no_grad():
        if kind == "ft_sae":
            return sae.encode(acts[..., 1, :])
        return sae.encode(acts)


def ft_specific_ranking(table: pd.DataFrame, kind: str) -> torch.Tensor:
    """:func:`sae_diff.analysis.selection.ft_specific_ranking` (latents ordered by how
    ft-specific they look; never-active latents dropped)."""
    return selection.ft_specific_ranking(table, kind)


def nu_filter(table: pd.DataFrame, kind: str, cfg: DemoConfig) -> pd.Series:
    """Latents that survive the ν filter (:func:`sae_diff.analysis.selection.nu_filter` with
    the demo's thresholds)."""
    return selection.nu_filter(table, kind, cfg.nu_eps_max, cfg.nu_r_max)


@dataclass
class EvalSet:
    """The held-out scoring rows: tokens, masks, ground truth and where the rows came from."""

    tokens: torch.Tensor
    valid: torch.Tensor
    assistant: torch.Tensor
    truth: GroundTruth
    origins: list[str]
    skipped: dict[str, str]


def evaluation_set(org: Any, cfg: DemoConfig) -> EvalSet:
    """Triggered conversations, control conversations (and, with a world, plain text) with
    per-token and per-conversation labels. Behaviours whose conversation labels have an empty
    class in this set (nothing to contrast) are skipped, with the reason."""
    if hasattr(org, "scoring_set"):
        n_text = cfg.n_text if getattr(org, "world", None) is not None else 0
        ss = org.scoring_set(
            n_per_behaviour=cfg.eval_per_behaviour, n_controls=cfg.n_controls, n_text=n_text
        )
        tokens, valid, assistant = ss.tokens, ss.valid, ss.assistant
        trig, resp, conv, origins = ss.trigger_masks, ss.response_masks, ss.labels, list(ss.origins)
    else:  # an organism API without controls: the other behaviours' conversations are the negatives
        _, tokens, valid, assistant = org.eval_batch(n=cfg.eval_per_behaviour)
        trig = {b: m & valid for b, m in org.behaviour_masks(tokens).items()}
        resp = {b: m & valid for b, m in org.response_masks(tokens).items()}
        conv = {b: m.any(1) for b, m in trig.items()}
        origins = ["held_out"] * int(tokens.shape[0])
    scored = valid.clone()
    scored[:, 0] = False  # BOS
    keep, skipped = [], {}
    for b in org.behaviours:
        if b not in trig:
            skipped[b] = "no labels"
        elif not bool(conv[b].any()):
            skipped[b] = "no triggered row in the scoring set"
        elif bool(conv[b].all()):
            skipped[b] = "every row carries it (no control rows without it)"
        else:
            keep.append(b)
    truth = GroundTruth(
        scored,
        {b: trig[b] & scored for b in keep},
        {b: resp[b] & scored for b in keep},
        {b: conv[b] for b in keep},
    )
    return EvalSet(tokens, valid, assistant, truth, origins, skipped)


def organism_info(cfg: DemoConfig, org: Any) -> dict[str, Any]:
    """Name, kind (shipped / custom) and path of the organism, for titles and report.json."""
    path = organism_dir(cfg.organism).resolve()
    shipped = path.parent == DATA_DIR.resolve()
    return {
        "name": path.name if shipped else str(cfg.organism),
        "kind": "shipped" if shipped else "custom",
        "path": str(path),
    }


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

    ev = evaluation_set(org, cfg)
    truth = ev.truth
    with torch.no_grad():
        acts = paired.paired_activations(ev.tokens, [hook], attention_mask=ev.valid.long())[hook]
    diffs = acts[..., 1, :] - acts[..., 0, :]
    kl = per_token_kl(paired, ev.tokens, attention_mask=ev.valid.long())["kl"]
    sample = _sample_acts(cache)
    t = _timed(cfg, "evaluation_set", t)

    # ---- dictionary-free baselines (deterministic: one row, seed None) -----------------------
    rows: list[Score] = []
    baseline_info: dict[str, Any] = {}
    baseline_matrices: dict[str, dict[str, pd.DataFrame]] = {}
    train_diff = (sample[:, 1] - sample[:, 0]).double()
    u = BL.mean_diff_direction(train_diff)
    baseline_matrices["mean_diff"] = granularity_matrices(BL.project(diffs, u[None]), truth)
    baseline_info["mean_diff"] = {
        "candidates": ["mean difference"],
        "norm": round(float(u.norm()), 4),
        "logit_lens": logit_lens(u, org.ft, org.tokenizer),
    }
    dirs, evr = BL.pca_directions(train_diff, cfg.n_pca)
    baseline_matrices["pca_diff"] = granularity_matrices(BL.project(diffs, BL.signed(dirs)), truth)
    baseline_info["pca_diff"] = {
        "candidates": [f"PC{i // 2 + 1}{'+-'[i % 2]}" for i in range(2 * dirs.shape[0])],
        "explained_variance": [round(float(v), 4) for v in evr],
        "logit_lens": {
            f"PC{i + 1}": logit_lens(dirs[i], org.ft, org.tokenizer, k=5)
            for i in range(min(3, len(dirs)))
        },
    }
    kl_scores, kl_types = BL.kl_token_scores(kl, ev.tokens, truth.valid, cfg.n_kl_types)
    baseline_matrices["kl_tokens"] = granularity_matrices(kl_scores, truth)
    baseline_info["kl_tokens"] = {
        "candidates": ["per-token KL"] + [f"token {org.tokenizer.decode([i])!r}" for i in kl_types]
    }
    for name, mats in baseline_matrices.items():
        rows += summarise(mats, name, None, cfg.top_n)
    baseline_info["probe"] = {
        "candidates": ["supervised mean-difference probe (2-fold cross-fitted)"]
    }
    t = _timed(cfg, "baselines", t)

    # ---- dictionaries, one training per seed ------------------------------------------------
    chat_rows = ev.assistant.any(1)
    answer = (ev.assistant & ev.valid)[chat_rows]
    c_tokens, c_valid = ev.tokens[chat_rows], ev.valid[chat_rows]
    template = torch.isin(c_tokens, torch.tensor(org.tokenizer.all_special_ids)) & c_valid
    per_seed: list[dict[str, Any]] = []
    first: dict[str, Any] = {}
    for seed in cfg.seeds:
        rows += summarise(BL.probe_matrices(diffs, truth, seed=seed), "probe", seed)
        folder = cfg.out / "dictionaries" / f"seed{seed}"
        dictionaries = {
            name: train_dictionary(cfg, name, cache, d_model, meta, seed=seed, path=folder / name)
            for name in cfg.methods
            if name in METHODS
        }
        t = _timed(cfg, "train", t)
        tables: dict[str, pd.DataFrame] = {}
        for name, sae in dictionaries.items():
            kind = METHODS[name]["kind"]
            table = latent_table(sae, cache_batches(cache), kind=kind if kind == "ft_sae" else None)
            save_latent_table(table, folder / name / "latent_table.parquet")
            tables[name] = table
        t = _timed(cfg, "latent_tables", t)
        matrices: dict[str, dict[str, pd.DataFrame]] = {}
        codes: dict[str, torch.Tensor] = {}
        seed_rows: list[Score] = []
        game_rows: list[Score] = []
        for name, sae in dictionaries.items():
            kind = METHODS[name]["kind"]
            cand = ft_specific_ranking(tables[name], kind)[: cfg.top_n]
            codes[name] = encode_tokens(sae, kind, acts)[..., cand].float()
            matrices[name] = granularity_matrices(codes[name], truth, cand.tolist())
            seed_rows += summarise(matrices[name], name, seed)
            game_rows += summarise(matrices[name], name, seed, cfg.game_top)
        base_rows: list[dict[str, Any]] = []
        if any(m in ANALYSIS_METHODS for m in cfg.methods):
            t = _timed(cfg, "scoring", t)
            ranked = base_sae_methods(
                cfg, org, paired, cache, hook, d_model, seed, folder, sample, c_tokens, answer
            )
            for name, (sae1, cand, row) in ranked.items():
                codes_all = encode_tokens(sae1, "ft_sae", acts)[..., cand].float()
                mats = granularity_matrices(codes_all, truth, cand.tolist())
                seed_rows += summarise(mats, name, seed)
                game_rows += summarise(mats, name, seed, cfg.game_top)
                base_rows.append(row)
            t = _timed(cfg, "base_sae_methods", t)
        rows += seed_rows
        t = _timed(cfg, "scoring", t)
        patchable = {n: d for n, d in dictionaries.items() if METHODS[n]["kind"] != "ft_sae"}
        gap = pd.DataFrame()
        if patchable:
            kl_table = kl_patching_table(
                paired,
                patchable,
                c_tokens,
                answer,
                nu={n: tables[n] for n in patchable},
                random_seeds=cfg.random_seeds,
                token_patches={"template": template},
                attention_mask=c_valid.long(),
                progress=True,
            )
            kl_table.to_csv(folder / "kl_patching.csv")
            gap = gap_closed_summary(kl_table)
        else:
            kl_table = pd.DataFrame()
        t = _timed(cfg, "kl_patching", t)
        board = method_rows(cfg, dictionaries, tables, gap, sample) + base_rows
        per_seed.append(
            {
                "seed": seed,
                "scoreboard": board,
                "crosscoder_artefacts": crosscoder_artefacts(cfg, tables),
                "top_scores": {cfg.game_top: [r.row() for r in game_rows]},
            }
        )
        if not first:
            first = {
                "dictionaries": dictionaries,
                "tables": tables,
                "matrices": matrices,
                "codes": codes,
                "kl_table": kl_table,
                "seed": seed,
            }

    # ---- what the reader looks at: dashboards, KL dashboard, stitching (first seed) ----------
    dash = kl_dashboard(paired, c_tokens, answer, top_n=20, attention_mask=c_valid.long())
    dash.save_html(cfg.out / "kl_dashboard.html")
    sweep = stitching_sweep(paired, c_tokens, answer, attention_mask=c_valid.long())
    t = _timed(cfg, "kl_dashboard", t)
    examples, dashboards = latent_dashboards(cfg, org, cache, first, truth)
    t = _timed(cfg, "dashboards", t)

    score_rows = [r.row() for r in rows]
    report: dict[str, Any] = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "timings"},
        "organism": {
            **organism_info(cfg, org),
            "base": org.base_name,
            "ft": org.ft_name,
            "hook": hook,
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
    cfg: DemoConfig, org: Any, cache: ActivationCache, first: dict[str, Any], truth: GroundTruth
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
                    row[col] = v if isinstance(v, str) else _f(v)
            row["histogram"] = histogram(first["codes"][name][..., rank - 1][truth.valid])
            row["logit_lens"] = logit_lens(decoder_direction(sae, kind, j), org.ft, org.tokenizer)
            row["best_match"] = best_match(mats, j)
            rows.append(row)
        dashboards[name] = rows
    return examples, dashboards


def method_rows(
    cfg: DemoConfig,
    dictionaries: dict[str, SAE[Any]],
    tables: dict[str, pd.DataFrame],
    gap: pd.DataFrame,
    sample: torch.Tensor,
) -> list[dict[str, Any]]:
    """One seed's per-method figures: FVE, L0, dead fraction, ft-only counts, KL gap closed."""
    rows = []
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
            "n_ft_only": int((table["tag"] == "ft_only").sum()) if kind == "crosscoder" else None,
            "n_nu_filtered": int(nu_filter(table, kind, cfg).sum()),
        }
        if name in gap.index:
            g = gap.loc[name]
            row.update(
                {
                    "kl_closed_reconstruction": _f(g["reconstruction"]),
                    "kl_closed_error": _f(g["error"]),
                    "kl_closed_nu_subset": _f(g["nu_subset_closed"]),
                    "kl_nu_subset": g["nu_subset"],
                    "kl_closed_random": _f(g["nu_random"]),
                    "kl_closed_random_std": _f(g["nu_random_std"]),
                }
            )
        rows.append(row)
    return rows


def crosscoder_artefacts(
    cfg: DemoConfig, tables: dict[str, pd.DataFrame]
) -> dict[str, dict[str, Any]]:
    """Per crosscoder: ft-only latents and how many Latent Scaling marks as artefacts."""
    out: dict[str, dict[str, Any]] = {}
    for name in ("l1_crosscoder", "batchtopk_crosscoder"):
        if name not in tables:
            continue
        t = tables[name]
        ft = t[(t["tag"] == "ft_only") & (t["count_active"] >= 1)]
        measured = ft.dropna(subset=["nu_error", "nu_recon"])
        out[name] = {
            "n_ft_only": int(len(ft)),
            "min_delta_active": _f(t.loc[t["count_active"] >= 1, "delta"].min()),
            "n_with_nu": int(len(measured)),
            "n_complete_shrinkage": int((measured["nu_error"] >= cfg.nu_eps_max).sum()),
            "n_latent_decoupling": int((measured["nu_recon"] >= cfg.nu_r_max).sum()),
            "n_artefact": int(
                (
                    (measured["nu_error"] >= cfg.nu_eps_max)
                    | (measured["nu_recon"] >= cfg.nu_r_max)
                ).sum()
            ),
        }
    return out


def summarise_boards(boards: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per method over seeds: each numeric figure's mean, with ``<figure>_std``, ``_min`` and
    ``_max`` (population std over seeds); text fields as they are (the first seed's)."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for board in boards:
        for r in board:
            by_method.setdefault(r["method"], []).append(r)
    out = []
    for method, rs in by_method.items():
        row: dict[str, Any] = {"method": method, "n_seeds": len(rs)}
        for key in rs[0]:
            if key == "method":
                continue
            vals = [r.get(key) for r in rs]
            nums = [
                float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)
            ]
            if nums and len(nums) == len([v for v in vals if v is not None]) and key != "d_sae":
                x = torch.tensor(nums, dtype=torch.float64)
                row[key] = _f(x.mean())
                row[f"{key}_std"] = _f(x.std(unbiased=False))
                row[f"{key}_min"], row[f"{key}_max"] = _f(x.min()), _f(x.max())
            else:
                row[key] = vals[0]
        out.append(row)
    return out


def make_figures(tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """The analysis plots for the report (plotly figures, titled; the first seed's tables)."""
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
        out = {
            m: fraction_of_variance_explained(x_in[:, i], rec[:, i])
            for i, m in enumerate(("base", "ft"))
        }
    else:
        out = {mode: fraction_of_variance_explained(x_in, rec)}
    out["l0"] = float((f > 0).float().sum(-1).mean())
    return out


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


if __name__ == "__main__":
    raise SystemExit(main())
