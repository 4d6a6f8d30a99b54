"""Stage-wise model diffing (Anthropic, "Stage-Wise Model Diffing", 2024).

Start from an SAE trained on the base model's activations on base data, then fine-tune the
*dictionary* in stages that change one thing at a time:

    start  (base model, base data)
      ├─ data   (base model, ft data)     — only the data changed
      ├─ model  (ft model,  base data)    — only the model changed
      └─ both   (ft model,  ft data)      — resumed from ``data`` (the path S → D → F)

and follow every latent's encoder and decoder direction: its cosine to the direction it had at
the start and at the stage it resumed from. A latent that turns in a *model-change* stage (the
model differs from the parent stage's) while staying put in the data-only stage tracks a change
in the model's representation; one that turns only when the data changes tracks a change in
what the data exercises. Latents are never reshuffled by fine-tuning (each stage resumes from its
parent's weights), so latent j is the same latent in every stage.

Each stage is a SAELens ``SAETrainer`` run on one model's side of paired batches
``(B, 2, d)`` (index 0 = base, 1 = ft), e.g. ``PairedActivationsStore`` batches over the base
corpus and over the fine-tuning corpus, or ``sae_diff.synthetic`` data. The dictionary is any
SAELens training SAE (its ``W_enc (d, n)`` / ``W_dec (n, d)`` layout), typically SAELens's own
``batchtopk``.

Layout: this module is the end-to-end run on an organism and its command line; the stages,
``run_stages`` and the rotation table are :mod:`sae_diff.analysis.stages`, the rotation figure
:mod:`sae_diff.analysis.plots`, the config reading :mod:`sae_diff.analysis.config_file` (all
importable from here as before).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

from sae_diff.analysis.batches import cache_batches
from sae_diff.analysis.config_file import config_kwargs
from sae_diff.analysis.examples import LatentExamples, max_activating_examples
from sae_diff.analysis.plots import rotation_figure
from sae_diff.analysis.stages import (
    DEFAULT_STAGES,
    Stage,
    StagewiseResult,
    model_change_stages,
    model_side,
    run_stages,
)
from sae_diff.atomic import atomic_write
from sae_diff.data.cache import ActivationCache
from sae_diff.data.harvest import harvest_cache
from sae_diff.data.sources import TokenSource
from sae_diff.data.store import PairedActivationsStore
from sae_diff.moved import moved_names, to
from sae_diff.organisms import load_organism
from sae_diff.training.errors import ConfigError

__getattr__ = moved_names(
    __name__,
    to(
        "sae_diff.analysis.stages",
        [
            "DATA",
            "MODELS",
            "copy_sae",
            "firing_frequency",
            "rotation_table",
            "top_rotating",
        ],
    ),
)


@dataclass
class OrganismStagewise:
    """``stagewise_on_organism``'s output: the stages, the top rotating latents, their
    max-activating examples (last model-change stage's dictionary on ft data) and the files."""

    result: StagewiseResult
    top: pd.DataFrame
    examples: dict[int, LatentExamples]
    files: dict[str, Path]


def stagewise_on_organism(
    out: str | Path,
    *,
    organism: str = "default",
    hook: str | None = None,
    context_size: int = 64,
    n_docs: int = 300,
    max_rows: int = 320,
    expansion: int = 8,
    k: int = 16,
    start_steps: int = 300,
    stage_steps: int = 150,
    batch_size: int = 256,
    lr: float = 2e-3,
    n_top: int = 10,
    seed: int = 0,
    plan: Sequence[Stage] = DEFAULT_STAGES,
) -> OrganismStagewise:
    """Stage-wise diffing end to end on a bundled organism: harvest its pretraining text (base
    data) and its chat conversations (ft data) through both models into two caches under
    ``out``, train the start SAE (SAELens ``batchtopk``) on the base model / base data, run the
    stages, and write ``rotation_table.csv``, ``top_rotating.csv`` and ``rotation.html``."""
    out = Path(out)
    org = load_organism(organism)
    if org.world is None:
        raise ConfigError(
            f"Organism {organism!r} has no pretraining world: stage-wise diffing needs base data "
            "(its pretraining text) besides the fine-tuning conversations."
        )
    paired = org.paired()
    hook = hook or org.recommended_hook
    sources = {
        "base": org.pretraining_dataset("train", n=n_docs, seed=seed),
        "ft": org.chat_dataset("train", n=n_docs, seed=seed),
    }
    caches: dict[str, ActivationCache] = {}
    for name, ds in sources.items():
        src = TokenSource([ds], org.tokenizer, context_size, max_rows=max_rows)
        harvest_cache(
            paired,
            src,
            out / f"cache_{name}",
            hook,
            batch_size=32,
            rows_per_shard=128,
            max_rows=max_rows,
            progress=False,
            verbose=False,
        )
        caches[name] = ActivationCache(out / f"cache_{name}")

    def batches(name: str) -> Callable[[], Iterator[torch.Tensor]]:
        def make() -> Iterator[torch.Tensor]:
            return iter(
                PairedActivationsStore.from_cache(
                    caches[name], mode="paired", batch_size=batch_size, seed=seed
                )
            )

        return make

    d_model = int(paired.base.cfg.d_model)
    torch.manual_seed(seed)
    start = BatchTopKTrainingSAE(
        BatchTopKTrainingSAEConfig(d_in=d_model, d_sae=expansion * d_model, k=k)
    )
    start.cfg.metadata.hook_name = hook

    def trainer(steps: int) -> SAETrainerConfig:
        return SAETrainerConfig(
            total_training_samples=steps * batch_size,
            train_batch_size_samples=batch_size,
            lr=lr,
            lr_end=lr,
            dead_feature_window=max(steps // 2, 50),
            feature_sampling_window=max(steps, 100),
        )

    SAETrainer(trainer(start_steps), start, model_side(batches("base")(), 0)).fit()
    result = run_stages(
        start, {"base": batches("base"), "ft": batches("ft")}, trainer(stage_steps), plan
    )
    top = result.top_rotating(n=n_top)
    last = [s for s in plan if s.name in model_change_stages(plan)][-1]
    examples = max_activating_examples(
        result.stages[last.name],
        cache_batches(caches[last.data]),
        caches[last.data].tokens(),
        [int(j) for j in top.index],
        kind="ft_sae" if last.model == "ft" else "base_sae",
        k=5,
        n_quantiles=2,
        per_quantile=2,
        tokenizer=org.tokenizer,
        progress=False,
    )
    files = {
        "rotation_table": out / "rotation_table.csv",
        "top_rotating": out / "top_rotating.csv",
        "figure": out / "rotation.html",
    }
    atomic_write(files["rotation_table"], lambda p: result.table.to_csv(p, index=False))
    atomic_write(files["top_rotating"], lambda p: top.to_csv(p))
    fig = rotation_figure(result.table, latents=[int(j) for j in top.index[:5]])
    atomic_write(files["figure"], lambda p: fig.write_html(str(p), include_plotlyjs=True))
    return OrganismStagewise(result=result, top=top, examples=examples, files=files)


def main(argv: Sequence[str] | None = None) -> int:
    """``sae-diff stagewise --config configs/analysis/stagewise_organism.yaml`` (or ``python -m
    sae_diff.analysis.stagewise``): every stage from one config (the fields of
    :func:`stagewise_on_organism`; ``stages`` is a list of ``{name, model, data, parent}``)."""
    ap = argparse.ArgumentParser(prog="sae-diff stagewise", description=main.__doc__)
    ap.add_argument(
        "--config", required=True, help="YAML/JSON file with stagewise_on_organism's fields"
    )
    ap.add_argument("--out", help="output folder (overrides the config's `out`)")
    args = ap.parse_args(argv)
    kw = config_kwargs(stagewise_on_organism, args.config)
    if args.out:
        kw["out"] = args.out
    if "out" not in kw:
        ap.error("no output folder: set `out:` in the config or pass --out DIR")
    if "stages" in kw:
        try:
            kw["plan"] = tuple(Stage(**st) for st in kw.pop("stages"))
        except (TypeError, ValueError) as e:
            raise ConfigError(
                f"Bad `stages` in {args.config}: {e} Each stage is {{name, model, data, parent}} "
                "with model and data 'base' or 'ft'."
            ) from e
    res = stagewise_on_organism(**kw)
    print(res.top.round(3).to_string())
    for name, path in res.files.items():
        print(f"{name}: {path}")
    return 0


__all__ = [
    "DEFAULT_STAGES",
    "OrganismStagewise",
    "Stage",
    "StagewiseResult",
    "config_kwargs",
    "model_change_stages",
    "model_side",
    "rotation_figure",
    "run_stages",
    "stagewise_on_organism",
]


if __name__ == "__main__":
    raise SystemExit(main())
