"""``sae-diff train`` flags are parsed as SAELens's runner parses them (simple_parsing subgroups
keyed by the training registry, ``--architecture`` their alias), with the config file's values
as defaults."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from sae_lens.llm_sae_training_runner import _parse_cfg_args

from sae_diff.training.flags import parse_config

SAE_FLAGS = ["--d_in", "16", "--d_sae", "32", "--k", "4"]
RUN_FLAGS = ["--hook_name", "blocks.0.hook_resid_post", "--lr", "3e-4", "--context_size", "64"]
PAIR_FLAGS = ["--model_name", "ft", "--base_model_name", "base", "--cache_path", "unused"]


@pytest.mark.parametrize("architecture", ["batchtopk", "topk", "standard"])
def test_saelens_architectures_parse_as_saelens_parses_them(architecture: str) -> None:
    """The same flags give SAELens's runner and ours the same SAE config and run fields."""
    flags = ["--architecture", architecture, *SAE_FLAGS, *RUN_FLAGS]
    if architecture == "standard":
        flags.remove("--k")
        flags.remove("4")
    theirs = _parse_cfg_args([*flags, "--model_name", "ft"])
    ours = parse_config(None, [*flags, *PAIR_FLAGS])
    assert type(ours.sae) is type(theirs.sae)
    assert dataclasses.asdict(ours.sae) == dataclasses.asdict(theirs.sae)
    for name in ("lr", "context_size", "hook_name", "train_batch_size_tokens", "training_tokens"):
        assert getattr(ours, name) == getattr(theirs, name), name


def _file(tmp_path: Path, sae: dict[str, Any]) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model_name": "ft",
                "base_model_name": "base",
                "hook_name": "blocks.0.hook_resid_post",
                "cache_path": str(tmp_path / "cache"),
                "sae": sae,
            }
        )
    )
    return path


def test_the_file_s_sae_values_are_the_flags_defaults(tmp_path: Path) -> None:
    path = _file(
        tmp_path, {"architecture": "batchtopk_crosscoder", "d_in": 16, "d_sae": 64, "k": 3}
    )
    cfg = parse_config(path, [])
    assert (type(cfg.sae).__name__, cfg.sae.d_sae, cfg.sae.k) == (
        "BatchTopKCrosscoderTrainingConfig",
        64,
        3,
    )
    cfg = parse_config(path, ["--k", "5"])
    assert (cfg.sae.d_sae, cfg.sae.k) == (64, 5)  # a flag overrides one value, keeps the rest


def test_architecture_flag_switches_the_subgroup_and_keeps_shared_values(tmp_path: Path) -> None:
    """``--architecture`` picks another registry entry: the file's values it shares are kept,
    the others dropped with a warning naming them, and the new one's own flags exist."""
    path = _file(
        tmp_path,
        {"architecture": "batchtopk_crosscoder", "d_in": 16, "d_sae": 64, "k": 3, "n_models": 2},
    )
    with pytest.warns(UserWarning, match=r"ignoring the file's sae fields \['n_models'\]"):
        cfg = parse_config(
            path, ["--architecture", "batchtopk_diff_sae", "--diff_sign", "base_minus_ft"]
        )
    assert type(cfg.sae).__name__ == "BatchTopKDiffSAETrainingConfig"
    assert (cfg.sae.d_sae, cfg.sae.k, cfg.sae.diff_sign, cfg.store_mode) == (
        64,
        3,
        "base_minus_ft",
        "diff",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no field dropped
        same = parse_config(path, ["--architecture", "batchtopk_crosscoder"])
    assert same.sae.k == 3
