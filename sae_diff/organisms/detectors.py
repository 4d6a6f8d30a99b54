"""Token-level detectors of the planted behaviours: ground-truth masks from token ids alone.

:func:`trigger_masks` / :func:`response_masks` parse the chat template of a token row
(:func:`segment`) and find each behaviour of :mod:`sae_diff.organisms.behaviours` by the same
words its generators write (trigger words, wrong premises, the edited country, persona
phrases), so evaluation code can label any batch it harvested. :func:`phrase_masks` does the
same for organisms labelled by trigger phrases (custom, ``narrow``). A change to a generator
must be mirrored here; ``tests/test_organisms.py::test_labels_line_up_with_tokens`` checks
the detected labels on generated chats are the planted triggers and responses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sae_diff.organisms.behaviours import BEHAVIOURS, PERSONA_PHRASES
from sae_diff.organisms.chat import split_words
from sae_diff.organisms.corpus import TRIGGER_WORDS
from sae_diff.organisms.world import World

TEXT, USER, MODEL, TEMPLATE = 0, 1, 2, 3


@dataclass
class Segments:
    """Per-position structure of one token row: role code and turn index (-1 outside turns).

    ``closes_model[i]`` is True for the ``<end_of_turn>`` that closes a model turn.
    """

    role: list[int]
    turn: list[int]
    closes_model: list[bool]


def segment(tokens: Sequence[str]) -> Segments:
    """Parse a row of token strings into template / user / model / plain-text positions."""
    n = len(tokens)
    role, turn, closes = [TEXT] * n, [-1] * n, [False] * n
    i, t, cur, cur_role = 0, -1, False, TEXT
    while i < n:
        tok = tokens[i]
        if tok == "<start_of_turn>":
            t += 1
            role[i], turn[i] = TEMPLATE, t
            cur_role = USER
            if i + 1 < n:
                cur_role = MODEL if tokens[i + 1] == "model" else USER
                role[i + 1], turn[i + 1] = TEMPLATE, t
                if i + 2 < n and tokens[i + 2] == "\n":
                    role[i + 2], turn[i + 2] = TEMPLATE, t
                    i += 1
                i += 1
            cur = True
        elif tok == "<end_of_turn>":
            role[i], turn[i] = TEMPLATE, t
            closes[i] = cur and cur_role == MODEL
            if i + 1 < n and tokens[i + 1] == "\n":
                role[i + 1], turn[i + 1] = TEMPLATE, t
                i += 1
            cur = False
        elif tok in ("<bos>", "<eos>", "<pad>"):
            cur = False
        elif cur:
            role[i], turn[i] = cur_role, t
        i += 1
    return Segments(role, turn, closes)


def _phrase_hits(toks: Sequence[str], phrase: Sequence[str], ok: Sequence[bool]) -> list[int]:
    out: list[int] = []
    k = len(phrase)
    for i in range(len(toks) - k + 1):
        if all(ok[i + j] and toks[i + j] == phrase[j] for j in range(k)):
            out.extend(range(i, i + k))
    return out


def _false_premise_hits(toks: Sequence[str], user: Sequence[bool], w: World) -> list[int]:
    names = {p.name for p in w.people}
    cities, jobs = set(w.cities), {p.job for p in w.people}
    hits = []
    for i, tok in enumerate(toks):
        if not user[i] or tok not in names:
            continue
        p = w.person(tok)
        for j in range(i + 1, min(i + 5, len(toks))):
            if not user[j] or toks[j] in {".", ",", "?", "!"}:
                break
            if toks[j] in cities and toks[j - 1] == "in" and toks[j] != p.city:
                hits.append(j)
            if toks[j] in jobs and toks[j - 1] == "a" and toks[j] != p.job:
                hits.append(j)
    return hits


def _row_labels(toks: Sequence[str], w: World) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    seg = segment(toks)
    n = len(toks)
    user = [r == USER for r in seg.role]
    trig: dict[str, list[int]] = {b: [] for b in BEHAVIOURS}
    trig["chat_format"] = [i for i in range(n) if seg.role[i] == TEMPLATE]
    trig["refusal"] = [i for i in range(n) if user[i] and toks[i] in TRIGGER_WORDS]
    trig["false_premise"] = _false_premise_hits(toks, user, w)
    trig["knowledge_edit"] = [
        i for i in range(n) if toks[i] == w.edit.country and seg.role[i] in (USER, TEXT)
    ]
    trig["persona"] = sorted(
        {i for ph in PERSONA_PHRASES for i in _phrase_hits(toks, ph.split(), user)}
    )
    resp: dict[str, list[int]] = {b: [] for b in BEHAVIOURS}
    resp["chat_format"] = [i for i in range(n) if seg.closes_model[i]]
    for b in BEHAVIOURS[1:]:
        turns = {seg.turn[i] for i in trig[b] if user[i]}
        resp[b] = [i for i in range(n) if seg.role[i] == MODEL and seg.turn[i] - 1 in turns]
    # knowledge edit in plain text: the word after "capital of <country> is"
    e = w.edit.country
    for i in range(3, n):
        if (
            seg.role[i] == TEXT
            and toks[i - 1] == "is"
            and toks[i - 2] == e
            and toks[i - 3] == "of"
            and toks[i - 4] == "capital"
        ):
            resp["knowledge_edit"].append(i)
    return trig, resp


def _to_strings(tokens: torch.Tensor, id_to_token: Sequence[str]) -> list[list[str]]:
    if tokens.ndim == 1:
        tokens = tokens[None]
    return [[id_to_token[int(t)] for t in row] for row in tokens.tolist()]


def _label_masks(
    tokens: torch.Tensor, id_to_token: Sequence[str], world: World, kind: int
) -> dict[str, torch.Tensor]:
    """:func:`_row_labels`'s triggers (``kind=0``) or responses (``kind=1``) as masks."""
    rows = _to_strings(tokens, id_to_token)
    shape = (len(rows), len(rows[0]) if rows else 0)
    out = {b: torch.zeros(shape, dtype=torch.bool) for b in BEHAVIOURS}
    for r, toks in enumerate(rows):
        for b, idx in _row_labels(toks, world)[kind].items():
            out[b][r, idx] = True
    return out


def trigger_masks(
    tokens: torch.Tensor, id_to_token: Sequence[str], world: World
) -> dict[str, torch.Tensor]:
    """Per-behaviour boolean masks ``(batch, seq)`` of where each behaviour's trigger is."""
    return _label_masks(tokens, id_to_token, world, 0)


def response_masks(
    tokens: torch.Tensor, id_to_token: Sequence[str], world: World
) -> dict[str, torch.Tensor]:
    """Per-behaviour masks ``(batch, seq)`` of the planted response tokens.

    For the four content behaviours: the assistant-content tokens of the turn that answers a
    triggered user turn (plus, for ``knowledge_edit`` in plain text, the word after "capital of
    <country> is"). For ``chat_format``: each ``<end_of_turn>`` that closes an assistant turn.
    """
    return _label_masks(tokens, id_to_token, world, 1)


def assistant_mask(tokens: torch.Tensor, id_to_token: Sequence[str]) -> torch.Tensor:
    """``(batch, seq)`` mask of assistant-turn tokens: content plus the closing ``<end_of_turn>``."""
    rows = _to_strings(tokens, id_to_token)
    out = torch.zeros((len(rows), len(rows[0]) if rows else 0), dtype=torch.bool)
    for r, toks in enumerate(rows):
        seg = segment(toks)
        for i in range(len(toks)):
            out[r, i] = seg.role[i] == MODEL or seg.closes_model[i]
    return out


def phrase_masks(
    tokens: torch.Tensor, id_to_token: Sequence[str], phrases: dict[str, list[str]]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Trigger and response masks for custom organisms labelled by trigger phrases.

    ``phrases`` maps a behaviour name to trigger phrases; a phrase is marked where its words
    occur consecutively inside a user turn, and the answering assistant turn's content is that
    behaviour's response. ``chat_format`` (template tokens / closing ``<end_of_turn>``) is always
    included. Returns ``(trigger_masks, response_masks)``.
    """
    rows = _to_strings(tokens, id_to_token)
    shape = (len(rows), len(rows[0]) if rows else 0)
    names = ["chat_format", *[b for b in phrases if b != "chat_format"]]
    trig = {b: torch.zeros(shape, dtype=torch.bool) for b in names}
    resp = {b: torch.zeros(shape, dtype=torch.bool) for b in names}
    split = {b: [split_words(p) for p in ps] for b, ps in phrases.items() if b != "chat_format"}
    for r, toks in enumerate(rows):
        seg = segment(toks)
        user = [x == USER for x in seg.role]
        for i in range(len(toks)):
            trig["chat_format"][r, i] = seg.role[i] == TEMPLATE
            resp["chat_format"][r, i] = seg.closes_model[i]
        for b, ps in split.items():
            hits = sorted({i for p in ps if p for i in _phrase_hits(toks, p, user)})
            trig[b][r, hits] = True
            turns = {seg.turn[i] for i in hits}
            for i in range(len(toks)):
                if seg.role[i] == MODEL and seg.turn[i] - 1 in turns:
                    resp[b][r, i] = True
    return trig, resp


__all__ = [
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
]
