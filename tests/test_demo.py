"""The main job end to end: `sae-diff demo --quick` on the bundled organism, then the report
checked in headless Chromium (it renders, scripts run, the scoreboard is there)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

METHODS = {"l1_crosscoder", "batchtopk_crosscoder", "diff_sae", "chat_sae"}


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    cli = Path(sys.executable).with_name("sae-diff")
    cmd = [str(cli), "demo", "--quick", "--out", str(out)] if cli.exists() else \
        [sys.executable, "-m", "sae_diff.report.demo", "--quick", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Total time" in proc.stdout
    return out


def test_report_json_has_every_method_and_finding(demo_out: Path) -> None:
    report = json.loads((demo_out / "report.json").read_text())
    board = {row["method"]: row for row in report["scoreboard"]}
    assert set(board) == METHODS
    behaviours = report["organism"]["behaviours"]
    assert len(behaviours) >= 4
    for row in board.values():
        assert 0 <= row["dead_fraction"] <= 1 and row["l0"] > 0
        for b in behaviours:
            assert 0.0 <= row[f"auroc_{b}"] <= 1.0 and 1 <= row[f"rank_{b}"] <= 50
    for name in ("l1_crosscoder", "batchtopk_crosscoder", "diff_sae"):
        assert board[name]["kl_closed_reconstruction"] is not None
    assert board["chat_sae"]["fve_ft"] is not None and board["diff_sae"]["fve_diff"] is not None
    questions = [f["question"] for f in report["findings"]]
    assert any("L1 crosscoder" in q for q in questions) and any("diff-SAE close more" in q for q in questions)
    for f in report["findings"]:  # the answer states numbers, and agrees with `holds`
        if f["holds"] is not None:
            assert f["answer"].startswith("Yes" if f["holds"] else "No")
    assert {"all", "first", "rest"} <= set(report["kl_dashboard"]["summary"])
    assert (demo_out / report["kl_dashboard"]["html"]).exists()
    sweep = {(r["first"], r["layer"]): r for r in report["stitching_sweep"]}
    n_layers = max(layer for _, layer in sweep)
    assert sweep[("base", 0)]["kl_to_ft"] < 1e-6 and sweep[("base", n_layers)]["kl_to_base"] < 1e-6
    kl_rows = {(r["dictionary"], r["intervention"]) for r in report["kl_patching"]}
    assert ("diff_sae", "tokens:template") in kl_rows
    for name in METHODS:
        top = report["top_latents"][name]
        assert top and all("latent" in r for r in top)
    for name in ("l1_crosscoder", "batchtopk_crosscoder", "diff_sae", "chat_sae"):
        assert (demo_out / "dictionaries" / name / "cfg.json").exists()
        assert (demo_out / "dictionaries" / name / "latent_table.parquet").exists()


def test_report_renders_in_headless_chromium(demo_out: Path, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("SAE_DIFF_REQUIRE_BROWSER"):
            pytest.fail("chromium is required (SAE_DIFF_REQUIRE_BROWSER=1) but not installed")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    html_path = demo_out / "report.html"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
           html_path.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'id="scoreboard-table"' in dom and "batchtopk_crosscoder" in dom
    assert "plot-container" in dom  # plotly's script ran offline and drew the figures
    assert "Findings of the seed posts" in dom
