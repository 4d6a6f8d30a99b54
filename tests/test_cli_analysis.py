"""`sae-diff stagewise` and `sae-diff causal-filter`: each method end to end from a YAML config
through the console entry point (tiny sizes), and a bad config is one line on stderr (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from sae_diff import cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "analysis"


def _small(name: str, **sizes: object) -> dict[str, object]:
    return {**yaml.safe_load((CONFIGS / name).read_text()), **sizes}


def test_help_lists_the_analysis_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "stagewise" in out and "causal-filter" in out


@pytest.mark.parametrize("command", ["stagewise", "train"])  # train: the config's `method:`
def test_stagewise_from_a_config(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "sw.yaml"
    cfg.write_text(
        yaml.safe_dump(
            _small(
                "stagewise_organism.yaml",
                n_docs=48,
                max_rows=48,
                expansion=2,
                k=8,
                start_steps=20,
                stage_steps=10,
                batch_size=128,
                n_top=3,
            )
        )
    )
    assert cli.main([command, "--config", str(cfg), "--out", str(tmp_path / "out")]) == 0
    assert "rotation_table" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "out" / "rotation_table.csv")
    assert set(table["stage"]) == {"data", "model", "both"}
    assert set(table.loc[table["model_change"], "stage"]) == {
        "model",
        "both",
    }  # both: resumed from data


@pytest.mark.parametrize("command", ["causal-filter", "train"])
def test_causal_filter_from_a_config(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "cf.yaml"
    cfg.write_text(
        yaml.safe_dump(
            _small(
                "causal_filter_organism.yaml",
                n_docs=48,
                max_rows=48,
                expansion=2,
                k=8,
                train_steps=20,
                batch_size=128,
                n_eval=2,
                n_candidates=3,
                n_random=3,
            )
        )
    )
    assert cli.main([command, "--config", str(cfg), "--out", str(tmp_path / "out")]) == 0
    assert "kept" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "out" / "causal_filter.csv")
    assert list(table["role"]) == ["candidate"] * 3 + ["random"] * 3
    assert not table.loc[table["role"] == "random", "kept"].any()


@pytest.mark.parametrize(
    ("command", "config", "field"),
    [
        ("stagewise", "stagewise_organism.yaml", "n_stpes"),
        ("causal-filter", "causal_filter_organism.yaml", "n_candidate"),
    ],
)
def test_a_bad_config_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, config: str, field: str
) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(_small(config, **{field: 3})))
    assert cli.main([command, "--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sae-diff {command}: error:") and field in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing was harvested


def test_bad_stages_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        yaml.safe_dump(
            _small("stagewise_organism.yaml", stages=[{"name": "x", "model": "chat", "data": "ft"}])
        )
    )
    assert cli.main(["stagewise", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "stages" in err and "'base' or 'ft'" in err and "\n" not in err
