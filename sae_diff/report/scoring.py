"""Scoring diffing methods against planted ground truth (the "diffing game").

A method offers *candidates* (latents, or directions for the dictionary-free baselines) in a
ranking of its own (how ft-specific each looks; see :mod:`sae_diff.report.scoreboard`,
:mod:`sae_diff.report.base_sae_methods` and docs/evaluation.md for each method's rule). Every candidate is scored as a detector of each
planted behaviour at three granularities, always on a scoring set that holds **control**
(non-triggered) conversations as well as triggered ones:

- ``trigger``: token level; positives are the behaviour's trigger tokens, negatives every other
  scored token of every conversation (controls included);
- ``response``: token level; positives are the planted-response tokens;
- ``conversation``: the candidate's maximum over each conversation's scored tokens; positives
  are the conversations carrying the behaviour, negatives the rest (controls included).

The score is the AUROC (Mann–Whitney U, average ranks for ties). Per method × behaviour ×
granularity the summary is the best AUROC among the first ``top_n`` candidates, its rank
(1-based), and the rank of the first candidate with AUROC >= 0.9 (``None`` if there is none
among the first ``top_n``).

Everything here takes plain tensors (scores, token masks, per-conversation labels), so it does
not care where the control conversations come from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

GRANULARITIES: tuple[str, ...] = ("trigger", "response", "conversation")
#: AUROC threshold for ``first_rank_ge_0_9``.
GOOD_AUROC = 0.9


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann–Whitney U with average ranks for ties).

    Returns NaN when one class is empty.
    """
    s = scores.detach().double().flatten().cpu().numpy()
    y = labels.detach().bool().flatten().cpu().numpy()
    return float(auroc_columns(s[:, None], y)[0])


def auroc_columns(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of every column of ``scores (m, k)`` against boolean ``labels (m,)``, from one
    ranking per column (ties get average ranks, so a constant column scores exactly 0.5).
    NaN where a class is empty."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be (n_items, n_candidates), got shape {s.shape}.")
    y = np.asarray(labels).astype(bool).reshape(-1)
    if y.shape[0] != s.shape[0]:
        raise ValueError(f"labels cover {y.shape[0]} items but scores cover {s.shape[0]}.")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0 or s.shape[1] == 0:
        return np.full(s.shape[1], np.nan)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; mask those items out before scoring.")
    ranks = rankdata(s, axis=0, method="average")
    return (ranks[y].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def aurocs(codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AUROC of every column of ``codes (tokens, n)`` against boolean ``labels (tokens,)``."""
    return torch.from_numpy(
        auroc_columns(
            codes.detach().double().cpu().numpy(), labels.detach().bool().flatten().cpu().numpy()
        )
    )


def auroc_matrix(
    codes: torch.Tensor, candidates: torch.Tensor, labels: dict[str, torch.Tensor]
) -> pd.DataFrame:
    """AUROC of each candidate latent (rows, in ranking order) against each behaviour (columns),
    token level: ``codes (tokens, d_sae)``, ``labels[b] (tokens,)``."""
    sub = codes[:, candidates].detach().double().cpu().numpy()
    cols = {}
    for name, lab in labels.items():
        lab = lab.flatten().bool()
        if lab.numel() != codes.shape[0]:
            raise ValueError(
                f"Labels for {name!r} cover {lab.numel()} tokens but codes cover {codes.shape[0]}."
            )
        cols[name] = auroc_columns(sub, lab.cpu().numpy())
    return pd.DataFrame(cols, index=pd.Index(candidates.tolist(), name="latent"))


@dataclass
class GroundTruth:
    """The held-out ground truth every method is scored on.

    Attributes:
        valid: ``(n_conv, seq)`` bool, the tokens that are scored (BOS and padding excluded).
        trigger: behaviour -> ``(n_conv, seq)`` bool trigger-token mask.
        response: behaviour -> ``(n_conv, seq)`` bool planted-response mask.
        conversation: behaviour -> ``(n_conv,)`` bool, the conversations carrying it; the
            rest (control conversations and other behaviours' conversations) are negatives.
    """

    valid: torch.Tensor
    trigger: dict[str, torch.Tensor]
    response: dict[str, torch.Tensor]
    conversation: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        if self.valid.ndim != 2:
            raise ValueError(f"valid must be (n_conv, seq), got shape {tuple(self.valid.shape)}.")
        self.valid = self.valid.bool().cpu()
        n, _ = self.valid.shape
        names = list(self.trigger)
        checked: dict[str, dict[str, torch.Tensor]] = {}
        for kind, masks, shape in (
            ("trigger", self.trigger, tuple(self.valid.shape)),
            ("response", self.response, tuple(self.valid.shape)),
            ("conversation", self.conversation, (n,)),
        ):
            if list(masks) != names:
                raise ValueError(
                    f"{kind} labels name behaviours {list(masks)} but trigger labels name {names}; "
                    "give every granularity the same behaviours in the same order."
                )
            for b, m in masks.items():
                if tuple(m.shape) != shape:
                    raise ValueError(
                        f"{kind} label of {b!r} has shape {tuple(m.shape)}, expected {shape}."
                    )
            checked[kind] = {b: m.bool().cpu() for b, m in masks.items()}
        self.trigger, self.response, self.conversation = (
            checked["trigger"],
            checked["response"],
            checked["conversation"],
        )
        if not bool((self.valid.any(1)).all()):
            raise ValueError(
                "Every conversation needs at least one scored token (valid is all False in a row)."
            )

    @property
    def behaviours(self) -> list[str]:
        return list(self.trigger)

    def counts(self) -> dict[str, dict[str, int]]:
        """Positives and negatives per behaviour and granularity (what each AUROC rests on)."""
        out: dict[str, dict[str, int]] = {}
        n_tok = int(self.valid.sum())
        for b in self.behaviours:
            t = int((self.trigger[b] & self.valid).sum())
            r = int((self.response[b] & self.valid).sum())
            c = int(self.conversation[b].sum())
            out[b] = {
                "trigger_pos": t,
                "trigger_neg": n_tok - t,
                "response_pos": r,
                "response_neg": n_tok - r,
                "conversation_pos": c,
                "conversation_neg": int(self.valid.shape[0]) - c,
            }
        return out


def granularity_matrices(
    scores: torch.Tensor, sset: GroundTruth, candidates: Sequence[int] | None = None
) -> dict[str, pd.DataFrame]:
    """AUROC of every candidate against every behaviour at each granularity.

    Args:
        scores: ``(n_conv, seq, k)`` candidate activations (higher = more of the candidate).
        sset: labels and the scored-token mask.
        candidates: the candidates' ids, in ranking order (default ``0..k-1``).
    Returns ``{granularity: DataFrame (candidates × behaviours)}``.
    """
    if scores.ndim != 3 or tuple(scores.shape[:2]) != tuple(sset.valid.shape):
        raise ValueError(
            f"scores must be (n_conv, seq, k) with (n_conv, seq) = {tuple(sset.valid.shape)}, "
            f"got {tuple(scores.shape)}."
        )
    k = scores.shape[2]
    ids = list(range(k)) if candidates is None else [int(c) for c in candidates]
    if len(ids) != k:
        raise ValueError(f"{len(ids)} candidate ids for {k} score columns.")
    s = scores.detach().double().cpu()
    tok = s[sset.valid].numpy()  # (n_tokens, k)
    conv = (
        torch.where(sset.valid[..., None], s, torch.tensor(-torch.inf, dtype=s.dtype))
        .amax(1)
        .numpy()
    )
    index = pd.Index(ids, name="candidate")
    out: dict[str, pd.DataFrame] = {}
    for gran, labels, x in (
        ("trigger", sset.trigger, tok),
        ("response", sset.response, tok),
        ("conversation", sset.conversation, conv),
    ):
        cols = {}
        ranks = rankdata(x, axis=0, method="average") if k else np.zeros((x.shape[0], 0))
        for b, lab in labels.items():
            y = (lab[sset.valid] if gran != "conversation" else lab).numpy()
            n_pos, n_neg = int(y.sum()), int((~y).sum())
            if n_pos == 0 or n_neg == 0:
                cols[b] = np.full(k, np.nan)
            else:
                cols[b] = (ranks[y].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        out[gran] = pd.DataFrame(cols, index=index)
    return out


@dataclass
class Score:
    """One method × behaviour × granularity summary (a row of report.json's ``scores``)."""

    method: str
    behaviour: str
    granularity: str
    seed: int | None
    best_auroc: float | None
    rank: int | None  # 1-based rank of the best candidate in the method's own ordering
    first_rank_ge_0_9: (
        int | None
    )  # rank of the first candidate with AUROC >= 0.9 (None: none in top_n)
    candidate: int | None = None  # id of the best candidate (latent index, direction number)

    def row(self) -> dict[str, object]:
        return {
            "method": self.method,
            "behaviour": self.behaviour,
            "granularity": self.granularity,
            "seed": self.seed,
            "best_auroc": self.best_auroc,
            "rank": self.rank,
            "first_rank_ge_0_9": self.first_rank_ge_0_9,
            "candidate": self.candidate,
        }


def summarise(
    matrices: Mapping[str, pd.DataFrame], method: str, seed: int | None, top_n: int | None = None
) -> list[Score]:
    """Best AUROC, its rank and the first rank with AUROC >= 0.9 among the first ``top_n`` rows
    of each granularity's matrix (rows are in the method's ranking order). A behaviour whose
    labels have an empty class gets ``None`` figures (the AUROC is undefined)."""
    out = []
    for gran, matrix in matrices.items():
        m = matrix if top_n is None else matrix.iloc[:top_n]
        for b in m.columns:
            col = m[b].to_numpy(dtype=np.float64)
            if col.size == 0 or np.isnan(col).all():
                out.append(Score(method, b, gran, seed, None, None, None))
                continue
            best = int(np.nanargmax(col))  # first of equal maxima = best-ranked
            good = np.flatnonzero(np.nan_to_num(col, nan=-1.0) >= GOOD_AUROC)
            out.append(
                Score(
                    method,
                    b,
                    gran,
                    seed,
                    round(float(col[best]), 4),
                    best + 1,
                    int(good[0]) + 1 if good.size else None,
                    int(m.index[best]),
                )
            )
    return out


@dataclass
class BehaviourScore:
    """Trigger-token score of one behaviour (the pre-granularity API, kept for the tutorials)."""

    behaviour: str
    best_auroc: float
    latent: int
    rank: int  # 1-based rank of that latent in the method's ft-specific ordering
    n_positive_tokens: int


def score_behaviours(
    codes: torch.Tensor, ranking: torch.Tensor, labels: dict[str, torch.Tensor], top_n: int = 50
) -> tuple[list[BehaviourScore], pd.DataFrame]:
    """Best single-latent AUROC per behaviour among the first ``top_n`` ranked latents against
    token labels ``(tokens,)``, and the full candidates × behaviours AUROC matrix."""
    matrix = auroc_matrix(codes, ranking[:top_n], labels)
    out = []
    for name in labels:
        col = matrix[name].fillna(-1.0).to_numpy()
        best = int(np.argmax(col))
        out.append(
            BehaviourScore(
                name,
                float(matrix[name].iloc[best]),
                int(matrix.index[best]),
                best + 1,
                int(labels[name].sum()),
            )
        )
    return out, matrix


def aggregate(
    rows: Sequence[Mapping[str, object]],
    keys: Sequence[str] = ("method", "behaviour", "granularity"),
    values: Sequence[str] = ("best_auroc", "rank", "first_rank_ge_0_9"),
) -> pd.DataFrame:
    """Mean, std, min and max over seeds of each figure, per ``keys`` group. ``n_seeds`` counts
    the rows; ``n_found_ge_0_9`` how many seeds had a candidate >= 0.9 in the top N (a missing
    first rank is not averaged as a number)."""
    df = pd.DataFrame(list(rows))
    if df.empty:
        return df
    recs = []
    for key, g in df.groupby(list(keys), sort=False, dropna=False):
        rec: dict[str, object] = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        rec["n_seeds"] = int(len(g))
        for v in values:
            x = pd.to_numeric(g[v], errors="coerce").dropna()
            rec[f"{v}_mean"] = float(x.mean()) if len(x) else None
            rec[f"{v}_std"] = float(x.std(ddof=0)) if len(x) else None
            rec[f"{v}_min"] = float(x.min()) if len(x) else None
            rec[f"{v}_max"] = float(x.max()) if len(x) else None
        rec["n_found_ge_0_9"] = int(
            pd.to_numeric(g["first_rank_ge_0_9"], errors="coerce").notna().sum()
        )
        recs.append(rec)
    return pd.DataFrame(recs)
