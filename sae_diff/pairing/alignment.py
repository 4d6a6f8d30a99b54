"""Pair the tokens of two *different* tokenizers on shared text, by character offsets.

A cross-architecture crosscoder (``sae_diff.dictionaries.cross_architecture_crosscoder``) reads
one activation per model *at the same place in the text*. When the models share a tokenizer
that place is a token position; when they do not, token ``i`` of one model and token ``i`` of
the other cover different characters. The setting of Jiralerspong & Bricken (arXiv
2602.11729) pairs them on shared text instead: tokenize the same string with both tokenizers
(``return_offsets_mapping``), and pair the tokens whose character spans *end at the same
offset*. At such a position both causal models have read exactly the same prefix of the text,
so their residual streams there summarise the same information; positions where only one
tokenizer has a boundary are dropped.

:func:`align_text` computes the pairs; :func:`harvest_aligned` runs two TransformerLens models
and gathers their activations at the paired positions, ready for
:func:`~sae_diff.dictionaries.cross_architecture_crosscoder.pad_pair`.

Offsets come from Hugging Face *fast* tokenizers (the Rust ``tokenizers`` backend); slow
(Python) tokenizers cannot return them and are refused with that fix named.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from sae_diff.errors import SaeDiffError
from sae_diff.pairing.backends import LanguageModel


class AlignmentError(SaeDiffError, ValueError):
    """Two tokenizations cannot be aligned (no offsets, or nothing in common)."""


@dataclass(frozen=True)
class AlignedText:
    """One text under two tokenizers and the pairs of tokens ending at the same character.

    ``ids_a`` / ``ids_b``: the token ids (no special tokens); ``pos_a[k]`` / ``pos_b[k]``:
    the k-th pair's token indices into them; ``ends[k]``: the character offset where both
    tokens end (increasing)."""

    text: str
    ids_a: list[int]
    ids_b: list[int]
    pos_a: torch.Tensor
    pos_b: torch.Tensor
    ends: torch.Tensor

    def __len__(self) -> int:
        return int(self.pos_a.numel())


def token_offsets(
    tokenizer: PreTrainedTokenizerBase, text: str, max_length: int | None = None
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (no special tokens) and each token's ``(start, end)`` characters."""
    if not getattr(tokenizer, "is_fast", False):
        raise AlignmentError(
            f"{type(tokenizer).__name__} is a slow tokenizer and cannot return character offsets; load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True) (a tokenizer.json is needed)."
        )
    enc = tokenizer(
        text,
        return_offsets_mapping=True,
        add_special_tokens=False,
        truncation=max_length is not None,
        max_length=max_length,
    )
    return list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]]


def _ends(offsets: list[tuple[int, int]]) -> dict[int, int]:
    """End offset -> index of the *last* non-empty token ending there (byte-level BPE can split
    one character into several tokens sharing its span: the last one has read all of it)."""
    out: dict[int, int] = {}
    for i, (start, end) in enumerate(offsets):
        if end > start:
            out[end] = i
    return out


def align_text(
    text: str,
    tokenizer_a: PreTrainedTokenizerBase,
    tokenizer_b: PreTrainedTokenizerBase,
    max_length: int | None = None,
) -> AlignedText:
    """Tokenize ``text`` with both tokenizers and pair the tokens ending at the same character
    offset (module docstring). ``max_length`` truncates each tokenization (in its own tokens);
    pairs then stop where the shorter one stops."""
    ids_a, off_a = token_offsets(tokenizer_a, text, max_length)
    ids_b, off_b = token_offsets(tokenizer_b, text, max_length)
    ends_a, ends_b = _ends(off_a), _ends(off_b)
    common = sorted(set(ends_a) & set(ends_b))
    return AlignedText(
        text=text,
        ids_a=ids_a,
        ids_b=ids_b,
        pos_a=torch.tensor([ends_a[e] for e in common], dtype=torch.long),
        pos_b=torch.tensor([ends_b[e] for e in common], dtype=torch.long),
        ends=torch.tensor(common, dtype=torch.long),
    )


def _with_bos(
    ids: list[int], tokenizer: PreTrainedTokenizerBase, prepend_bos: bool
) -> tuple[torch.Tensor, int]:
    if not prepend_bos:
        return torch.tensor([ids], dtype=torch.long), 0
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise AlignmentError(
            f"{type(tokenizer).__name__} has no bos_token_id; pass prepend_bos=False."
        )
    return torch.tensor([[int(bos), *ids]], dtype=torch.long), 1


@torch.no_grad()
def harvest_aligned(
    model_a: LanguageModel,
    model_b: LanguageModel,
    tokenizer_a: PreTrainedTokenizerBase,
    tokenizer_b: PreTrainedTokenizerBase,
    texts: Iterable[str],
    hook_a: str,
    hook_b: str,
    *,
    prepend_bos: bool = True,
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations of two TransformerLens models at the character-aligned token pairs of
    ``texts``: ``(N, d_a)`` at ``hook_a`` and ``(N, d_b)`` at ``hook_b``, row k of both at
    the same place in the same text. Each text runs alone (no padding); with ``prepend_bos``
    each tokenizer's BOS is put first (positions shift by one), as the models were trained.
    Feed ``pad_pair(xa, xb)`` to a cross-architecture crosscoder."""
    xa: list[torch.Tensor] = []
    xb: list[torch.Tensor] = []
    n_texts = 0
    for text in texts:
        n_texts += 1
        al = align_text(text, tokenizer_a, tokenizer_b, max_length)
        if len(al) == 0:
            continue
        for model, ids, tok, hook, pos, out in (
            (model_a, al.ids_a, tokenizer_a, hook_a, al.pos_a, xa),
            (model_b, al.ids_b, tokenizer_b, hook_b, al.pos_b, xb),
        ):
            tokens, shift = _with_bos(ids, tok, prepend_bos)
            _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=[hook])
            if hook not in cache:
                raise AlignmentError(
                    f"Hook {hook!r} not found in {type(model).__name__}; check the hook name."
                )
            out.append(cache[hook][0, pos.to(cache[hook].device) + shift].float().cpu())
    if not xa:
        raise AlignmentError(
            f"No character-aligned token pairs in {n_texts} text(s): the two tokenizations "
            "share no token boundary (empty texts?)."
        )
    return torch.cat(xa), torch.cat(xb)


__all__ = ["AlignedText", "AlignmentError", "align_text", "harvest_aligned", "token_offsets"]
