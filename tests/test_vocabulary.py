"""One vocabulary: the architecture table is what SAELens, the config, the Hub and the report see;
moved names still resolve, with a DeprecationWarning."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from sae_lens import registry as sl_registry

import sae_diff  # noqa: F401  (registers the architectures)
from sae_diff.dictionaries import registry, specs


def test_every_row_is_what_saelens_resolves() -> None:
    for row in specs.ARCHITECTURES:
        assert sl_registry.SAE_TRAINING_CLASS_REGISTRY[row.training] == row.training_classes(), (
            row.training
        )
        assert sl_registry.SAE_CLASS_REGISTRY[row.inference] == row.inference_classes(), (
            row.inference
        )
        _, cfg_cls = row.training_classes()
        assert cfg_cls.architecture() == row.training
        assert (
            cfg_cls(d_in=4, d_sae=256).get_inference_config_class().architecture() == row.inference
        )


def test_registration_covers_exactly_the_table() -> None:
    ours = [r for r in specs.ARCHITECTURES if r.registered_by == "sae_diff"]
    assert set(registry.TRAINING_ARCHITECTURES) == {r.training for r in ours}
    assert set(registry.INFERENCE_ARCHITECTURES) == {r.inference for r in ours}


def test_consumers_derive_from_the_table() -> None:
    from sae_diff.hub import PAIR_ARCHITECTURES
    from sae_diff.report.demo import METHODS
    from sae_diff.training import config

    assert config.CROSSCODER_ARCHITECTURES == {
        r.training for r in specs.ARCHITECTURES if r.kind == "crosscoder"
    }
    assert config.DIFF_ARCHITECTURES == {"batchtopk_diff_sae"}
    for row in specs.ARCHITECTURES:
        assert config.default_store_mode(row.training) == row.store_mode
    assert config.default_store_mode("standard") == "ft"  # any other SAELens SAE: a chat-SAE
    assert PAIR_ARCHITECTURES == {
        r.inference for r in specs.ARCHITECTURES if r.kind in ("crosscoder", "diff_sae")
    }
    for method in METHODS.values():
        row = specs.spec(method["architecture"])
        assert row is not None and (method["kind"], method["mode"]) == (row.kind, row.store_mode)


def test_literals_are_defined_once() -> None:
    from sae_diff.data import store
    from sae_diff.dictionaries import base
    from sae_diff.dictionaries.kinds import KINDS

    assert specs.STORE_MODES == ("paired", "diff", "base", "ft")
    from typing import get_args

    from sae_diff.training.config import StoreModeOrAuto

    assert get_args(StoreModeOrAuto) == ("auto", *specs.STORE_MODES)
    assert specs.DIFF_SIGNS == ("ft_minus_base", "base_minus_ft")
    assert tuple(base.DIFF_SIGNS) == tuple(store.DIFF_SIGNS) == specs.DIFF_SIGNS
    assert tuple(KINDS) == specs.KINDS


@pytest.mark.parametrize(
    "module, name, target",
    [
        ("sae_diff.training.config", "make_plan", "sae_diff.training.plan"),
        ("sae_diff.training.config", "parse_config", "sae_diff.training.flags"),
        ("sae_diff.training.config", "organism_info", "sae_diff.training.model_info"),
        ("sae_diff.training.config", "check_hook_name", "sae_diff.training.plan"),
        (
            "sae_diff.analysis.latent_scaling",
            "latent_scaling_naive",
            "sae_diff.analysis.latent_scaling_reference",
        ),
    ],
)
def test_moved_names_resolve_with_a_deprecation_warning(
    module: str, name: str, target: str
) -> None:
    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=f"{name} moved to {target}"):
        obj = getattr(mod, name)
    assert obj is getattr(importlib.import_module(target), name)
    with pytest.raises(AttributeError):
        mod.no_such_name  # noqa: B018


def test_old_atomic_writer_warns_and_writes(tmp_path: Path) -> None:
    from sae_diff.dictionaries.io import atomic_write_bytes

    with pytest.warns(DeprecationWarning, match="sae_diff.atomic.atomic_write"):
        atomic_write_bytes(tmp_path / "x.txt", lambda p: p.write_text("hi"))
    assert (tmp_path / "x.txt").read_text() == "hi"


def test_a_flag_outside_the_vocabulary_is_a_config_error() -> None:
    """store_mode is typed by the vocabulary, so the flag parser lists its values."""
    from sae_diff.training.config import ConfigError
    from sae_diff.training.flags import parse_config

    cfg_file = Path(__file__).resolve().parents[1] / "configs" / "smoke_test_crosscoder.yaml"
    with pytest.raises(
        ConfigError, match=r"invalid choice: 'bogus'.*'paired', 'diff', 'base', 'ft'"
    ):
        parse_config(cfg_file, ["--store_mode", "bogus"])
    with pytest.raises(ConfigError, match="--lr: invalid float value"):
        parse_config(cfg_file, ["--lr", "abc"])
    assert parse_config(cfg_file, ["--store_mode", "paired"]).store_mode == "paired"
