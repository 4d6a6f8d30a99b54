"""The demo pipeline in-process at a tiny size: same seed and thread count reproduce the same
numbers; different training seeds give different dictionaries; bad options fail clearly."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sae_diff.report.demo import DemoConfig, main, run_demo


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(out: Path) -> DemoConfig:
    return DemoConfig.quick_config(
        out=out, n_pretrain_docs=60, n_chat_docs=60, max_rows=60, train_steps=15, batch_size=128,
        eval_per_behaviour=3, n_text=2, random_seeds=1, top_n=8, n_example_latents=1, n_pca=2, n_kl_types=2,
        seeds=(0, 1), methods=("batchtopk_crosscoder", "diff_sae"))


def test_same_seed_and_threads_reproduce_every_score(tmp_path: Path, one_thread: None) -> None:
    a = run_demo(tiny(tmp_path / "a"))
    b = run_demo(tiny(tmp_path / "b"))
    assert a["scores"] == b["scores"]
    assert a["scoreboard"] == b["scoreboard"]
    assert [f["answer"] for f in a["findings"]] == [f["answer"] for f in b["findings"]]
    # the two training seeds are really different trainings
    by_seed = {s["seed"]: s["scoreboard"] for s in a["per_seed"]}
    assert by_seed[0] != by_seed[1]
    written = json.loads((tmp_path / "a" / "report.json").read_text())
    assert written["scores"] == json.loads(json.dumps(a["scores"]))
    assert (tmp_path / "a" / "report.html").stat().st_size > 0


def test_bad_method_or_seeds_fail_with_a_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="Unknown method"):
        DemoConfig(methods=("crosscoderz",))
    with pytest.raises(ValueError, match="distinct"):
        DemoConfig(seeds=(1, 1))
    with pytest.raises(SystemExit):
        main(["--methods", "nope"])
    assert "Unknown method" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--seeds", "a,b"])
    assert "comma-separated integers" in capsys.readouterr().err
