"""Held-out rows for scoring a diffing method against an organism's planted ground truth.

:class:`EvalConversation` is one held-out row with its token-level labels, :class:`ScoringSet`
a padded batch of them with controls and per-behaviour labels (built by
:meth:`sae_diff.organisms.organism.Organism.scoring_set`). :func:`remove_phrases` makes a
derived control prompt (a triggered prompt without its trigger phrases). No models here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sae_diff.organisms.chat import encode_conversation, split_words
from sae_diff.organisms.ground_truth import GroundTruth

CONTROL = "none"  # the ``behaviour`` of control rows (the name plain exchanges carry everywhere)


@dataclass
class EvalConversation:
    """A held-out conversation with its token-level ground truth (all tensors are 1-D)."""

    messages: list[dict[str, str]]
    behaviour: str
    tokens: torch.Tensor
    assistant_mask: torch.Tensor
    trigger_mask: torch.Tensor
    response_mask: torch.Tensor
    trigger_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Where the row comes from: ``"held_out"`` (a held-out conversation of ``behaviour``),
    #: ``"control"`` (a held-out conversation with no planted behaviour), ``"derived_control"``
    #: (a held-out triggered prompt with its trigger phrases removed, answered by the base; see
    #: :meth:`Organism.scoring_set`) or ``"text"`` (a held-out plain pretraining document).
    origin: str = "held_out"


@dataclass
class ScoringSet:
    """Held-out rows for scoring a diffing method against ground truth, controls included.

    Every tensor has one row per entry of ``conversations`` (right-padded, see
    :func:`pad_conversations`). ``labels[b][i]`` says whether behaviour ``b`` is triggered in
    row ``i``; it is computed from the token-level trigger masks (``trigger_masks[b][i].any()``),
    the same detector that labels any harvested batch, so labels and masks never disagree.

    Attributes:
        conversations: the rows, with their per-row masks and ``origin``.
        tokens: ``(n, seq)`` ids, padded with the tokenizer's pad id.
        valid: ``(n, seq)`` real (non-pad) tokens.
        assistant: ``(n, seq)`` assistant-turn tokens (content + closing ``<end_of_turn>``).
        behaviours: the behaviours that have controls here, i.e. the organism's behaviours
            except ``chat_format`` (every chat contains the template; it has negatives only in
            plain-text rows, ``n_text > 0``).
        labels: ``{behaviour: (n,) bool}`` for every organism behaviour (``chat_format`` too).
        trigger_masks: ``{behaviour: (n, seq) bool}`` trigger tokens (False on padding).
        response_masks: ``{behaviour: (n, seq) bool}`` planted-response tokens.
        is_control: ``(n,) bool``: no behaviour of ``behaviours`` is triggered in the row.
    """

    conversations: list[EvalConversation]
    tokens: torch.Tensor
    valid: torch.Tensor
    assistant: torch.Tensor
    behaviours: tuple[str, ...]
    labels: dict[str, torch.Tensor]
    trigger_masks: dict[str, torch.Tensor]
    response_masks: dict[str, torch.Tensor]
    is_control: torch.Tensor

    def __len__(self) -> int:
        return len(self.conversations)

    @property
    def origins(self) -> list[str]:
        """``conversations[i].origin`` for every row."""
        return [c.origin for c in self.conversations]


def pad_conversations(
    convs: Sequence[EvalConversation], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad conversations into one batch: ``(tokens, valid, assistant)``, each ``(n, seq)``
    (``valid`` marks real tokens, ``assistant`` the assistant-turn tokens)."""
    if not convs:
        raise ValueError("No conversations to pad.")
    length = max(len(c.tokens) for c in convs)
    tokens = torch.full((len(convs), length), pad_id, dtype=torch.long)
    valid = torch.zeros(len(convs), length, dtype=torch.bool)
    assistant = torch.zeros_like(valid)
    for i, c in enumerate(convs):
        n = len(c.tokens)
        tokens[i, :n] = c.tokens
        valid[i, :n] = True
        assistant[i, :n] = c.assistant_mask.bool()
    return tokens, valid, assistant


def conversation_row(
    conv: dict[str, Any], behaviour: str, truth: GroundTruth, origin: str = "held_out"
) -> EvalConversation:
    """One conversation (the organisms' dict format) tokenized with its ground-truth masks;
    ``trigger_mask`` / ``response_mask`` are ``behaviour``'s (all False for a control)."""
    enc = encode_conversation(truth.tokenizer, conv)
    toks = enc["input_ids"][None]
    trig = truth.trigger_masks(toks)
    resp = truth.response_masks(toks)
    zeros = torch.zeros_like(enc["assistant_mask"])
    return EvalConversation(
        messages=conv["messages"],
        behaviour=behaviour,
        tokens=enc["input_ids"],
        assistant_mask=enc["assistant_mask"],
        trigger_mask=trig[behaviour][0] if behaviour in trig else zeros,
        response_mask=resp[behaviour][0] if behaviour in resp else zeros,
        trigger_masks={b: m[0] for b, m in trig.items()},
        origin=origin,
    )


def text_row(ids: torch.Tensor, truth: GroundTruth) -> EvalConversation:
    """A plain-text row (1-D ``ids``): a control with no assistant turn (origin ``"text"``);
    its ``trigger_masks`` still mark triggers the text contains (e.g. an edited country)."""
    trig = truth.trigger_masks(ids[None])
    zeros = torch.zeros(len(ids), dtype=torch.bool)
    return EvalConversation(
        messages=[],
        behaviour=CONTROL,
        tokens=ids,
        assistant_mask=zeros,
        trigger_mask=zeros,
        response_mask=zeros,
        trigger_masks={b: m[0] for b, m in trig.items()},
        origin="text",
    )


def remove_phrases(text: str, phrases: Sequence[str]) -> str | None:
    """``text`` with every occurrence of each phrase removed (word-aligned, words re-joined
    by single spaces); None when no phrase occurs or nothing is left."""
    words = split_words(text)
    keep = [True] * len(words)
    for ph in (p for p in map(split_words, phrases) if p):
        for i in range(len(words) - len(ph) + 1):
            if words[i : i + len(ph)] == ph:
                keep[i : i + len(ph)] = [False] * len(ph)
    prompt = " ".join(w for w, k in zip(words, keep) if k)
    if not prompt or all(keep):
        return None
    return prompt


__all__ = [
    "CONTROL",
    "EvalConversation",
    "ScoringSet",
    "conversation_row",
    "pad_conversations",
    "remove_phrases",
    "text_row",
]
