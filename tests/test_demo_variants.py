"""Issue 17's crosscoder variants in the diffing game: `sae-diff demo --methods ...` trains and
scores them like every other method (one seed, quick size); so are stage-wise diffing and the
base-SAE causal filter. All of them are in the default run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from sae_diff.report import demo

VARIANTS = (
    "jumprelu_crosscoder",
    "shared_l1_crosscoder",
    "shared_batchtopk_crosscoder",
    "dedicated_crosscoder",
)


def test_every_method_is_in_the_default_run() -> None:
    """`make demo` scores issue 17's methods too (at their shrunk step counts); --methods selects."""
    assert set(VARIANTS) | {"stagewise", "causal_filter"} <= set(demo.DEFAULT_METHODS)
    assert set(demo.DEFAULT_METHODS) == set(demo.METHODS) | set(demo.ANALYSIS_METHODS)
    assert demo.DemoConfig().methods == demo.DEFAULT_METHODS
    assert demo.DemoConfig(methods=("stagewise",)).methods == ("stagewise",)
    with pytest.raises(ValueError, match="Unknown method"):
        demo.DemoConfig(methods=("stage_wise",))
    for name in VARIANTS:
        assert demo.METHODS[name]["kind"] == "crosscoder" and demo.METHODS[name]["mode"] == "paired"


@pytest.mark.slow
def test_demo_scores_the_variants(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        demo.main(
            [
                "--quick",
                "--out",
                str(tmp_path),
                "--seeds",
                "0",
                "--threads",
                "1",
                "--methods",
                ",".join(VARIANTS),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "report.json").read_text())
    board = {row["method"]: row for row in report["scoreboard"]}
    assert set(board) == set(VARIANTS)
    for name, row in board.items():
        assert row["l0"] > 0 and 0 < row["fve_ft"] <= 1, (name, row)
    assert (
        board["dedicated_crosscoder"]["n_ft_only"] == 1024 // 8
    )  # ft-dedicated latents: Δ = 0 by construction
    scored = {s["method"] for s in report["scores"]}
    assert set(VARIANTS) <= scored
    assert "Total time" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_scores_the_base_sae_methods(tmp_path: Path) -> None:
    """Stage-wise diffing and the causal filter are rows of the game: scored at every
    granularity, with their candidates drawn from the base-SAE, and a note on what was kept."""
    assert (
        demo.main(
            [
                "--quick",
                "--out",
                str(tmp_path),
                "--seeds",
                "0",
                "--threads",
                "1",
                "--methods",
                "stagewise,causal_filter",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "report.json").read_text())
    board = {row["method"]: row for row in report["scoreboard"]}
    assert set(board) == {"stagewise", "causal_filter"}
    grans = {
        (s["method"], s["granularity"]) for s in report["scores"] if s["best_auroc"] is not None
    }
    for name in board:
        assert {(name, g) for g in ("trigger", "response", "conversation")} <= grans, name
        assert board[name]["d_sae"] == 1024 and board[name]["l0"] > 0  # expansion 8 x d_model 128
    table = pd.read_csv(
        tmp_path / "dictionaries" / "seed0" / "causal_filter" / "causal_filter.csv", index_col=0
    )
    kept = table[table["kept"]]
    assert board["causal_filter"]["n_kept"] == len(kept)
    assert (kept["role"] == "candidate").all() and (
        kept["kl"] > table[table["role"] == "random"]["kl"].min()
    ).all()
    cand = {
        s["candidate"]
        for s in report["scores"]
        if s["method"] == "causal_filter" and s["candidate"] is not None
    }
    if len(kept):  # the scored candidates are the kept latents
        assert cand <= set(kept.index)
    rot = pd.read_csv(tmp_path / "dictionaries" / "seed0" / "stagewise" / "rotation_table.csv")
    assert set(rot["stage"]) == {"model"} and rot["model_change"].all()
    best = {
        s["candidate"]
        for s in report["scores"]
        if s["method"] == "stagewise" and s["candidate"] is not None
    }
    assert best and all(1.0 - rot.set_index("latent").loc[j, "dec_cos"] > 0 for j in best)


def test_causal_filter_falls_back_to_the_firing_shift(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When no candidate passes the filter, the firing-shift ranking is scored and the row says so."""
    from sae_diff.analysis import causal_filter as cf

    def keep_nothing(*args: object, **kw: object) -> cf.CausalFilterResult:
        res = real(*args, **kw)
        res.table["kept"] = False
        return cf.CausalFilterResult(table=res.table, threshold=res.threshold, kept=[])

    real = cf.causal_filter
    monkeypatch.setattr(cf, "causal_filter", keep_nothing)
    cfg = demo.DemoConfig.quick_config(
        out=tmp_path,
        seeds=(0,),
        methods=("causal_filter",),
        train_steps=60,
        causal_candidates=4,
        causal_random=4,
    )
    report = demo.run_demo(cfg)
    row = report["scoreboard"][0]
    assert row["n_kept"] == 0 and "firing-shift ranking" in row["note"]
    scored = [
        s for s in report["scores"] if s["method"] == "causal_filter" and s["candidate"] is not None
    ]
    assert scored  # the fallback ranking was scored
