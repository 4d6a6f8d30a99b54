"""The stages of stage-wise diffing: the plan, fine-tuning through it, and the rotation table.

A :class:`Stage` names which model's activations and which data a fine-tuning stage uses and
which stage it resumes from; :func:`run_stages` fine-tunes a starting SAE through a plan with
SAELens's ``SAETrainer``; :func:`rotation_table` / :func:`top_rotating` measure how far each
latent's encoder and decoder directions turned. The method and the end-to-end organism run are
described in :mod:`sae_diff.analysis.stagewise` (which re-exports these names).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer

from sae_diff.dictionaries.protocol import PairedDictionary

__all__ = [
    "DATA",
    "DEFAULT_STAGES",
    "MODELS",
    "Stage",
    "StagewiseResult",
    "copy_sae",
    "firing_frequency",
    "model_change_stages",
    "model_side",
    "rotation_table",
    "run_stages",
    "top_rotating",
]

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


def _directions(sae: PairedDictionary) -> tuple[torch.Tensor, torch.Tensor]:
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
    stages: Mapping[str, PairedDictionary],
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
def firing_frequency(
    sae: PairedDictionary, batches: Iterator[torch.Tensor], n_batches: int = 4
) -> torch.Tensor:
    """Fraction of tokens on which each latent fires (inference encoder), over ``n_batches``."""
    count, total = None, 0
    for _, x in zip(range(n_batches), batches):
        on = (sae.encode(x.to(sae.W_dec.device, sae.W_dec.dtype)) > 0).sum(0).double().cpu()
        count = on if count is None else count + on
        total += x.shape[0]
    if count is None or total == 0:
        raise ValueError("No batches to measure firing frequencies on: the data iterator is empty.")
    return count / total
