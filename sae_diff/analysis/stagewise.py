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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer

MODELS: tuple[str, ...] = ("base", "ft")
DATA: tuple[str, ...] = ("base", "ft")


@dataclass(frozen=True)
class Stage:
    """One fine-tuning stage: which model's activations, on which data, resumed from which stage."""

    name: str
    model: str
    data: str
    parent: str = "start"

    def __post_init__(self) -> None:
        if self.model not in MODELS or self.data not in DATA:
            raise ValueError(
                f"Stage {self.name!r}: model and data must each be 'base' or 'ft', "
                f"got model={self.model!r}, data={self.data!r}."
            )
        if self.name == "start":
            raise ValueError(
                "'start' names the starting dictionary (base model, base data); pick another stage name."
            )


#: Anthropic's stages: data-only and model-only changes from the start, then both (via data).
DEFAULT_STAGES: tuple[Stage, ...] = (
    Stage("data", model="base", data="ft"),
    Stage("model", model="ft", data="base"),
    Stage("both", model="ft", data="ft", parent="data"),
)


@dataclass
class StagewiseResult:
    """Dictionaries per stage (``"start"`` included) and the per-latent rotation table."""

    stages: dict[str, TrainingSAE[Any]]
    plan: tuple[Stage, ...]
    table: pd.DataFrame = field(default_factory=pd.DataFrame)

    def model_change_stages(self) -> list[str]:
        return model_change_stages(self.plan)

    def top_rotating(
        self, n: int = 20, stage: str | None = None, which: str = "dec", min_frequency: float = 1e-3
    ) -> pd.DataFrame:
        """The ``n`` live latents that rotate most (1 − cosine to their parent-stage direction)
        in ``stage`` (default: the largest rotation over the model-change stages)."""
        return top_rotating(
            self.table, self.plan, n=n, stage=stage, which=which, min_frequency=min_frequency
        )


def model_side(batches: Iterator[torch.Tensor], index: int) -> Iterator[torch.Tensor]:
    """Single-model batches ``(B, d)`` from paired batches ``(B, 2, d)`` (0 = base, 1 = ft)."""
    for x in batches:
        if x.ndim != 3 or x.shape[1] != 2:
            raise ValueError(
                f"Stage-wise diffing reads paired batches (B, 2, d) (index 0 = base, 1 = ft); "
                f"got shape {tuple(x.shape)}."
            )
        yield x[:, index]


def copy_sae(sae: TrainingSAE[Any]) -> TrainingSAE[Any]:
    """A fresh training SAE of the same class and config holding a copy of ``sae``'s weights."""
    new = type(sae)(sae.cfg)
    new.load_state_dict({k: v.detach().clone() for k, v in sae.state_dict().items()})
    return new.to(sae.W_dec.device)


def _directions(sae: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder columns and decoder rows, both ``(n_latents, d)``."""
    w_enc, w_dec = sae.W_enc.detach(), sae.W_dec.detach()
    if w_enc.ndim != 2 or w_dec.ndim != 2:
        raise ValueError(
            "Stage-wise diffing needs a one-model SAE (W_enc (d, n), W_dec (n, d)); "
            f"got W_enc {tuple(w_enc.shape)}, W_dec {tuple(w_dec.shape)}."
        )
    return w_enc.T.double(), w_dec.double()


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)


def rotation_table(
    stages: dict[str, Any],
    plan: Sequence[Stage],
    frequencies: dict[str, torch.Tensor] | None = None,
) -> pd.DataFrame:
    """Per latent and stage: cosine of its encoder / decoder direction to the start
    (``enc_cos_start``, ``dec_cos_start``) and to the parent stage (``enc_cos``, ``dec_cos``);
    ``model_change`` marks stages whose model differs from the parent's; with ``frequencies``
    (per stage, ``"start"`` included) also ``freq`` (in the stage) and ``freq_start``. Long format."""
    enc0, dec0 = _directions(stages["start"])
    rows = []
    for st in plan:
        enc, dec = _directions(stages[st.name])
        enc_p, dec_p = _directions(stages[st.parent])
        parent_model = (
            "base" if st.parent == "start" else next(p.model for p in plan if p.name == st.parent)
        )
        frame = pd.DataFrame(
            {
                "latent": range(enc.shape[0]),
                "stage": st.name,
                "model": st.model,
                "data": st.data,
                "parent": st.parent,
                "model_change": st.model != parent_model,
                "enc_cos": _cos(enc, enc_p).numpy(),
                "dec_cos": _cos(dec, dec_p).numpy(),
                "enc_cos_start": _cos(enc, enc0).numpy(),
                "dec_cos_start": _cos(dec, dec0).numpy(),
            }
        )
        if frequencies is not None:
            frame["freq"] = frequencies[st.name].numpy()
            frame["freq_start"] = frequencies["start"].numpy()
        rows.append(frame)
    return pd.concat(rows, ignore_index=True)


def model_change_stages(plan: Sequence[Stage]) -> list[str]:
    models = {"start": "base", **{s.name: s.model for s in plan}}
    return [s.name for s in plan if s.model != models[s.parent]]


def top_rotating(
    table: pd.DataFrame,
    plan: Sequence[Stage],
    n: int = 20,
    stage: str | None = None,
    which: str = "dec",
    min_frequency: float = 1e-3,
) -> pd.DataFrame:
    """Latents ranked by rotation ``1 − {which}_cos`` in ``stage``, or by their largest rotation
    over the model-change stages when ``stage`` is None. One row per latent, wide by stage.

    Latents firing on fewer than ``min_frequency`` of the tokens at the start or in any stage
    are left out (when the table has frequencies): unused latents drift without meaning."""
    if which not in ("enc", "dec"):
        raise ValueError(f"which must be 'enc' or 'dec', got {which!r}.")
    wide = table.pivot(index="latent", columns="stage", values=f"{which}_cos")
    if "freq" in table.columns:
        alive = table.groupby("latent")[["freq", "freq_start"]].min().min(axis=1) >= min_frequency
        wide = wide[alive.reindex(wide.index).to_numpy()]
    rot = 1.0 - wide
    if stage is None:
        cols = model_change_stages(plan)
        if not cols:
            raise ValueError(
                "The plan has no model-change stage (every stage uses its parent's model)."
            )
        score = rot[cols].max(axis=1)
    else:
        if stage not in rot.columns:
            raise ValueError(f"Unknown stage {stage!r}; stages: {list(rot.columns)}.")
        score = rot[stage]
    out = rot.add_prefix(f"{which}_rotation_")
    out.insert(0, "rotation", score)
    return out.sort_values("rotation", ascending=False).head(n)


def run_stages(
    start: TrainingSAE[Any],
    batches: dict[str, Callable[[], Iterator[torch.Tensor]]],
    trainer_cfg: SAETrainerConfig,
    plan: Sequence[Stage] = DEFAULT_STAGES,
    n_freq_batches: int = 4,
) -> StagewiseResult:
    """Fine-tune ``start`` (trained on the base model, base data) through ``plan``.

    Args:
        start: the starting dictionary; it is copied, never modified.
        batches: ``{"base": make_iter, "ft": make_iter}``: each call returns a fresh iterator of
            *paired* batches ``(B, 2, d)`` over that data (the base corpus / the fine-tuning
            corpus, read through both models); a stage takes its model's side.
        trainer_cfg: SAELens trainer settings used for every stage (steps, lr, batch size).
        plan: the stages, each resumed from its parent (which must come earlier or be "start").
        n_freq_batches: batches of each stage's own data on which firing frequencies are
            measured (``freq`` and ``freq_start`` columns): a latent that never fires is not
            constrained by the data, so its direction drifts freely and its rotation means nothing.
    """
    missing = {s.data for s in plan} - set(batches)
    if missing:
        raise ValueError(
            f"No batches for data {sorted(missing)}: pass batches={{'base': ..., 'ft': ...}} "
            "(callables returning iterators of paired (B, 2, d) batches)."
        )
    seen = {"start"}
    for st in plan:
        if st.parent not in seen:
            raise ValueError(
                f"Stage {st.name!r} resumes from {st.parent!r}, which is not an earlier stage "
                f"(known so far: {sorted(seen)})."
            )
        if st.name in seen:
            raise ValueError(f"Duplicate stage name {st.name!r}.")
        seen.add(st.name)
    stages: dict[str, TrainingSAE[Any]] = {"start": copy_sae(start)}
    freq = {
        "start": firing_frequency(stages["start"], model_side(batches["base"](), 0), n_freq_batches)
    }
    for st in plan:
        sae = copy_sae(stages[st.parent])
        provider = model_side(batches[st.data](), MODELS.index(st.model))
        SAETrainer(trainer_cfg, sae, provider).fit()
        stages[st.name] = sae
        freq[st.name] = firing_frequency(
            sae, model_side(batches[st.data](), MODELS.index(st.model)), n_freq_batches
        )
    result = StagewiseResult(stages=stages, plan=tuple(plan))
    result.table = rotation_table(stages, plan, frequencies=freq)
    return result


@torch.no_grad()
def firing_frequency(sae: Any, batches: Iterator[torch.Tensor], n_batches: int = 4) -> torch.Tensor:
    """Fraction of tokens on which each latent fires (inference encoder), over ``n_batches``."""
    count, total = None, 0
    for _, x in zip(range(n_batches), batches):
        on = (sae.encode(x.to(sae.W_dec.device, sae.W_dec.dtype)) > 0).sum(0).double().cpu()
        count = on if count is None else count + on
        total += x.shape[0]
    if count is None or total == 0:
        raise ValueError("No batches to measure firing frequencies on: the data iterator is empty.")
    return count / total


def rotation_figure(
    table: pd.DataFrame, latents: Sequence[int] | None = None, which: str = "dec"
) -> Any:
    """Plotly figure: per stage, the distribution of ``1 − cosine`` to the parent stage (box),
    with the chosen ``latents`` (e.g. the top rotating ones) drawn as lines across stages."""
    import plotly.graph_objects as go

    col = f"{which}_cos"
    if col not in table.columns:
        raise ValueError(
            f"The rotation table has no {col!r} column; build it with rotation_table()."
        )
    fig = go.Figure()
    order = list(dict.fromkeys(table["stage"]))
    for st in order:
        fig.add_trace(
            go.Box(
                y=1.0 - table.loc[table["stage"] == st, col],
                name=st,
                boxpoints=False,
                showlegend=False,
            )
        )
    for j in latents or []:
        rows = table[table["latent"] == j].set_index("stage").loc[order]
        fig.add_trace(
            go.Scatter(x=order, y=1.0 - rows[col], mode="lines+markers", name=f"latent {j}")
        )
    fig.update_layout(
        title=f"{'Decoder' if which == 'dec' else 'Encoder'} rotation by stage (1 − cos to parent stage)",
        yaxis_title="1 − cosine",
        xaxis_title="stage",
    )
    return fig


@dataclass
class OrganismStagewise:
    """``stagewise_on_organism``'s output: the stages, the top rotating latents, their
    max-activating examples (last model-change stage's dictionary on ft data) and the files."""

    result: StagewiseResult
    top: pd.DataFrame
    examples: dict[int, Any]
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
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    from sae_diff.analysis.batches import cache_batches
    from sae_diff.analysis.examples import max_activating_examples
    from sae_diff.atomic import atomic_write as atomic_write_bytes
    from sae_diff.data.cache import ActivationCache
    from sae_diff.data.harvest import harvest_cache
    from sae_diff.data.sources import TokenSource
    from sae_diff.data.store import PairedActivationsStore
    from sae_diff.organisms import load_organism

    out = Path(out)
    org = load_organism(organism)
    if org.world is None:
        from sae_diff.training.errors import ConfigError

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
    atomic_write_bytes(files["rotation_table"], lambda p: result.table.to_csv(p, index=False))
    atomic_write_bytes(files["top_rotating"], lambda p: top.to_csv(p))
    fig = rotation_figure(result.table, latents=[int(j) for j in top.index[:5]])
    atomic_write_bytes(files["figure"], lambda p: fig.write_html(str(p), include_plotlyjs=True))
    return OrganismStagewise(result=result, top=top, examples=examples, files=files)


def config_kwargs(func: Callable[..., Any], path: str | Path) -> dict[str, Any]:
    """Keyword arguments of ``func`` from a YAML/JSON config file, with a clear error naming
    unknown fields (and the valid ones): a :class:`~sae_diff.training.errors.ConfigError`, so
    ``sae-diff`` prints it as one line."""
    import inspect

    from sae_diff.training.config import read_config_file
    from sae_diff.training.errors import ConfigError

    data = read_config_file(path)
    # `method:` names the analysis for `sae-diff train` (sae_diff.cli.ANALYSIS_METHODS)
    data.pop("method", None)
    params = inspect.signature(func).parameters
    valid = sorted(
        n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    )
    valid = sorted({*valid, "stages"} if "plan" in valid else valid)
    unknown = (
        sorted(set(data) - set(valid))
        if not any(p.kind == p.VAR_KEYWORD for p in params.values())
        else []
    )
    if unknown:
        raise ConfigError(f"Unknown field(s) {unknown} in {path}; valid: {valid}.")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    """``sae-diff stagewise --config configs/analysis/stagewise_organism.yaml`` (or ``python -m
    sae_diff.analysis.stagewise``): every stage from one config (the fields of
    :func:`stagewise_on_organism`; ``stages`` is a list of ``{name, model, data, parent}``)."""
    import argparse

    from sae_diff.training.errors import ConfigError

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
    "copy_sae",
    "firing_frequency",
    "model_change_stages",
    "model_side",
    "rotation_figure",
    "rotation_table",
    "run_stages",
    "stagewise_on_organism",
    "top_rotating",
]


if __name__ == "__main__":
    raise SystemExit(main())
