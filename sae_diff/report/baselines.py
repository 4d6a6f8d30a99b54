"""Dictionary-free baselines and the supervised ceiling for the diffing game.

A dictionary method has to beat what a few lines of linear algebra find without it, and it
cannot beat a probe that was *told* the labels. Each baseline here turns the activation
difference ``D = x_ft - x_base`` (or the two models' outputs) into a few scored *candidates*,
in a fixed ranking, so :mod:`sae_diff.report.scoring` scores them exactly like latents:

- ``mean_diff``: the projection of ``D`` on the mean of ``D`` over the training cache (one
  candidate). Its logit lens (through the ft unembedding) is shown in the report.
- ``pca_diff``: projections on the top principal components of ``D`` over the training cache,
  each with both signs (a PC's sign is arbitrary): ranked PC1+, PC1-, PC2+, ...
- ``kl_tokens``: candidate 1 is the per-token KL(p_ft || p_base) itself; candidates 2.. are the
  distinct token types of the highest-KL positions (the KL dashboard's top tokens), each as an
  indicator "this token is that type", in order of their highest KL.
- ``probe`` (the ceiling): per behaviour and granularity, a mean-difference direction on ``D``
  fitted on the labels of half of the conversations and scored on the other half (2-fold
  cross-fitting, folds stratified by the behaviours a row carries, unit-norm directions so the pooled scores are
  comparable). Supervised, so it is an upper reference, not a competitor.
"""

from __future__ import annotations

import pandas as pd
import torch

from sae_diff.report.scoring import GRANULARITIES, GroundTruth, granularity_matrices


def mean_diff_direction(train_diffs: torch.Tensor) -> torch.Tensor:
    """Mean of ``x_ft - x_base`` over training tokens ``(N, d)`` -> ``(d,)`` (float64)."""
    if train_diffs.ndim != 2 or train_diffs.shape[0] == 0:
        raise ValueError(
            f"train_diffs must be a non-empty (tokens, d_model) tensor, got {tuple(train_diffs.shape)}."
        )
    return train_diffs.double().mean(0)


def pca_directions(train_diffs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` principal directions of ``x_ft - x_base`` ``(N, d)``: ``(directions (k, d),
    explained-variance ratios (k,))``, largest first. Signs are fixed so each direction's
    largest-magnitude coordinate is positive (deterministic across runs)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    x = train_diffs.double()
    x = x - x.mean(0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(k, vh.shape[0])
    dirs = vh[:k]
    flip = torch.sign(dirs.gather(1, dirs.abs().argmax(1, keepdim=True)))
    var = s**2
    return dirs * flip, (var[:k] / var.sum())


def signed(directions: torch.Tensor) -> torch.Tensor:
    """``(k, d)`` -> ``(2k, d)``: each direction followed by its negation."""
    return torch.stack([directions, -directions], 1).reshape(-1, directions.shape[-1])


def project(diffs: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``(n, seq, d) @ (k, d)^T`` -> ``(n, seq, k)`` candidate scores (float64)."""
    return diffs.double() @ directions.double().T


def kl_token_scores(
    kl: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor, n_types: int = 10
) -> tuple[torch.Tensor, list[int]]:
    """Per-token KL as candidate 0, then indicators of the ``n_types`` token types with the
    highest KL (first occurrence order in a descending-KL sort). Returns ``(scores (n, seq,
    1 + n_types'), type ids)``."""
    if kl.shape != tokens.shape or valid.shape != tokens.shape:
        raise ValueError(
            f"kl {tuple(kl.shape)}, tokens {tuple(tokens.shape)} and valid {tuple(valid.shape)} "
            "must have the same (n_conv, seq) shape."
        )
    k = torch.nan_to_num(kl.double(), nan=0.0)
    flat = torch.where(valid, k, torch.tensor(-torch.inf, dtype=k.dtype)).flatten()
    order = torch.argsort(flat, descending=True, stable=True)
    types: list[int] = []
    for i in order.tolist():
        if not torch.isfinite(flat[i]) or len(types) >= n_types:
            break
        t = int(tokens.flatten()[i])
        if t not in types:
            types.append(t)
    ind = [(tokens == t).double() for t in types]
    return torch.stack([k, *ind], -1), types


def _folds(sset: GroundTruth, n_folds: int, seed: int) -> torch.Tensor:
    """Fold id per conversation, stratified by the set of behaviours a conversation carries
    (so each fold gets its share of every behaviour's positives, also when one behaviour, like
    the chat template, is carried by almost every row)."""
    n = sset.valid.shape[0]
    group = torch.zeros(n, dtype=torch.long)
    for i, b in enumerate(sset.behaviours):
        group += sset.conversation[b].long() << i
    gen = torch.Generator().manual_seed(seed)
    fold = torch.empty(n, dtype=torch.long)
    for g in group.unique().tolist():
        idx = torch.nonzero(group == g).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        fold[idx] = torch.arange(idx.numel()) % n_folds
    return fold


def _unit(v: torch.Tensor) -> torch.Tensor:
    n = v.norm()
    return v / n if n > 0 else v


def probe_matrices(
    diffs: torch.Tensor, sset: GroundTruth, seed: int = 0, n_folds: int = 2
) -> dict[str, pd.DataFrame]:
    """The supervised ceiling: per behaviour and granularity, a cross-fitted mean-difference
    direction on ``D`` (``diffs (n_conv, seq, d)``), scored held out. Token granularities fit on
    that granularity's positive tokens vs every other scored token; the conversation granularity
    fits on the trigger and response tokens of positive conversations vs all scored tokens of
    negative conversations and scores a conversation by its maximum. Returns one-row matrices
    (candidate 0) per granularity, like :func:`granularity_matrices`."""
    if diffs.ndim != 3 or tuple(diffs.shape[:2]) != tuple(sset.valid.shape):
        raise ValueError(
            f"diffs must be (n_conv, seq, d) matching valid {tuple(sset.valid.shape)}, got {tuple(diffs.shape)}."
        )
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2 for held-out scoring, got {n_folds}.")
    d = diffs.double()
    fold = _folds(sset, n_folds, seed)
    out: dict[str, dict[str, float]] = {g: {} for g in GRANULARITIES}
    for b in sset.behaviours:
        conv_pos = sset.conversation[b][:, None].expand_as(sset.valid)
        targets = {
            "trigger": (sset.trigger[b] & sset.valid, ~sset.trigger[b] & sset.valid),
            "response": (sset.response[b] & sset.valid, ~sset.response[b] & sset.valid),
            "conversation": (
                (sset.trigger[b] | sset.response[b]) & sset.valid & conv_pos,
                sset.valid & ~conv_pos,
            ),
        }
        for gran, (pos, neg) in targets.items():
            scores = torch.zeros(sset.valid.shape, dtype=torch.float64)
            for f in range(n_folds):
                train = (fold != f)[:, None]
                p, q = pos & train, neg & train
                u = (
                    _unit(d[p].mean(0) - d[q].mean(0))
                    if p.any() and q.any()
                    else torch.zeros(d.shape[-1], dtype=d.dtype)
                )
                held = fold == f
                scores[held] = d[held] @ u
            one = GroundTruth(
                sset.valid, {b: sset.trigger[b]}, {b: sset.response[b]}, {b: sset.conversation[b]}
            )
            out[gran][b] = float(granularity_matrices(scores[..., None], one)[gran].iloc[0, 0])
    return {
        g: pd.DataFrame({b: [v] for b, v in cols.items()}, index=pd.Index([0], name="candidate"))
        for g, cols in out.items()
    }
