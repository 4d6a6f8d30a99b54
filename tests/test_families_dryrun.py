"""``sae-diff train --dry-run`` checks, from config files and tokenizers alone, on the tiny
family pairs of tests/families.py: both config.json, the hook against the architecture,
d_in against d_model, context_size against max_position_embeddings, tokenizer compatibility,
the dataset's column. Each failure names the problem and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from families import FAMILIES, build_family_pair, chat_rows

from sae_diff.cli import main
from sae_diff.training.config import ConfigError, config_from_dict, make_plan

D_MODEL = 64


def write_chat_jsonl(path: Path, n: int = 16) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(n)))
    return path


def plain_config(family: str, tmp_path: Path, **over: Any) -> dict[str, Any]:
    """Only model paths, hook, dataset and sizes (what a new user writes)."""
    base_dir, ft_dir = build_family_pair(family)
    data = write_chat_jsonl(tmp_path / "chat.jsonl")
    d: dict[str, Any] = {
        "base_model_name": str(base_dir),
        "model_name": str(ft_dir),
        "hook_name": "blocks.1.hook_resid_pre",
        "dataset_path": str(data),
        "context_size": 32,
        "training_tokens": 2048,
        "train_batch_size_tokens": 128,
        "sae": {"architecture": "batchtopk_crosscoder", "d_in": D_MODEL, "d_sae": 128, "k": 8},
        "output_path": str(tmp_path / "out"),
        "checkpoint_path": str(tmp_path / "ckpt"),
    }
    d.update(over)
    return d


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_config_dry_run_checks_pass(family: str, tmp_path: Path) -> None:
    plan = make_plan(config_from_dict(plain_config(family, tmp_path)))
    assert plan.model_dims is not None
    assert plan.model_dims["d_model"] == D_MODEL and plan.model_dims["n_layers"] == 2
    assert plan.model_dims["n_ctx"] == 128
    notes = "\n".join(plan.notes)
    assert "backend: bridge" in notes
    assert "tokenizers compatible; configured differently" in notes
    assert "chat data in column 'messages'" in notes


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hook_name": "blocks.2.hook_resid_pre"}, r"names layer 2, but the model has 2 layers"),
        ({"hook_name": "blocks.1.hook_resid_pr"}, r"did you mean 'blocks.1.hook_resid_pre'"),
        ({"hook_name": "resid_pre"}, r"not a TransformerLens hook"),
        (
            {"sae": {"architecture": "batchtopk_crosscoder", "d_in": 32, "d_sae": 128, "k": 8}},
            r"sae.d_in=32 does not match hook 'blocks.1.hook_resid_pre', which is 64 wide",
        ),
        ({"context_size": 256}, r"context_size=256 exceeds .* context of 128 tokens"),
        ({"dataset_column": "conversation"}, r"column 'conversation' not in the dataset"),
        ({"model_backend": "hooked"}, r"HookedTransformer cannot build 'Gemma2ForCausalLM'"),
    ],
)
def test_dry_run_errors_name_problem_and_fix(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_plan(config_from_dict(plain_config("gemma2", tmp_path, **change)))


def test_dry_run_catches_mismatched_pairs(tmp_path: Path) -> None:
    # same sizes, another vocabulary: the tokenizers, read from the folders, disagree
    _, mistral_ft = build_family_pair("mistral")
    with pytest.raises(ConfigError, match="tokenizers are incompatible"):
        make_plan(config_from_dict(plain_config("gemma2", tmp_path, model_name=str(mistral_ft))))
    # another architecture size: config.json says so before any weight is read
    _, qwen_ft = build_family_pair("qwen2")
    with pytest.raises(ConfigError, match="config.json vocab_size differs"):
        make_plan(config_from_dict(plain_config("llama3", tmp_path, model_name=str(qwen_ft))))


def test_dry_run_refuses_a_fake_bos(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="prepend_bos: true, but the tokenizer .* has no BOS"):
        make_plan(config_from_dict(plain_config("qwen2", tmp_path, prepend_bos=True)))
    assert make_plan(config_from_dict(plain_config("qwen2", tmp_path, prepend_bos=False)))
    assert make_plan(config_from_dict(plain_config("llama3", tmp_path, prepend_bos=True)))


def test_dry_run_chat_data_needs_ft_chat_template(tmp_path: Path) -> None:
    base_dir, _ = build_family_pair("llama3")
    # the base folder has no chat template: used as "ft" it cannot render chat data
    with pytest.raises(ConfigError, match="no chat template"):
        make_plan(config_from_dict(plain_config("llama3", tmp_path, model_name=str(base_dir))))


def test_dry_run_without_local_configs_notes_instead_of_fetching(tmp_path: Path) -> None:
    cfg = plain_config("qwen2", tmp_path, model_name="some-org/unreleased-instruct")
    plan = make_plan(config_from_dict(cfg))
    assert any(
        "ft model 'some-org/unreleased-instruct': config.json not available offline" in n
        for n in plan.notes
    )
    assert any("backend: bridge" in n for n in plan.notes)  # the base is still checked


def test_cli_dry_run_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    cfg = plain_config("qwen3", tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "backend: bridge for Qwen3ForCausalLM" in out
    bad = dict(cfg, hook_name="blocks.7.hook_resid_post")
    path.write_text(yaml.safe_dump(bad))
    assert main(["train", "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "names layer 7, but the model has 2 layers" in err
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
