"""A batch of fixed-length token rows, as every token source yields them, the one way its
token masks are computed (:meth:`TokenBatch.masks`, used by the harvest and the store), and
the :class:`RowSource` protocol of a token source."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from sae_diff.pairing.masks import ChatMarkers, MaskConfig, TokenMasks, compute_masks

#: TokenBatch fields indexed by row (all but ``row_index`` are ``(B, S)`` or ``(B,)``).
BATCH_FIELDS = (
    "tokens",
    "attention_mask",
    "doc_starts",
    "row_index",
    "is_chat",
    "assistant",
    "template",
)


@dataclass
class TokenBatch:
    """A batch of fixed-length rows.

    ``assistant`` / ``template`` are the chat masks computed per conversation before
    packing (None when the source holds no chat data; False on text rows of a mixture).
    """

    tokens: torch.Tensor  # (B, S) long
    attention_mask: torch.Tensor  # (B, S) bool, False on padding
    doc_starts: torch.Tensor  # (B, S) bool, True where a document begins
    row_index: torch.Tensor  # (B,) long, the rows' positions in the source stream
    is_chat: torch.Tensor | None = None  # (B,) bool, rows holding chat data
    assistant: torch.Tensor | None = None  # (B, S) bool, assistant content + end-of-turn
    template: torch.Tensor | None = None  # (B, S) bool, chat tokens outside message contents

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def select(self, start: int, stop: int) -> TokenBatch:
        """Rows ``start:stop`` of the batch (every field sliced alike)."""

        def cut(v: torch.Tensor | None) -> torch.Tensor | None:
            return None if v is None else v[start:stop]

        return TokenBatch(
            self.tokens[start:stop],
            self.attention_mask[start:stop],
            self.doc_starts[start:stop],
            self.row_index[start:stop],
            cut(self.is_chat),
            cut(self.assistant),
            cut(self.template),
        )

    @classmethod
    def concat(cls, batches: list[TokenBatch]) -> TokenBatch:
        """Stack batches row-wise (an optional field must be set in all or none)."""
        if not batches:
            raise ValueError("concat needs at least one batch")
        out: dict[str, torch.Tensor | None] = {}
        for f in BATCH_FIELDS:
            vals = [getattr(b, f) for b in batches]
            if all(v is None for v in vals):
                out[f] = None
            elif any(v is None for v in vals):
                raise ValueError(f"cannot concatenate batches with and without {f!r}")
            else:
                out[f] = torch.cat(vals)  # type: ignore[arg-type]
        return cls(**out)  # type: ignore[arg-type]

    def masks(
        self,
        tokenizer: Any,
        *,
        acts: torch.Tensor | None = None,
        config: MaskConfig | None = None,
        chat: bool | None = None,
        markers: ChatMarkers | None = None,
    ) -> TokenMasks:
        """The token masks of this batch, the one way every consumer computes them.

        Padding comes from the attention mask, the chat masks from the per-conversation
        masks the batch carries; ``chat=True`` on a batch without them (pre-tokenised chat
        rows) searches the rows for assistant markers instead. ``chat=None``: whether any
        row is chat data.
        """
        if chat is None:
            chat = self.assistant is not None or bool(
                self.is_chat is not None and bool(self.is_chat.any())
            )
        return compute_masks(
            self.tokens,
            tokenizer,
            acts=acts,
            attention_mask=self.attention_mask,
            config=config,
            chat=chat,
            assistant=self.assistant,
            template=self.template,
            markers=markers,
        )


class RowSource(Protocol):
    """What the harvest and the store read tokens from: deterministic rows served as
    :class:`TokenBatch` es (``sae_diff.data.sources``'s ``TokenSource`` and
    ``TensorTokenSource`` are two). An ``is_chat`` attribute, when present and true, records
    the assistant masks of chat data."""

    def describe(self) -> dict[str, Any]:
        """JSON-able description of the stream (recorded in cache manifests)."""
        ...

    def batches(
        self, batch_size: int, start_row: int = 0, stop_row: int | None = None
    ) -> Iterator[TokenBatch]:
        """Rows ``start_row..stop_row`` in batches of ``batch_size`` (the same rows on every
        call: a resumed harvest skips by row index)."""
        ...


__all__ = ["BATCH_FIELDS", "RowSource", "TokenBatch"]
