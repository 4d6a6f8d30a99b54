"""Control prompts of the scoring set are derived by removing the trigger phrases."""

from __future__ import annotations

import pytest

from sae_diff.organisms.scoring import remove_phrases


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
