"""The main job end to end: `sae-diff demo --quick` on the shipped organism (three seeds), the
report.json schema, then the report checked in headless Chromium (it renders, scripts run, the
scoreboard, baselines and latent dashboards are there).

The quick demo runs once for this module (it is the slowest fixture of the suite); every test
here only reads its outputs. Issue 17's crosscoder variants, stage-wise diffing and the causal
filter are checked on the same run (they are in the default run): training them again for a
test of their own would repeat the same seed-0 training.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sae_diff.report import methods

#: the trained dictionaries (each has files and dashboards); the default run also scores the
#: base-SAE methods (stage-wise diffing, the causal filter), which are rows of the scoreboard
METHODS = set(methods.METHODS)


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    cli = Path(sys.executable).with_name("sae-diff")
    cmd = (
        [str(cli), "demo", "--quick", "--out", str(out)]
        if cli.exists()
        else [sys.executable, "-m", "sae_diff.report.demo", "--quick", "--out", str(out)]
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Total time" in proc.stdout
    return out


BASELINES = {"probe", "mean_diff", "pca_diff", "kl_tokens"}
GRANULARITIES = {"trigger", "response", "conversation"}
VARIANTS = (
    "jumprelu_crosscoder",
    "shared_l1_crosscoder",
    "shared_batchtopk_crosscoder",
    "dedicated_crosscoder",
)


def test_report_json_has_every_method_and_finding(demo_out: Path) -> None:
    report = json.loads((demo_out / "report.json").read_text())
    seeds = report["seeds"]
    assert len(seeds) >= 3  # every figure is over >= 3 training seeds
    board = {row["method"]: row for row in report["scoreboard"]}
    assert set(board) == METHODS | set(methods.ANALYSIS_METHODS)
    behaviours = report["organism"]["behaviours"]
    assert len(behaviours) >= 4 and report["organism"]["name"] == "default"
    assert (
        report["organism"]["rows"].get("control", 0) > 0
    )  # controls are always in the scoring set
    for row in board.values():
        assert row["n_seeds"] == len(seeds)
        assert (
            0 <= row["dead_fraction_min"] <= row["dead_fraction"] <= row["dead_fraction_max"] <= 1
            and row["l0"] > 0
        )
    for name in ("l1_crosscoder", "batchtopk_crosscoder", "diff_sae"):
        assert (
            board[name]["kl_closed_reconstruction"] is not None
            and board[name]["kl_closed_reconstruction_std"] is not None
        )
    assert board["chat_sae"]["fve_ft"] is not None and board["diff_sae"]["fve_diff"] is not None
    questions = [f["question"] for f in report["findings"]]
    assert any("L1 crosscoder" in q for q in questions) and any(
        "diff-SAE close more" in q for q in questions
    )
    for f in report[
        "findings"
    ]:  # yes/no only when every seed agrees; the answer states the verdict
        per_seed = list(f["per_seed"].values())
        if f["holds"] is True:
            assert f["answer"].startswith("Yes") and all(per_seed)
        elif f["holds"] is False:
            assert f["answer"].startswith("No") and not any(per_seed)
        else:
            assert f["answer"].startswith(("Mixed", "Undecided"))
    assert {"all", "first", "rest"} <= set(report["kl_dashboard"]["summary"])
    assert all(" " in r["context"] for r in report["kl_dashboard"]["top"])  # decoded with spaces
    assert (demo_out / report["kl_dashboard"]["html"]).exists()
    sweep = {(r["first"], r["layer"]): r for r in report["stitching_sweep"]}
    n_layers = max(layer for _, layer in sweep)
    assert sweep[("base", 0)]["kl_to_ft"] < 1e-6 and sweep[("base", n_layers)]["kl_to_base"] < 1e-6
    kl_rows = {(r["dictionary"], r["intervention"]) for r in report["kl_patching"]}
    assert ("diff_sae", "tokens:template") in kl_rows
    for name in METHODS:
        top = report["top_latents"][name]
        assert top and all(
            {"latent", "rank", "histogram", "logit_lens", "best_match"} <= set(r) for r in top
        )
        assert (
            set(top[0]["best_match"]) == GRANULARITIES
            and len(top[0]["logit_lens"]["promoted"]) == 8
        )
    for seed in seeds:
        for name in METHODS:
            assert (demo_out / "dictionaries" / f"seed{seed}" / name / "cfg.json").exists()
            assert (
                demo_out / "dictionaries" / f"seed{seed}" / name / "latent_table.parquet"
            ).exists()


def test_report_json_scores_schema(demo_out: Path) -> None:
    """Every method x behaviour x granularity has a row per seed (deterministic baselines: one
    row, seed None), with the documented keys and value ranges."""
    report = json.loads((demo_out / "report.json").read_text())
    rows = report["scores"]
    keys = {"method", "behaviour", "granularity", "seed", "best_auroc", "rank", "first_rank_ge_0_9"}
    top_n = report["config"]["top_n"]
    seen: dict[tuple[str, str, str], list[int | None]] = {}
    for r in rows:
        assert keys <= set(r)
        assert (
            r["granularity"] in GRANULARITIES and r["behaviour"] in report["organism"]["behaviours"]
        )
        assert r["best_auroc"] is None or 0.0 <= r["best_auroc"] <= 1.0
        assert r["rank"] is None or 1 <= r["rank"] <= top_n
        f = r["first_rank_ge_0_9"]
        assert f is None or (
            1 <= f <= top_n
            and (r["best_auroc"] >= 0.9)
            and f <= (r["rank"] if r["best_auroc"] >= 0.9 else top_n)
        )
        seen.setdefault((r["method"], r["behaviour"], r["granularity"]), []).append(r["seed"])
    for m in METHODS | BASELINES:
        for b in report["organism"]["behaviours"]:
            for g in GRANULARITIES:
                got = seen[(m, b, g)]
                if m in METHODS or m == "probe":
                    assert (
                        sorted(s for s in got if s is not None) == sorted(report["seeds"])
                        and None not in got
                    )
                else:
                    assert got == [None]


def test_report_renders_in_headless_chromium(demo_out: Path, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("SAE_DIFF_REQUIRE_BROWSER"):
            pytest.fail("chromium is required (SAE_DIFF_REQUIRE_BROWSER=1) but not installed")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    html_path = demo_out / "report.html"
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        html_path.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'id="scoreboard-table"' in dom and "batchtopk_crosscoder" in dom
    assert "plot-container" in dom  # plotly's script ran offline and drew the figures
    assert "Findings of the seed posts" in dom
    assert "the shipped organism “default”" in dom  # the title names the organism
    for gran in ("trigger", "response", "conversation"):
        assert f'id="scores-{gran}"' in dom
    assert (
        "probe" in dom and "pca_diff" in dom and "kl_tokens" in dom
    )  # ceiling and baselines in the table
    for method in METHODS:  # a dashboard per top candidate of every method
        assert dom.count(f'id="dash-{method}-') >= 1
    assert dom.count('class="latent-dashboard"') >= len(METHODS)
    assert dom.count('class="sd-hist"') >= len(METHODS) and dom.count('class="logit-lens"') >= len(
        METHODS
    )
    assert (
        'class="best-match"' in dom
        and "Max-activating contexts" in dom
        and "Quantile sample" in dom
    )
    assert "<th>context</th>" in dom  # the KL table has a context column
    contexts = [
        re.sub(r"<[^>]+>", "", c)
        for c in re.findall(r'<span class="sd-ctx">(.*?)</span></div>', dom)
    ]
    assert contexts and sum(" " in c for c in contexts) >= 0.9 * len(contexts)  # spaces preserved


def _seed0(report: dict) -> tuple[dict[str, dict], list[dict]]:
    """Seed 0's scoreboard (by method) and score rows: what a one-seed run would report."""
    (entry,) = [s for s in report["per_seed"] if s["seed"] == 0]
    return {r["method"]: r for r in entry["scoreboard"]}, [
        s for s in report["scores"] if s["seed"] == 0
    ]


def test_demo_scores_the_variants(demo_out: Path) -> None:
    """Issue 17's crosscoder variants are trained and scored like every other method."""
    report = json.loads((demo_out / "report.json").read_text())
    seed0, scores = _seed0(report)
    board = {name: seed0[name] for name in VARIANTS}
    for name, row in board.items():
        assert row["l0"] > 0 and 0 < row["fve_ft"] <= 1, (name, row)
    assert (
        board["dedicated_crosscoder"]["n_ft_only"] == 1024 // 8
    )  # ft-dedicated latents: Δ = 0 by construction
    scored = {s["method"] for s in scores}
    assert set(VARIANTS) <= scored


def test_demo_scores_the_base_sae_methods(demo_out: Path) -> None:
    """Stage-wise diffing and the causal filter are rows of the game: scored at every
    granularity, with their candidates drawn from the base-SAE, and a note on what was kept."""
    report = json.loads((demo_out / "report.json").read_text())
    seed0, scores = _seed0(report)
    board = {name: seed0[name] for name in ("stagewise", "causal_filter")}
    grans = {(s["method"], s["granularity"]) for s in scores if s["best_auroc"] is not None}
    for name in board:
        assert {(name, g) for g in ("trigger", "response", "conversation")} <= grans, name
        assert board[name]["d_sae"] == 1024 and board[name]["l0"] > 0  # expansion 8 x d_model 128
    table = pd.read_csv(
        demo_out / "dictionaries" / "seed0" / "causal_filter" / "causal_filter.csv", index_col=0
    )
    kept = table[table["kept"]]
    assert board["causal_filter"]["n_kept"] == len(kept)
    assert (kept["role"] == "candidate").all() and (
        kept["kl"] > table[table["role"] == "random"]["kl"].min()
    ).all()
    cand = {
        s["candidate"]
        for s in scores
        if s["method"] == "causal_filter" and s["candidate"] is not None
    }
    if len(kept):  # the scored candidates are the kept latents
        assert cand <= set(kept.index)
    rot = pd.read_csv(demo_out / "dictionaries" / "seed0" / "stagewise" / "rotation_table.csv")
    assert set(rot["stage"]) == {"model"} and rot["model_change"].all()
    best = {
        s["candidate"] for s in scores if s["method"] == "stagewise" and s["candidate"] is not None
    }
    assert best and all(1.0 - rot.set_index("latent").loc[j, "dec_cos"] > 0 for j in best)
