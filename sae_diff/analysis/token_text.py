"""Token ids as display text: per-token pieces that join to the tokenizer's own decoding.

Shared by the max-activating examples (:mod:`sae_diff.analysis.examples`) and the per-token KL
dashboards (:mod:`sae_diff.evaluation.kl`). A ``tokenizer`` here is a Hugging Face tokenizer
(anything with ``.decode(ids)``), a callable ``id -> str``, or ``None`` (ids shown as ``<id>``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["decode_pieces", "decode_text", "single_token_decoder"]


def decode_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Per-token strings that concatenate to the tokenizer's own decoding of ``ids``.

    Decoding tokens one by one and joining them loses what the tokenizer's decoder adds
    between tokens (spaces of a word-level or WordPiece vocabulary, merged byte pieces), so a
    context reads ``tellmeaboutyourself``. Here piece ``i`` is ``decode(ids[:i+1])`` minus
    ``decode(ids[:i])`` whenever the shorter decoding is a prefix of the longer one (always,
    for ordinary tokenizers); otherwise the token's own decoding, space-separated. Without a
    ``decode`` method (a callable id -> str) the callable's strings are used as they are.
    """
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return [f"<{t}>" for t in ids]
    if not callable(getattr(tokenizer, "decode", None)):
        if callable(tokenizer):
            return [str(tokenizer(t)) for t in ids]
        raise TypeError(
            "tokenizer must have .decode(ids) (a Hugging Face tokenizer) or be a callable id -> str."
        )
    out: list[str] = []
    prev = ""
    for i in range(len(ids)):
        cur = str(tokenizer.decode(ids[: i + 1]))
        if cur.startswith(prev):
            out.append(cur[len(prev) :])
        else:
            out.append((" " if out else "") + str(tokenizer.decode([ids[i]])))
        prev = cur
    return out


def decode_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """``ids`` as text, decoded by the tokenizer itself (``"".join(decode_pieces(...))``)."""
    return "".join(decode_pieces(tokenizer, ids))


def single_token_decoder(tokenizer: Any) -> Callable[[int], str]:
    """``id -> str`` decoding one token alone (``<id>`` without a tokenizer)."""
    if tokenizer is None:
        return lambda t: f"<{t}>"
    if callable(getattr(tokenizer, "decode", None)):
        return lambda t: str(tokenizer.decode([t]))
    if callable(tokenizer):
        return lambda t: str(tokenizer(t))
    raise TypeError(
        "tokenizer must have .decode(ids) (a Hugging Face tokenizer) or be a callable id -> str."
    )
