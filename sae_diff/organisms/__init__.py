"""Bundled model organisms: a tiny base model and its chat fine-tune with planted, labelled
differences (the "diffing game": score diffing methods against known modifications).

Quick start::

    from sae_diff.organisms import load_organism
    org = load_organism()                 # offline, seconds; verifies sha256 of every file
    org.base, org.ft, org.tokenizer       # HookedTransformers + shared HF fast tokenizer
    pm = org.paired()                     # sae_diff.pairing.model.PairedModel
    masks = org.behaviour_masks(tokens)   # {behaviour: BoolTensor (batch, seq)}
    s = org.scoring_set(16)               # held-out triggered rows + controls, labels, masks
    narrow = load_organism("narrow")      # one planted trigger -> response on a chat model

See docs/organisms.md.
"""

from typing import Any

from sae_diff.organisms.behaviours import BEHAVIOURS, REFUSAL, TRIGGER_WORDS, persona_reply
from sae_diff.organisms.ground_truth import (
    assistant_mask,
    available_organisms,
    behaviour_masks,
    chat_dataset,
    load_tokenizer,
    pretraining_dataset,
    response_masks,
)
from sae_diff.organisms.organism import Organism, load_organism
from sae_diff.organisms.scoring import EvalConversation, ScoringSet, pad_conversations
from sae_diff.organisms.storage import OrganismIntegrityError
from sae_diff.organisms.world import World, make_world

_LAZY = {
    "BuildConfig": "sae_diff.organisms.build",
    "build_organism": "sae_diff.organisms.build",
    "tiny_config": "sae_diff.organisms.build",
    "build_custom_organism": "sae_diff.organisms.custom",
    "read_examples": "sae_diff.organisms.custom",
    "NarrowConfig": "sae_diff.organisms.narrow",
    "build_narrow_organism": "sae_diff.organisms.narrow",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `python -m sae_diff.organisms.build` does not import the module twice.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sae_diff.organisms' has no attribute {name!r}")


__all__ = [
    "BEHAVIOURS",
    "REFUSAL",
    "TRIGGER_WORDS",
    "BuildConfig",
    "NarrowConfig",
    "EvalConversation",
    "Organism",
    "OrganismIntegrityError",
    "ScoringSet",
    "World",
    "assistant_mask",
    "available_organisms",
    "behaviour_masks",
    "build_custom_organism",
    "build_narrow_organism",
    "build_organism",
    "chat_dataset",
    "load_organism",
    "load_tokenizer",
    "pad_conversations",
    "make_world",
    "persona_reply",
    "pretraining_dataset",
    "read_examples",
    "response_masks",
    "tiny_config",
]
