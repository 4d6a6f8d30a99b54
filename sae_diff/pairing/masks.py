"""Token masks recorded wherever activations are stored (METHODS.md §6): the one import point.

Every mask is a ``bool`` tensor of shape ``(batch, seq)``, ``True`` where the token *has* the
property (is BOS, is special, is high-norm, ...). Whether a property excludes a token from
training is decided by :class:`MaskConfig`, not by the mask, so stored masks can also be used
to split results (e.g. template tokens vs the rest). :func:`compute_masks` computes a block's
masks into a :class:`TokenMasks`.

The masks themselves live in :mod:`~sae_diff.pairing.token_masks` (from token ids or
activations) and :mod:`~sae_diff.pairing.chat_masks` (from the chat template); this module
re-exports them (``__all__``) so that harvest, store and evaluation import one definition of
each mask from one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from transformers import PreTrainedTokenizerBase

from sae_diff.pairing.chat_masks import (
    ASSISTANT_ROLES,
    ChatEncoding,
    ChatMarkers,
    ChatTemplateError,
    assistant_mask,
    chat_markers,
    encode_chat,
)
from sae_diff.pairing.token_masks import (
    bos_mask,
    first_n_mask,
    high_norm_mask,
    padding_mask,
    special_ids_of,
    special_token_mask,
)

MASK_NAMES = ("bos", "special", "high_norm", "first_n", "padding", "assistant", "template")


@dataclass
class TokenMasks:
    """The masks of one block of tokens, each ``(batch, seq)`` bool or None if not computed.

    ``assistant`` and ``template`` exist for chat data (False on text rows); ``first_n``
    records the first ``MaskConfig.first_n`` positions of each row.
    """

    bos: torch.Tensor | None = None
    special: torch.Tensor | None = None
    high_norm: torch.Tensor | None = None
    first_n: torch.Tensor | None = None
    padding: torch.Tensor | None = None
    assistant: torch.Tensor | None = None
    template: torch.Tensor | None = None

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

    - ``exclude_bos``: every BOS token, wherever it is in a packed row (row starts and
      document separators). A tokenizer without BOS (Qwen) has none to exclude.
    - ``first_n``: the first ``n`` positions of each row, whatever they hold (the
      attention sinks; ``first_n=1`` drops the row start of a model without BOS). Computed
      from positions, so a cache harvested with another ``first_n`` trains with this one.
    - ``only_assistant``: keep only assistant content and the end-of-turn token closing
      each assistant turn (chat data); ``exclude_template``: drop tokens outside message
      contents (turn headers, end-of-turn tokens, template-added text).
    """

    exclude_bos: bool = True
    exclude_padding: bool = True
    exclude_high_norm: bool = True
    high_norm_ratio: float = 10.0
    exclude_special: bool = False
    first_n: int = 0
    only_assistant: bool = False
    extra_special_ids: list[int] = field(default_factory=list)
    exclude_template: bool = False

    def __post_init__(self) -> None:
        if self.first_n < 0:
            raise ValueError(f"first_n must be >= 0, got {self.first_n}")

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
            (self.exclude_template, "template"),
        ):
            if flag:
                m = getattr(masks, name)
                if m is None:
                    hint = " (chat data only)" if name == "template" else ""
                    raise ValueError(
                        f"mask {name!r} is needed by this MaskConfig but was not recorded{hint}"
                    )
                keep &= ~m.to(keep.device)
        if self.first_n > 0:
            keep[:, : self.first_n] = False
        if self.only_assistant:
            if masks.assistant is None:
                raise ValueError("only_assistant=True needs the assistant mask (chat data)")
            keep &= masks.assistant.to(keep.device)
        return keep


def compute_masks(
    tokens: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    acts: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    doc_starts: torch.Tensor | None = None,
    config: MaskConfig | None = None,
    chat: bool = False,
    assistant: torch.Tensor | None = None,
    template: torch.Tensor | None = None,
    markers: ChatMarkers | None = None,
) -> TokenMasks:
    """Compute every applicable mask for a block of tokens.

    ``acts`` (``(batch, seq, [2,] d)``) enables the high-norm mask. ``assistant`` /
    ``template`` are the per-conversation chat masks a :class:`~sae_diff.data.sources.TokenSource`
    carries through packing (prefer ``TokenBatch.masks``, which passes them); without them,
    ``chat=True`` searches the rows for assistant-turn markers (``markers``, else read off
    the tokenizer's template), which misses turns continued from a previous row. The
    first-n mask is the first ``config.first_n`` positions of each row; ``doc_starts`` is
    accepted for callers of the older signature and not used.
    """
    del doc_starts  # first_n is per row (see first_n_mask)
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
        first_n=first_n_mask(tokens, config.first_n),
        padding=padding,
    )
    if acts is not None:
        masks.high_norm = high_norm_mask(acts, config.high_norm_ratio, valid=~padding)
    for name, given in (("assistant", assistant), ("template", template)):
        if given is not None:
            if given.shape != tokens.shape:
                raise ValueError(f"the {name} mask must have the shape of tokens")
            setattr(masks, name, given.to(tokens.device).bool())
    if masks.assistant is None and chat:
        if tokenizer is None:
            raise ValueError("the assistant mask needs the tokenizer")
        masks.assistant = assistant_mask(tokens, tokenizer, markers=markers)
    return masks


__all__ = [
    "ASSISTANT_ROLES",
    "MASK_NAMES",
    "ChatEncoding",
    "ChatMarkers",
    "ChatTemplateError",
    "MaskConfig",
    "TokenMasks",
    "assistant_mask",
    "bos_mask",
    "chat_markers",
    "compute_masks",
    "encode_chat",
    "first_n_mask",
    "high_norm_mask",
    "padding_mask",
    "special_ids_of",
    "special_token_mask",
]
