"""Issue 17's crosscoder variants in the diffing game: `sae-diff demo --methods ...` trains and
scores them like every other method (one seed, quick size), and they stay out of the default run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sae_diff.report import demo

VARIANTS = ("jumprelu_crosscoder", "shared_l1_crosscoder", "shared_batchtopk_crosscoder", "dedicated_crosscoder")


def test_variants_are_selectable_but_not_default() -> None:
    assert set(VARIANTS) <= set(demo.METHODS) and not set(VARIANTS) & set(demo.DEFAULT_METHODS)
    assert demo.DemoConfig().methods == demo.DEFAULT_METHODS
    for name in VARIANTS:
        assert demo.METHODS[name]["kind"] == "crosscoder" and demo.METHODS[name]["mode"] == "paired"


@pytest.mark.slow
def test_demo_scores_the_variants(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--quick", "--out", str(tmp_path), "--seeds", "0", "--threads", "1",
                      "--methods", ",".join(VARIANTS)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    board = {row["method"]: row for row in report["scoreboard"]}
    assert set(board) == set(VARIANTS)
    for name, row in board.items():
        assert row["l0"] > 0 and 0 < row["fve_ft"] <= 1, (name, row)
    assert board["dedicated_crosscoder"]["n_ft_only"] == 1024 // 8  # ft-dedicated latents: Δ = 0 by construction
    scored = {s["method"] for s in report["scores"]}
    assert set(VARIANTS) <= scored
    assert "Total time" in capsys.readouterr().out
