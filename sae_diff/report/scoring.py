"""Scoring diffing methods against planted ground truth (the "diffing game").

For each method, latents are ranked by how ft-specific they look (crosscoders: relative
decoder norm Δ ascending; SAEs: Latent Scaling ν_act ascending, missing ν last). For each planted
behaviour, the best single-latent AUROC against the behaviour's token labels is taken among the
top candidates, with that latent's rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann–Whitney U with average ranks for ties).

    Returns NaN when one class is empty.
    """
    s = scores.detach().double().flatten().cpu().numpy()
    y = labels.detach().bool().flatten().cpu().numpy()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(s)]])
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def aurocs(codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AUROC of every column of ``codes (tokens, n)`` against boolean ``labels (tokens,)``."""
    return torch.tensor([auroc(codes[:, j], labels) for j in range(codes.shape[1])], dtype=torch.float64)


@dataclass
class BehaviourScore:
    behaviour: str
    best_auroc: float
    latent: int
    rank: int  # 1-based rank of that latent in the method's ft-specific ordering
    n_positive_tokens: int


def auroc_matrix(codes: torch.Tensor, candidates: torch.Tensor, labels: dict[str, torch.Tensor]) -> pd.DataFrame:
    """AUROC of each candidate latent (rows, in ranking order) against each behaviour (columns)."""
    sub = codes[:, candidates].double()
    cols = {}
    for name, lab in labels.items():
        lab = lab.flatten().bool()
        if lab.numel() != codes.shape[0]:
            raise ValueError(f"Labels for {name!r} cover {lab.numel()} tokens but codes cover {codes.shape[0]}.")
        cols[name] = aurocs(sub, lab).numpy()
    return pd.DataFrame(cols, index=pd.Index(candidates.tolist(), name="latent"))


def score_behaviours(codes: torch.Tensor, ranking: torch.Tensor, labels: dict[str, torch.Tensor],
                     top_n: int = 50) -> tuple[list[BehaviourScore], pd.DataFrame]:
    """Best single-latent AUROC per behaviour among the first ``top_n`` ranked latents, and the
    full candidates × behaviours AUROC matrix."""
    matrix = auroc_matrix(codes, ranking[:top_n], labels)
    out = []
    for name in labels:
        col = matrix[name].fillna(-1.0).to_numpy()
        best = int(np.argmax(col))
        out.append(BehaviourScore(name, float(matrix[name].iloc[best]), int(matrix.index[best]), best + 1,
                                  int(labels[name].sum())))
    return out, matrix
