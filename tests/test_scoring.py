"""The diffing game's scoring: granularities, ranks, baselines and findings against planted
ground truth and naive float64 references."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sae_diff.report import baselines as BL
from sae_diff.report.dashboards import best_match, histogram, logit_lens
from sae_diff.report.findings import seed_findings, verdict
from sae_diff.report.scoring import (
    GroundTruth,
    aggregate,
    auroc,
    auroc_columns,
    granularity_matrices,
    summarise,
)


def naive_auroc(scores: list[float], labels: list[bool]) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie), by enumerating every pair (float64)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def toy_truth(seed: int = 0) -> tuple[torch.Tensor, GroundTruth]:
    """6 conversations x 7 positions; conv 0-1 carry behaviour "a", conv 2 carries "b", conv 3-5
    are controls; ragged lengths (padding) and BOS excluded."""
    g = torch.Generator().manual_seed(seed)
    n, s, k = 6, 7, 4
    lengths = [7, 5, 6, 7, 4, 6]
    valid = torch.zeros(n, s, dtype=torch.bool)
    for i, L in enumerate(lengths):
        valid[i, 1:L] = True
    trig = {"a": torch.zeros(n, s, dtype=torch.bool), "b": torch.zeros(n, s, dtype=torch.bool)}
    resp = {"a": torch.zeros(n, s, dtype=torch.bool), "b": torch.zeros(n, s, dtype=torch.bool)}
    trig["a"][0, 2] = trig["a"][1, 1] = True
    resp["a"][0, 4:6] = resp["a"][1, 3:5] = True
    trig["b"][2, 2] = True
    resp["b"][2, 4] = True
    conv = {
        "a": torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.bool),
        "b": torch.tensor([0, 0, 1, 0, 0, 0], dtype=torch.bool),
    }
    scores = torch.randn(n, s, k, generator=g, dtype=torch.float64)
    scores[..., 1] = scores[..., 1].round()  # ties
    scores[..., 2] = trig["a"].double() * 5  # the planted detector of "a"'s triggers
    scores[[1, 2, 4, 5], 6, 2] = 100.0  # ... and a huge value on padding, which must be ignored
    scores[..., 3] = 0.0  # constant
    return scores, GroundTruth(valid, trig, resp, conv)


def test_granularity_aurocs_match_a_naive_pairwise_count() -> None:
    scores, truth = toy_truth()
    mats = granularity_matrices(scores, truth, candidates=[10, 11, 12, 13])
    valid = truth.valid
    for j, cand in enumerate([10, 11, 12, 13]):
        tok = scores[..., j][valid].tolist()
        for b in ("a", "b"):
            assert mats["trigger"].at[cand, b] == pytest.approx(
                naive_auroc(tok, truth.trigger[b][valid].tolist()), abs=1e-12
            )
            assert mats["response"].at[cand, b] == pytest.approx(
                naive_auroc(tok, truth.response[b][valid].tolist()), abs=1e-12
            )
            conv_max = [
                max(scores[i, p, j].item() for p in range(valid.shape[1]) if valid[i, p])
                for i in range(valid.shape[0])
            ]
            assert mats["conversation"].at[cand, b] == pytest.approx(
                naive_auroc(conv_max, truth.conversation[b].tolist()), abs=1e-12
            )
    # planted detector: perfect on "a"'s triggers and conversations despite the padding value
    assert mats["trigger"].at[12, "a"] == 1.0 and mats["conversation"].at[12, "a"] == 1.0
    assert (
        mats["trigger"].at[13, "a"] == 0.5 and mats["conversation"].at[13, "b"] == 0.5
    )  # constant


def test_auroc_columns_agree_with_scalar_auroc_and_handle_empty_classes() -> None:
    g = np.random.default_rng(0)
    x = g.normal(size=(40, 3)).round(1)
    y = g.random(40) < 0.3
    cols = auroc_columns(x, y)
    for j in range(3):
        assert cols[j] == pytest.approx(naive_auroc(x[:, j].tolist(), y.tolist()))
        assert auroc(torch.tensor(x[:, j]), torch.tensor(y)) == pytest.approx(cols[j])
    assert np.isnan(auroc_columns(x, np.zeros(40, bool))).all()
    with pytest.raises(ValueError, match="NaN"):
        auroc_columns(np.full((3, 1), np.nan), np.array([True, False, True]))


def test_summarise_reports_best_rank_and_first_rank_above_0_9() -> None:
    import pandas as pd

    m = pd.DataFrame(
        {"a": [0.6, 0.92, 0.97, 0.95], "b": [0.5, 0.5, 0.5, 0.5], "c": [np.nan] * 4},
        index=pd.Index([7, 3, 9, 1], name="candidate"),
    )
    rows = {r.behaviour: r for r in summarise({"conversation": m}, "x", 1)}
    assert (
        rows["a"].best_auroc,
        rows["a"].rank,
        rows["a"].first_rank_ge_0_9,
        rows["a"].candidate,
    ) == (0.97, 3, 2, 9)
    assert (rows["b"].rank, rows["b"].first_rank_ge_0_9) == (1, None)  # ties: the best-ranked
    assert rows["c"].best_auroc is None and rows["c"].rank is None
    top2 = {r.behaviour: r for r in summarise({"conversation": m}, "x", 1, top_n=2)}
    assert (top2["a"].best_auroc, top2["a"].rank) == (0.92, 2)
    row = rows["a"].row()
    assert set(row) >= {
        "method",
        "behaviour",
        "granularity",
        "seed",
        "best_auroc",
        "rank",
        "first_rank_ge_0_9",
    }


def test_aggregate_gives_mean_std_min_max_over_seeds() -> None:
    rows = [
        {
            "method": "m",
            "behaviour": "a",
            "granularity": "trigger",
            "seed": s,
            "best_auroc": v,
            "rank": r,
            "first_rank_ge_0_9": f,
        }
        for s, v, r, f in ((0, 0.8, 3, None), (1, 0.9, 5, 5), (2, 1.0, 1, 1))
    ]
    agg = aggregate(rows).iloc[0]
    assert agg["n_seeds"] == 3 and agg["n_found_ge_0_9"] == 2
    assert agg["best_auroc_mean"] == pytest.approx(0.9) and agg["best_auroc_std"] == pytest.approx(
        np.std([0.8, 0.9, 1.0])
    )
    assert (agg["rank_min"], agg["rank_max"]) == (1, 5)
    assert agg["first_rank_ge_0_9_mean"] == pytest.approx(3.0)  # over the seeds that found one


def test_ground_truth_rejects_mismatched_labels() -> None:
    _, t = toy_truth()
    with pytest.raises(ValueError, match="same behaviours"):
        GroundTruth(t.valid, t.trigger, {"a": t.response["a"]}, t.conversation)
    with pytest.raises(ValueError, match="shape"):
        GroundTruth(
            t.valid, t.trigger, t.response, {"a": t.conversation["a"][:3], "b": t.conversation["b"]}
        )


def planted_diffs(seed: int = 0) -> tuple[torch.Tensor, GroundTruth, torch.Tensor]:
    """Diffs with a planted direction on behaviour "a"'s trigger tokens (20 convs, 10 carry "a")."""
    g = torch.Generator().manual_seed(seed)
    n, s, d = 20, 8, 16
    valid = torch.ones(n, s, dtype=torch.bool)
    valid[:, 0] = False
    trig = torch.zeros(n, s, dtype=torch.bool)
    trig[:10, 3] = True
    direction = torch.zeros(d, dtype=torch.float64)
    direction[5] = 1.0
    diffs = (
        0.3 * torch.randn(n, s, d, generator=g, dtype=torch.float64)
        + 2.0 * trig[..., None] * direction
    )
    conv = trig.any(1)
    truth = GroundTruth(valid, {"a": trig}, {"a": trig.roll(1, dims=1)}, {"a": conv})
    return diffs, truth, direction


def test_probe_is_held_out_and_finds_a_planted_direction() -> None:
    diffs, truth, _ = planted_diffs()
    mats = BL.probe_matrices(diffs, truth, seed=0)
    assert mats["trigger"].at[0, "a"] == 1.0 and mats["conversation"].at[0, "a"] == 1.0
    # on labels unrelated to the activations the held-out probe is near chance, not perfect
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(diffs.shape, generator=g, dtype=torch.float64)
    assert mats_is_chance(BL.probe_matrices(noise, truth, seed=0)["trigger"].at[0, "a"])


def mats_is_chance(x: float) -> bool:
    return 0.2 < x < 0.8


def test_pca_recovers_the_dominant_difference_direction_and_signs_are_deterministic() -> None:
    g = torch.Generator().manual_seed(0)
    d = 12
    u = torch.zeros(d, dtype=torch.float64)
    u[3] = 1.0
    x = (
        0.05 * torch.randn(500, d, generator=g, dtype=torch.float64)
        + torch.randn(500, 1, generator=g, dtype=torch.float64) * 3 * u
    )
    dirs, evr = BL.pca_directions(x, 3)
    assert abs(float(dirs[0] @ u)) > 0.99 and evr[0] > 0.9
    assert float(dirs[0, dirs[0].abs().argmax()]) > 0
    signed = BL.signed(dirs)
    assert torch.equal(signed[1], -dirs[0]) and signed.shape == (6, d)
    assert torch.allclose(BL.mean_diff_direction(x), x.mean(0))


def test_kl_token_scores_lists_the_highest_kl_token_types() -> None:
    tokens = torch.tensor([[1, 5, 6, 7], [1, 6, 8, 9]])
    valid = torch.tensor([[False, True, True, True], [False, True, True, False]])
    kl = torch.tensor([[9.0, 0.5, 3.0, 0.1], [9.0, 2.0, 0.2, 50.0]])  # BOS and padding KL ignored
    scores, types = BL.kl_token_scores(kl, tokens, valid, n_types=2)
    assert types == [6, 5]
    assert torch.equal(scores[..., 0], kl.double()) and torch.equal(
        scores[..., 1], (tokens == 6).double()
    )


def test_logit_lens_reads_the_direction_through_ln_scale_and_unembedding() -> None:
    d, v = 6, 5
    w_u = torch.zeros(d, v)
    w_u[0, 2] = 1.0
    w_u[1, 4] = 1.0
    model = SimpleNamespace(
        W_U=w_u, ln_final=SimpleNamespace(w=torch.tensor([1.0, -1.0, 1, 1, 1, 1]))
    )
    tok = SimpleNamespace(decode=lambda ids: f"t{ids[0]}")
    direction = torch.tensor([1.0, 1.0, 0, 0, 0, 0])  # ln scale flips coordinate 1
    lens = logit_lens(direction, model, tok, k=1)
    assert lens["promoted"][0][0] == "t2" and lens["suppressed"][0][0] == "t4"
    with pytest.raises(ValueError, match="dims"):
        logit_lens(torch.ones(3), model, tok)


def test_histogram_and_best_match() -> None:
    h = histogram(torch.tensor([0.0, 1.0, 2.0, 2.0, 0.0]), bins=2)
    assert h["counts"] == [1, 2] and h["edges"][0] == 1.0
    scores, truth = toy_truth()
    mats = granularity_matrices(scores, truth, candidates=[10, 11, 12, 13])
    assert best_match(mats, 12)["trigger"] == {"behaviour": "a", "auroc": 1.0}


def test_findings_are_yes_no_only_when_every_seed_agrees() -> None:
    assert verdict([True, True, True]) == (True, "Yes")
    assert verdict([False, False]) == (False, "No")
    assert verdict([True, False, True]) == (None, "Mixed")
    assert verdict([True, None]) == (None, "Undecided")

    def seed(s: int, diff: float) -> dict[str, object]:
        return {
            "seed": s,
            "crosscoder_artefacts": {},
            "top_scores": {20: []},
            "scoreboard": [
                {"method": "diff_sae", "kl_closed_reconstruction": diff, "kl_closed_error": 0.1},
                {
                    "method": "batchtopk_crosscoder",
                    "kl_closed_reconstruction": 0.5,
                    "kl_closed_error": 0.3,
                },
                {"method": "l1_crosscoder", "kl_closed_reconstruction": 0.6},
            ],
        }

    out = {
        f["question"][:30]: f
        for f in seed_findings([seed(0, 0.9), seed(1, 0.4), seed(2, 0.95)], 0.3, 0.6)
    }
    kl = next(f for q, f in out.items() if q.startswith("Does the diff-SAE close"))
    assert kl["holds"] is None and kl["answer"].startswith("Mixed (holds on 2 of 3 seeds)")
    assert kl["numbers"]["diff_sae"] == [0.9, 0.4, 0.95]
    err = next(f for q, f in out.items() if q.startswith("Does less of the KL"))
    assert err["holds"] is True and err["answer"].startswith("Yes")


def test_probe_folds_split_every_behaviours_positives_evenly() -> None:
    """Even when one behaviour (like the chat template) is carried by nearly every row, each
    fold gets half of every behaviour's positive rows."""
    n = 20
    valid = torch.ones(n, 3, dtype=torch.bool)
    chat = torch.ones(n, dtype=torch.bool)
    chat[-2:] = False  # two plain-text rows
    a = torch.zeros(n, dtype=torch.bool)
    a[:8] = True
    z = torch.zeros(n, 3, dtype=torch.bool)
    truth = GroundTruth(valid, {"chat": z, "a": z}, {"chat": z, "a": z}, {"chat": chat, "a": a})
    for seed in range(5):
        fold = BL._folds(truth, 2, seed)
        assert int((fold[a] == 0).sum()) == 4 and int((fold[~chat] == 0).sum()) == 1
