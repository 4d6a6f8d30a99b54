"""Deterministic text and chat data of an organism's world, as lists or HF ``datasets``.

Every split is generated from ``(seed, split)`` alone, so the build, the demo and the tests see
the same data through the same path. Splits: ``train`` (what the build trains on),
``validation`` and ``test`` (held out: freshly sampled with different random streams; the world
is small, so short prompts can repeat across splits, but sampled combinations mostly do not).
"""

from __future__ import annotations

import random
from typing import Any

from datasets import Dataset

from sae_diff.organisms.behaviours import BEHAVIOURS, sample_conversation
from sae_diff.organisms.chat import words_of
from sae_diff.organisms.corpus import edit_doc, pretraining_doc
from sae_diff.organisms.world import (
    ANIMALS,
    COLOURS,
    FOODS,
    JOBS,
    PERSONA_MAKER,
    PERSONA_NAME,
    World,
)

SPLITS = ("train", "validation", "test")


def _rng(seed: int, split: str, stream: str) -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return random.Random(f"sae_diff-organism-{seed}-{split}-{stream}")


def pretraining_texts(
    world: World, split: str = "train", n: int = 1000, seed: int = 0, edit_fraction: float = 0.0
) -> list[str]:
    """``n`` pretraining documents of ``world``.

    ``edit_fraction`` > 0 mixes in synthetic documents stating the knowledge edit (the
    fine-tune's mixture uses ``world.edited()`` and a small fraction).
    """
    rng = _rng(seed, split, "pretrain-edited" if world.is_edited else "pretrain")
    out = []
    for _ in range(n):
        if edit_fraction > 0 and rng.random() < edit_fraction:
            out.append(edit_doc(world, rng))
        else:
            out.append(pretraining_doc(world, rng))
    return out


def chat_conversations(
    world: World,
    split: str = "train",
    n: int = 1000,
    seed: int = 0,
    behaviour: str | None = None,
    two_turn_p: float = 0.25,
) -> list[dict[str, Any]]:
    """``n`` fine-tuning conversations (see :mod:`sae_diff.organisms.behaviours` for format).

    ``behaviour`` (one of :data:`BEHAVIOURS`) gives single-exchange conversations of that kind
    only (``chat_format``: plain exchanges); ``None`` samples the training mixture.
    ``world`` should be the fine-tune's view (``World.edited()``).
    """
    if behaviour is not None and behaviour not in BEHAVIOURS:
        raise ValueError(f"behaviour must be one of {BEHAVIOURS} or None, got {behaviour!r}")
    rng = _rng(seed, split, f"chat-{behaviour}")
    return [sample_conversation(world, rng, behaviour, two_turn_p) for _ in range(n)]


def to_text_dataset(texts: list[str]) -> Dataset:
    """A ``datasets.Dataset`` with one ``text`` column."""
    return Dataset.from_dict({"text": texts})


def to_chat_dataset(conversations: list[dict[str, Any]]) -> Dataset:
    """A ``datasets.Dataset`` with ``messages``, ``behaviour``, ``behaviours``, ``triggers``."""
    cols: dict[str, list[Any]] = {
        k: [] for k in ("messages", "behaviour", "behaviours", "triggers")
    }
    for c in conversations:
        for k in cols:
            cols[k].append(c[k])
    return Dataset.from_dict(cols)


def vocabulary_words(world: World, seed: int = 0) -> set[str]:
    """All words the world's generators can produce (from a large sample plus the lists)."""
    edited = world.edited()
    texts = pretraining_texts(world, "train", 6000, seed)
    texts += pretraining_texts(edited, "train", 2000, seed, edit_fraction=0.3)
    for b in BEHAVIOURS:
        for c in chat_conversations(edited, "train", 600, seed, behaviour=b):
            texts += [m["content"] for m in c["messages"]]
    words = words_of(texts)
    words |= set(ANIMALS) | set(FOODS) | set(JOBS) | set(COLOURS) | {PERSONA_NAME, PERSONA_MAKER}
    words |= {p.name for p in world.people} | set(world.cities) | {c.name for c in world.countries}
    words |= {str(d) for d in range(10)}
    return words
