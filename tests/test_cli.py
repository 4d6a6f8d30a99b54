"""The sae-diff command line: help texts, dry runs of every shipped config, errors, delegation."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sae_diff.cli import main

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_top_level_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("train", "harvest", "upload", "organism", "demo"):
        assert cmd in out
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--dry-run" in out and "--resume DIR" in out and "config flags:" in out


def test_help_config_lists_architecture_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", str(CONFIGS[0]), "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "--base_model_name" in out and "--training_tokens" in out and "--lr" in out


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_dry_runs(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing was loaded" in out
    assert main(["train", "--config", str(config), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    for key in (
        "base_model",
        "ft_model",
        "hook_name",
        "d_in",
        "d_sae",
        "training_tokens",
        "training_memory_bytes",
        "cache_bytes",
    ):
        assert key in plan
    if config.stem.startswith("gemma2_2b"):
        assert (plan["base_model"], plan["ft_model"]) == (
            "google/gemma-2-2b",
            "google/gemma-2-2b-it",
        )
        assert (plan["hook_name"], plan["d_in"], plan["d_sae"]) == (
            "blocks.13.hook_resid_post",
            2304,
            73728,
        )
        assert plan["k"] == (None if "l1_crosscoder" in config.stem else 100)


def test_dry_run_errors_name_the_problem(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(CONFIGS[0])
    assert main(["train", "--config", cfg, "--dry-run", "--d_in", "2000"]) == 2
    assert "does not match hook" in capsys.readouterr().err
    assert main(["train", "--config", cfg, "--dry-run", "--architecture", "no_such_arch"]) == 2
    assert "Unknown architecture 'no_such_arch'" in capsys.readouterr().err
    assert main(["train", "--config", cfg, "--dry-run", "--store_mode", "diff"]) == 2
    assert "is a crosscoder" in capsys.readouterr().err


def test_train_end_to_end_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke_test_crosscoder.yaml"
    flags = [
        "--training_tokens",
        "2048",
        "--train_batch_size_tokens",
        "256",
        "--n_checkpoints",
        "1",
        "--checkpoint_path",
        str(tmp_path / "ck"),
        "--output_path",
        str(tmp_path / "out"),
        "--n_eval_batches",
        "1",
        "--d_sae",
        "64",
        "--context_size",
        "16",
        "--n_norm_batches",
        "2",
    ]
    assert main(["train", "--config", str(smoke), *flags]) == 0
    out = capsys.readouterr().out
    assert "metrics/fve_ft" in out and "Saved to" in out
    assert (tmp_path / "out" / "cfg.json").is_file()
    (run_dir,) = (tmp_path / "ck").iterdir()
    assert (
        main(
            [
                "train",
                "--resume",
                str(run_dir),
                "--output_path",
                str(tmp_path / "out2"),
                "--eval_at_end",
                "false",
            ]
        )
        == 0
    )
    assert "Resuming from" in capsys.readouterr().out and (tmp_path / "out2" / "cfg.json").is_file()


def test_demo_and_organism_delegate(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib
    import types

    fake = types.ModuleType("sae_diff.report.demo")
    seen: list[list[str]] = []
    fake.main = lambda argv: seen.append(list(argv)) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, "sae_diff.report.demo", fake)
    assert main(["demo", "--quick", "--out", "x"]) == 0 and seen == [["--quick", "--out", "x"]]
    monkeypatch.delitem(__import__("sys").modules, "sae_diff.report.demo")
    real_import = importlib.import_module

    def missing(name: str, *a: object) -> object:
        if name == "sae_diff.report.demo":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *a)

    monkeypatch.setattr(importlib, "import_module", missing)
    assert main(["demo"]) == 2
    assert "demo pipeline is not available" in capsys.readouterr().err


def test_console_script_target_and_help_stay_light() -> None:
    """``[project.scripts]`` still names ``sae_diff.cli:main``, and ``--help`` answers without
    importing the trainer (the handlers import it lazily)."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sae-diff"] == "sae_diff.cli:main"
    code = (
        "import sys\nfrom sae_diff.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print(sorted(m for m in sys.modules if m.startswith('sae_diff.training')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert "usage: sae-diff" in out
    assert out.strip().splitlines()[-1] == "[]"
