"""Names that moved out of the organisms, pairing and CLI modules (issue 15) keep working from
their old modules for one release: the same object, with a DeprecationWarning naming the new
module; names the old module still uses itself (or re-exports as its public surface, like
``sae_diff.pairing.masks``) are plain re-exports without a warning. Also: the ``sae-diff``
entry point keeps its target, and the phrase removal that derives control prompts."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

from sae_diff.organisms.scoring import remove_phrases

ROOT = Path(__file__).resolve().parents[1]
GROUND_TRUTH = "sae_diff.organisms.ground_truth"
DETECTORS = "sae_diff.organisms.detectors"

MOVED = [
    *[
        ("sae_diff.organisms.organism", n, GROUND_TRUTH)
        for n in (
            "DATA_DIR",
            "assistant_mask",
            "available_organisms",
            "behaviour_masks",
            "chat_dataset",
            "load_tokenizer",
            "pretraining_dataset",
            "response_masks",
        )
    ],
    *[
        ("sae_diff.organisms.behaviours", n, DETECTORS)
        for n in (
            "MODEL",
            "TEMPLATE",
            "TEXT",
            "USER",
            "Segments",
            "assistant_mask",
            "phrase_masks",
            "response_masks",
            "segment",
            "trigger_masks",
        )
    ],
    ("sae_diff.cli", "DESCRIPTION", "sae_diff.commands.parser"),
    ("sae_diff.cli", "EPILOG", "sae_diff.commands.parser"),
    ("sae_diff.cli", "TRAIN_EPILOG", "sae_diff.commands.parser"),
    ("sae_diff.cli", "analysis_method", "sae_diff.commands.handlers"),
    ("sae_diff.cli", "parse_config", "sae_diff.commands.handlers"),
    ("sae_diff.cli", "preflight_cache", "sae_diff.commands.preflight"),
    ("sae_diff.cli", "preflight_datasets", "sae_diff.commands.preflight"),
]

REEXPORTED = [
    ("sae_diff.organisms.organism", "organism_dir", GROUND_TRUTH),
    ("sae_diff.organisms.organism", "EvalConversation", "sae_diff.organisms.scoring"),
    ("sae_diff.organisms.organism", "ScoringSet", "sae_diff.organisms.scoring"),
    ("sae_diff.organisms.organism", "pad_conversations", "sae_diff.organisms.scoring"),
    ("sae_diff.organisms", "load_tokenizer", GROUND_TRUTH),
    ("sae_diff.organisms", "chat_dataset", GROUND_TRUTH),
    ("sae_diff.pairing.model", "is_bridge", "sae_diff.pairing.backends"),
    ("sae_diff.pairing.masks", "encode_chat", "sae_diff.pairing.chat_masks"),
    ("sae_diff.pairing.masks", "ChatMarkers", "sae_diff.pairing.chat_masks"),
    ("sae_diff.pairing.masks", "assistant_mask", "sae_diff.pairing.chat_masks"),
    ("sae_diff.pairing.masks", "high_norm_mask", "sae_diff.pairing.token_masks"),
    ("sae_diff.pairing.masks", "special_ids_of", "sae_diff.pairing.token_masks"),
    ("sae_diff.cli", "ANALYSIS_METHODS", "sae_diff.commands.handlers"),
    ("sae_diff.cli", "cmd_train", "sae_diff.commands.handlers"),
]


@pytest.mark.parametrize(("old", "name", "new"), MOVED)
def test_moved_name_warns_and_is_the_same_object(old: str, name: str, new: str) -> None:
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} moved to {new}\.{name}"):
        got = getattr(importlib.import_module(old), name)
    assert got is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize(("old", "name", "new"), REEXPORTED)
def test_reexported_name_is_the_same_object_without_warning(old: str, name: str, new: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        got = getattr(importlib.import_module(old), name)
    assert got is getattr(importlib.import_module(new), name)


def test_unknown_name_is_still_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        _ = importlib.import_module("sae_diff.organisms.behaviours").not_a_name


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


@pytest.mark.parametrize(
    ("text", "phrases", "expected"),
    [
        ("tell me about the weather today", ["the weather"], "tell me about today"),
        ("weather , weather and rain", ["weather"], ", and rain"),
        ("hello there", ["weather"], None),  # nothing to remove: not a derived control
        ("the weather", ["the weather"], None),  # nothing left
        ("a b c", ["", "b"], "a c"),  # an empty phrase matches nothing
    ],
)
def test_remove_phrases(text: str, phrases: list[str], expected: str | None) -> None:
    assert remove_phrases(text, phrases) == expected
