"""Training on the bundled model organism: config resolution and validation (no model loaded),
dry runs of the organism configs, and one small end-to-end run through the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from sae_lens import SAE

import sae_diff  # noqa: F401  (registers the architectures)
from sae_diff.cli import main
from sae_diff.organisms import available_organisms
from sae_diff.training import data as tdata
from sae_diff.training.config import ConfigError, config_from_dict, organism_info, parse_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ORGANISM_CONFIGS = sorted(CONFIGS.glob("organism_*.yaml"))


def organism_cfg(**over: object) -> dict[str, object]:
    d: dict[str, object] = {
        "organism": "default",
        "context_size": 64,
        "training_tokens": 2048,
        "train_batch_size_tokens": 256,
        "sae": {"architecture": "batchtopk_crosscoder", "d_in": 128, "d_sae": 256, "k": 8},
        "checkpoint_path": None,
        "output_path": None,
    }
    d.update(over)
    return d


def test_organism_configs_are_shipped_and_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    names = {c.stem for c in ORGANISM_CONFIGS}
    assert names >= {
        "organism_batchtopk_crosscoder",
        "organism_batchtopk_diff_sae",
        "organism_l1_crosscoder",
        "organism_chat_sae",
    }
    for config in ORGANISM_CONFIGS:  # tests/test_cli.py dry-runs them too, with the JSON plan
        assert main(["train", "--config", str(config), "--dry-run", "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        organism = yaml.safe_load(config.read_text())["organism"]
        # each shipped organism names its own pair (narrow's base is the default's fine-tune)
        expected = {
            "default": ("organism-base", "organism-ft"),
            "narrow": ("organism-ft", "narrow-ft"),
        }
        assert (plan["base_model"], plan["ft_model"]) == expected[organism], config.name
        assert plan["hook_name"] == "blocks.2.hook_resid_pre" and plan["d_in"] == 128
        assert plan["model_dims"]["n_layers"] == 4
        assert any(f"organism {organism!r}" in n for n in plan["notes"])


def test_organism_fills_names_and_hook_without_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load(*_: object, **__: object) -> None:
        raise AssertionError("a config must not load the organism")

    monkeypatch.setattr("sae_diff.organisms.load_organism", no_load)
    info = organism_info("default")
    cfg = config_from_dict(organism_cfg())
    assert (cfg.base_model_name, cfg.model_name, cfg.hook_name) == (
        info.base_name,
        info.ft_name,
        info.recommended_hook,
    )
    assert tdata.uses_organism_data(cfg) and cfg.store_mode == "paired"
    relabelled = config_from_dict(
        organism_cfg(model_name="my-ft", hook_name="blocks.3.hook_resid_post")
    )
    assert (relabelled.model_name, relabelled.hook_name) == ("my-ft", "blocks.3.hook_resid_post")
    own_data = config_from_dict(organism_cfg(dataset_path="some/dataset"))
    assert not tdata.uses_organism_data(own_data)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"organism": "no_such_organism"},
            "not a bundled organism; available: " + str(available_organisms()),
        ),
        (
            {"sae": {"architecture": "batchtopk_crosscoder", "d_in": 64, "d_sae": 256, "k": 8}},
            "sae.d_in=64 does not match hook",
        ),
        ({"hook_name": "blocks.7.hook_resid_pre"}, "names layer 7, but the model has 4 layers"),
        ({"hook_name": "blocks.1.attn.hook_q"}, "not a hook sae_diff can train on"),
        ({"context_size": 512}, "exceeds organism 'default'"),
        ({"organism_chat_share": 1.5}, "organism_chat_share"),
        ({"smoke_test_models": {"n_layers": 2}}, "keep one of them"),
        ({"organism": None, "base_model_name": "b", "dataset_path": "x"}, "model_name is empty"),
    ],
)
def test_bad_organism_configs_fail_clearly(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(organism_cfg(**change))


def test_bad_organism_name_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    config = CONFIGS / "organism_batchtopk_crosscoder.yaml"
    assert main(["train", "--config", str(config), "--dry-run", "--organism", "nope"]) == 2
    err = capsys.readouterr().err
    assert "organism='nope' is not a bundled organism" in err and "default" in err


def test_organism_data_mixes_text_and_chat() -> None:
    cfg = config_from_dict(organism_cfg(organism_chat_share=0.25))
    datasets, shares = tdata.organism_datasets(cfg)
    assert shares == [0.75, 0.25]
    assert "text" in datasets[0].column_names and "messages" in datasets[1].column_names
    assert (
        tdata.organism_datasets(cfg)[0][0] is datasets[0]
    )  # cached: train and eval read one stream
    only_text, only_shares = tdata.organism_datasets(
        config_from_dict(organism_cfg(organism_chat_share=0.0))
    )
    assert only_shares == [1.0] and len(only_text) == 1


def test_organism_config_trains_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = CONFIGS / "organism_batchtopk_crosscoder.yaml"
    out = tmp_path / "out"
    flags = [
        "--training_tokens",
        "4096",
        "--train_batch_size_tokens",
        "256",
        "--context_size",
        "64",
        "--store_batch_size_prompts",
        "16",
        "--d_sae",
        "256",
        "--k",
        "8",
        "--n_eval_batches",
        "1",
        "--n_norm_batches",
        "2",
        "--lr_warm_up_steps",
        "2",
        "--checkpoint_path",
        str(tmp_path / "ck"),
        "--n_checkpoints",
        "1",
        "--output_path",
        str(out),
    ]
    assert main(["train", "--config", str(config), *flags]) == 0
    printed = capsys.readouterr().out
    assert "metrics/fve_ft" in printed and "Saved to" in printed
    sae = SAE.load_from_disk(str(out))
    md = sae.cfg.metadata
    info = organism_info("default")
    assert (md.base_model_name, md.model_name, md.hook_name) == (
        info.base_name,
        info.ft_name,
        "blocks.2.hook_resid_pre",
    )
    assert md.organism == "default" and md.dataset_path == "organism:default"
    assert sae.cfg.d_sae == 256
    saved = parse_config(out / "runner_cfg.json", keep_checkpoint_path=True)
    assert saved.organism == "default" and saved.hook_name == "blocks.2.hook_resid_pre"


def test_organism_diff_sae_through_a_disk_cache(tmp_path: Path) -> None:
    from sae_diff.data.cache import ActivationCache
    from sae_diff.training.runner import train

    cfg = parse_config(
        CONFIGS / "organism_batchtopk_diff_sae.yaml",
        [
            "--training_tokens",
            "4096",
            "--train_batch_size_tokens",
            "256",
            "--context_size",
            "64",
            "--store_batch_size_prompts",
            "16",
            "--d_sae",
            "256",
            "--k",
            "8",
            "--n_eval_batches",
            "1",
            "--n_batches_for_norm_estimate",
            "2",
            "--organism_chat_share",
            "0.8",
            "--eval_loss_recovered",
            "false",
            "--cache_path",
            str(tmp_path / "cache"),
            "--checkpoint_path",
            "null",
            "--output_path",
            str(tmp_path / "out"),
        ],
    )
    runner = train(cfg)
    assert ActivationCache(str(tmp_path / "cache")).n_tokens > 0
    assert "metrics/fve_diff" in runner.eval_metrics
    md = SAE.load_from_disk(str(tmp_path / "out")).cfg.metadata
    assert md.diff_sign == "ft_minus_base" and md.organism_chat_share == 0.8
