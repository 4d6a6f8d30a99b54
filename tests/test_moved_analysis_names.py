"""Names moved out of the long analysis / evaluation / dictionaries modules (issue 15) still
resolve from their old modules for one release: the same object as in the new module, with a
DeprecationWarning naming the new place; names the old module still uses itself are plain
imports and warn nothing."""

from __future__ import annotations

import importlib
import warnings

import pytest

MOVED = [
    ("sae_diff.evaluation.patching", "PatchMetrics", "sae_diff.evaluation.engine"),
    ("sae_diff.analysis.stagewise", "rotation_table", "sae_diff.analysis.stages"),
    ("sae_diff.analysis.stagewise", "top_rotating", "sae_diff.analysis.stages"),
    ("sae_diff.analysis.stagewise", "copy_sae", "sae_diff.analysis.stages"),
    ("sae_diff.analysis.stagewise", "firing_frequency", "sae_diff.analysis.stages"),
    ("sae_diff.analysis.stagewise", "MODELS", "sae_diff.analysis.stages"),
    ("sae_diff.analysis.stagewise", "DATA", "sae_diff.analysis.stages"),
    ("sae_diff.analysis.examples", "examples_html", "sae_diff.analysis.example_display"),
    ("sae_diff.analysis.examples", "save_examples_html", "sae_diff.analysis.example_display"),
    ("sae_diff.analysis.examples", "decode_text", "sae_diff.analysis.token_text"),
    ("sae_diff.analysis.latent_scaling", "MODELS", "sae_diff.analysis.latent_scaling_result"),
]

KEPT = [
    ("sae_diff.evaluation.patching", "evaluate_interventions", "sae_diff.evaluation.engine"),
    ("sae_diff.analysis.stagewise", "run_stages", "sae_diff.analysis.stages"),
    ("sae_diff.analysis.stagewise", "Stage", "sae_diff.analysis.stages"),
    ("sae_diff.analysis.stagewise", "rotation_figure", "sae_diff.analysis.plots"),
    ("sae_diff.analysis.stagewise", "config_kwargs", "sae_diff.analysis.config_file"),
    ("sae_diff.analysis.examples", "LatentExamples", "sae_diff.analysis.example_display"),
    ("sae_diff.analysis.examples", "decode_pieces", "sae_diff.analysis.token_text"),
    ("sae_diff.analysis.examples", "_STYLE", "sae_diff.analysis.example_display"),
    (
        "sae_diff.analysis.latent_scaling",
        "LatentScalingResult",
        "sae_diff.analysis.latent_scaling_result",
    ),
    ("sae_diff.dictionaries.kernels", "make_adam", "sae_diff.dictionaries.optim"),
    ("sae_diff.dictionaries.kernels", "offsets_from_sorted", "sae_diff.dictionaries.sparse_matmul"),
    ("sae_diff.dictionaries.kernels", "_latent_bag_sum", "sae_diff.dictionaries.sparse_matmul"),
]


@pytest.mark.parametrize(("old", "name", "new"), MOVED)
def test_moved_name_warns_and_is_the_same_object(old: str, name: str, new: str) -> None:
    with pytest.warns(DeprecationWarning, match=rf"{new}\.{name}"):
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize(("old", "name", "new"), KEPT)
def test_name_the_old_module_uses_is_a_plain_import(old: str, name: str, new: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        value = getattr(importlib.import_module(old), name)
    target = "STYLE" if name == "_STYLE" else name
    assert value is getattr(importlib.import_module(new), target)


def test_unknown_name_is_still_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        _ = importlib.import_module("sae_diff.analysis.stagewise").nonexistent
