"""Token masks recorded wherever activations are stored (METHODS.md §6).

Every function returns a ``bool`` tensor of shape ``(batch, seq)``, ``True`` where the token
*has* the property (is BOS, is special, is high-norm, ...). Whether a property excludes a
token from training is decided by :class:`MaskConfig`, not here, so stored masks can also
be used to split results (e.g. template tokens vs the rest).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

MASK_NAMES = ("bos", "special", "high_norm", "first_n", "padding", "assistant")


def _check_tokens(tokens: torch.Tensor) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError("tokens must be a (batch, seq) tensor of token ids")


def bos_mask(tokens: torch.Tensor, bos_token_id: int | None) -> torch.Tensor:
    """Positions holding the BOS token (False everywhere if the tokenizer has none)."""
    _check_tokens(tokens)
    if bos_token_id is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return tokens == bos_token_id


def special_token_mask(
    tokens: torch.Tensor, special_ids: torch.Tensor | list[int] | set[int] | None
) -> torch.Tensor:
    """Positions holding any of ``special_ids`` (BOS/EOS/PAD, chat-template tokens, ...)."""
    _check_tokens(tokens)
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
    """The first ``n`` tokens of each sequence.

    Without ``doc_starts`` a sequence is a row. With packed rows pass ``doc_starts``
    (``(batch, seq)`` bool, True where a document begins) to mask the first ``n`` tokens of
    every document (a document continued from the previous row is not re-masked).
    """
    _check_tokens(tokens)
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
    _check_tokens(tokens)
    if attention_mask is not None:
        if attention_mask.shape != tokens.shape:
            raise ValueError("attention_mask must have the shape of tokens")
        return ~attention_mask.to(tokens.device).bool()
    if pad_token_id is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return tokens == pad_token_id


def _ids(tokenizer: Any, text: str) -> list[int]:
    out = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(out)


def assistant_mask(
    tokens: torch.Tensor,
    tokenizer: Any,
    *,
    start_of_turn: str = "<start_of_turn>",
    role: str = "model",
    end_of_turn: str = "<end_of_turn>",
    include_end: bool = True,
) -> torch.Tensor:
    """Tokens of assistant turns in Gemma-style chat (``<start_of_turn>model\\n ... <end_of_turn>``).

    The header ``<start_of_turn>model\\n`` is not included; the content is, and the closing
    ``<end_of_turn>`` too when ``include_end`` (the model must predict it). A turn cut off at
    the row end is masked to the row end. Works on packed rows (any number of turns).
    Other templates: pass their markers, e.g. ``start_of_turn="<|im_start|>",
    role="assistant", end_of_turn="<|im_end|>"``.
    """
    _check_tokens(tokens)
    header = _ids(tokenizer, f"{start_of_turn}{role}\n")
    end_ids = _ids(tokenizer, end_of_turn)
    if not header or len(end_ids) != 1:
        raise ValueError(
            f"the tokenizer does not encode the chat markers {start_of_turn!r}/{end_of_turn!r} "
            "as expected (the end marker must be a single token); pass this template's markers"
        )
    end_id = end_ids[0]
    b, s = tokens.shape
    h = len(header)
    opens = torch.zeros(b, s + 1, dtype=torch.bool, device=tokens.device)
    if s >= h:
        windows = tokens.unfold(1, h, 1)  # (b, s - h + 1, h)
        hdr = torch.as_tensor(header, device=tokens.device)
        found = (windows == hdr).all(dim=-1)
        opens[:, h : s + 1] = found  # content starts right after the header
    closes = torch.zeros(b, s + 1, dtype=torch.bool, device=tokens.device)
    closes[:, (1 if include_end else 0) : s + (1 if include_end else 0)] = tokens == end_id
    idx = torch.arange(s + 1, device=tokens.device).expand(b, s + 1)
    last_open = torch.where(opens, idx, torch.full_like(idx, -1)).cummax(dim=1).values
    last_close = torch.where(closes, idx, torch.full_like(idx, -1)).cummax(dim=1).values
    inside = (last_open >= 0) & (last_open > last_close)
    return inside[:, :s]


@dataclass
class TokenMasks:
    """The masks of one block of tokens, each ``(batch, seq)`` bool or None if not computed."""

    bos: torch.Tensor | None = None
    special: torch.Tensor | None = None
    high_norm: torch.Tensor | None = None
    first_n: torch.Tensor | None = None
    padding: torch.Tensor | None = None
    assistant: torch.Tensor | None = None

    def to_dict(self) -> dict[str, torch.Tensor]:
        """The computed masks by name (``mask_`` prefixes are added by the cache)."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> TokenMasks:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        return cls(**{k: v.bool() for k, v in d.items() if k in MASK_NAMES})


@dataclass
class MaskConfig:
    """Which masks to compute and which exclude tokens from training data.

    Defaults follow METHODS.md §6: BOS, padding and very high-norm tokens (norm > 10 x
    median) are excluded; special/template tokens are recorded but kept; ``first_n`` and
    ``only_assistant`` are off.
    """

    exclude_bos: bool = True
    exclude_padding: bool = True
    exclude_high_norm: bool = True
    high_norm_ratio: float = 10.0
    exclude_special: bool = False
    first_n: int = 0
    only_assistant: bool = False
    extra_special_ids: list[int] = field(default_factory=list)

    def keep(self, masks: TokenMasks) -> torch.Tensor:
        """``(batch, seq)`` bool: True for tokens that stay in the training data."""
        ref = next(iter(masks.to_dict().values()), None)
        if ref is None:
            raise ValueError("no masks were computed")
        keep = torch.ones_like(ref, dtype=torch.bool)
        for flag, name in (
            (self.exclude_bos, "bos"),
            (self.exclude_padding, "padding"),
            (self.exclude_high_norm, "high_norm"),
            (self.exclude_special, "special"),
            (self.first_n > 0, "first_n"),
        ):
            if flag:
                m = getattr(masks, name)
                if m is None:
                    raise ValueError(
                        f"mask {name!r} is needed by this MaskConfig but was not recorded"
                    )
                keep &= ~m
        if self.only_assistant:
            if masks.assistant is None:
                raise ValueError("only_assistant=True needs the assistant mask (chat data)")
            keep &= masks.assistant
        return keep


def special_ids_of(tokenizer: Any, extra: list[int] | None = None) -> list[int]:
    """All special-token ids of a tokenizer (BOS/EOS/PAD/UNK, added specials) plus ``extra``."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or []) if tokenizer is not None else set()
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if v is not None:
            ids.add(int(v))
    ids.update(int(i) for i in (extra or []))
    return sorted(ids)


def compute_masks(
    tokens: torch.Tensor,
    tokenizer: Any = None,
    *,
    acts: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    doc_starts: torch.Tensor | None = None,
    config: MaskConfig | None = None,
    chat: bool = False,
) -> TokenMasks:
    """Compute every applicable mask for a block of tokens.

    ``acts`` (``(batch, seq, [2,] d)``) enables the high-norm mask; ``chat`` the assistant
    mask (needs the tokenizer). The first-n mask uses ``config.first_n`` (0 = all False).
    """
    config = config or MaskConfig()
    bos_id = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    eos_id = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if attention_mask is not None:
        padding = padding_mask(tokens, attention_mask=attention_mask)
    elif pad_id is not None and pad_id not in (bos_id, eos_id):
        padding = padding_mask(tokens, pad_id)
    else:  # PAD shares its id with BOS/EOS: only an attention mask can tell them apart
        padding = torch.zeros_like(tokens, dtype=torch.bool)
    masks = TokenMasks(
        bos=bos_mask(tokens, bos_id),
        special=special_token_mask(tokens, special_ids_of(tokenizer, config.extra_special_ids)),
        first_n=first_n_mask(tokens, config.first_n, doc_starts),
        padding=padding,
    )
    if acts is not None:
        masks.high_norm = high_norm_mask(acts, config.high_norm_ratio, valid=~padding)
    if chat:
        if tokenizer is None:
            raise ValueError("the assistant mask needs the tokenizer")
        masks.assistant = assistant_mask(tokens, tokenizer)
    return masks
