"""The per-property token masks of METHODS.md §6: BOS, special, high-norm, first-n, padding.

Every function returns a ``bool`` tensor of shape ``(batch, seq)``, ``True`` where the token
*has* the property. Whether a property excludes a token from training is decided by
:class:`~sae_diff.pairing.masks.MaskConfig`, not here. Import them from
:mod:`sae_diff.pairing.masks`, the one import point of every mask; this module holds the
masks that need only token ids (or activations), :mod:`~sae_diff.pairing.chat_masks` those that
need the chat template.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase


def check_tokens(tokens: torch.Tensor) -> None:
    """Raise unless ``tokens`` is a ``(batch, seq)`` tensor (every mask's input check)."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError("tokens must be a (batch, seq) tensor of token ids")


def bos_mask(tokens: torch.Tensor, bos_token_id: int | None) -> torch.Tensor:
    """Positions holding the BOS token (False everywhere if the tokenizer has none)."""
    check_tokens(tokens)
    if bos_token_id is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return tokens == bos_token_id


def special_token_mask(
    tokens: torch.Tensor, special_ids: torch.Tensor | list[int] | set[int] | None
) -> torch.Tensor:
    """Positions holding any of ``special_ids`` (BOS/EOS/PAD, chat-template tokens, ...)."""
    check_tokens(tokens)
    if special_ids is None or len(special_ids) == 0:
        return torch.zeros_like(tokens, dtype=torch.bool)
    ids = torch.as_tensor(sorted(set(int(i) for i in special_ids)), device=tokens.device)
    return torch.isin(tokens, ids)


def high_norm_mask(
    acts: torch.Tensor, ratio: float = 10.0, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Tokens whose activation norm exceeds ``ratio`` x the median norm (attention sinks).

    Args:
        acts: ``(batch, seq, d)`` or paired ``(batch, seq, n_models, d)``. For paired input a
            token is high-norm if it is so in *any* model, each against its own median.
        ratio: the threshold multiple ``r`` (default 10).
        valid: optional ``(batch, seq)`` bool; the median is taken over valid tokens only
            (e.g. not padding).

    The median is over the tokens given (callers pass a whole shard or batch).
    """
    if ratio <= 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    if acts.dim() not in (3, 4):
        raise ValueError(
            f"acts must be (batch, seq, d) or (batch, seq, n_models, d), got {tuple(acts.shape)}"
        )
    norms = acts.float().norm(dim=-1)  # (b, s) or (b, s, m)
    if norms.dim() == 2:
        norms = norms.unsqueeze(-1)
    sel = norms if valid is None else norms[valid.to(norms.device)]
    sel = sel.reshape(-1, norms.shape[-1])
    if sel.shape[0] == 0:
        return torch.zeros(norms.shape[:2], dtype=torch.bool, device=acts.device)
    median = sel.median(dim=0).values  # (m,)
    return (norms > ratio * median).any(dim=-1)


def _positions_since_start(starts: torch.Tensor) -> torch.Tensor:
    """For each position, its distance from the most recent ``True`` in ``starts`` (the row
    start counts as a start)."""
    b, s = starts.shape
    idx = torch.arange(s, device=starts.device).expand(b, s)
    marks = torch.where(starts, idx, torch.zeros_like(idx))
    last = marks.cummax(dim=1).values
    return idx - last


def first_n_mask(
    tokens: torch.Tensor, n: int, doc_starts: torch.Tensor | None = None
) -> torch.Tensor:
    """The first ``n`` positions of each row: the attention-sink positions.

    This is what ``MaskConfig.first_n`` / ``mask_first_n`` mean (METHODS.md §6, "optionally
    the first n tokens of each sequence", a sequence being a row the model ran on): position
    ``i < n`` of every row, whatever token it holds, so a model without BOS can drop its row
    start (``n = 1``) on its own. BOS tokens elsewhere in a packed row are the BOS mask's job.

    ``doc_starts`` (``(batch, seq)`` bool, True where a document begins) gives instead the
    first ``n`` tokens of every *document* (a document continued from the previous row is
    not re-masked); the training masks do not use that variant.
    """
    check_tokens(tokens)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if doc_starts is None:
        pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return pos < n
    if doc_starts.shape != tokens.shape:
        raise ValueError("doc_starts must have the shape of tokens")
    dist = _positions_since_start(doc_starts.to(tokens.device).bool())
    # positions before the first start of the row belong to a document continued from the
    # previous row: not "first n" of anything
    started = doc_starts.to(tokens.device).bool().cumsum(dim=1) > 0
    return (dist < n) & started


def padding_mask(
    tokens: torch.Tensor,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Padding positions: ``attention_mask == 0`` when given (preferred: many tokenizers use
    the same id for PAD and EOS/BOS), else ``tokens == pad_token_id``."""
    check_tokens(tokens)
    if attention_mask is not None:
        if attention_mask.shape != tokens.shape:
            raise ValueError("attention_mask must have the shape of tokens")
        return ~attention_mask.to(tokens.device).bool()
    if pad_token_id is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return tokens == pad_token_id


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """``text``'s token ids without the tokenizer's own special tokens (BOS, ...)."""
    out = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(out)


def special_ids_of(
    tokenizer: PreTrainedTokenizerBase | None, extra: list[int] | None = None
) -> list[int]:
    """All special-token ids of a tokenizer (BOS/EOS/PAD/UNK, added specials) plus ``extra``."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or []) if tokenizer is not None else set()
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if v is not None:
            ids.add(int(v))
    ids.update(int(i) for i in (extra or []))
    return sorted(ids)


__all__ = [
    "bos_mask",
    "first_n_mask",
    "high_norm_mask",
    "padding_mask",
    "special_ids_of",
    "special_token_mask",
]
