"""Token sources: Hugging Face datasets in, fixed-length token rows out.

- :class:`TokenSource` mixes several datasets (:class:`~sae_diff.data.documents.DatasetSpec`,
  read as documents by :mod:`sae_diff.data.documents`) with given token proportions
  (pretraining text + chat is the standard recipe; :func:`mix_documents`) and cuts the stream
  into rows of ``context_size``, by packing (as SAELens does: each row starts with BOS,
  documents are separated by BOS) or by truncation (one document per row, padded; truncated
  tokens are counted, never silently dropped). A tokenizer without BOS (Qwen) gets no BOS at
  all: documents are concatenated as rendered and rows start wherever the stream is cut.
- :class:`TensorTokenSource` serves an already tokenised ``(n_rows, seq)`` tensor.

Chat conversations are rendered and their assistant / template masks computed per
conversation before packing; the masks travel with the tokens, so a turn continued from the
previous row keeps its mask.

Both yield :class:`~sae_diff.data.token_batch.TokenBatch` es that also carry the attention
mask, document starts, the chat masks and each row's index in the stream (for caches and
resuming); :meth:`TokenBatch.masks` turns a batch into the
:class:`~sae_diff.pairing.masks.TokenMasks` every consumer (harvest, in-memory store) uses.
Every name of the former one-module pipeline stays importable from here.

Why this is one module (~430 lines): it holds the two token sources, which share one batch
contract (row indices, document starts, chat masks) that a resumed harvest relies on.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from sae_diff.data.documents import (
    DatasetSpec,
    Document,
    detect_kind,
    iter_encoded_documents,
    load_rows,
)
from sae_diff.data.token_batch import TokenBatch
from sae_diff.moved import moved_names, to
from sae_diff.pairing.masks import ChatMarkers


def mix_documents(streams: list[Iterator[Any]], weights: list[float]) -> Iterator[tuple[int, Any]]:
    """Interleave document streams so each gets ``weight`` of the *tokens* (deficit
    scheduling: next document from the stream furthest below its share). Deterministic.
    Ends with the first exhausted stream, so proportions hold throughout."""
    if len(streams) != len(weights) or not streams:
        raise ValueError("need one weight per dataset")
    if any(w <= 0 for w in weights):
        raise ValueError(f"proportions must be positive, got {weights}")
    total = float(sum(weights))
    share = [w / total for w in weights]
    taken = [0] * len(streams)
    while True:
        i = min(range(len(streams)), key=lambda k: (taken[k] / share[k], k))
        doc = next(streams[i], None)
        if doc is None:
            return
        taken[i] += max(len(doc.ids if isinstance(doc, Document) else doc), 1)
        yield i, doc


@dataclass
class SourceStats:
    """Counters of what a source produced (reported in summaries and manifests)."""

    documents: int = 0
    rows: int = 0
    truncated_tokens: int = 0
    padded_tokens: int = 0
    dropped_tail_tokens: int = 0
    per_dataset_tokens: list[int] = field(default_factory=list)


@dataclass
class _Row:
    tokens: list[int]
    n_real: int
    starts: list[bool]
    chat: bool
    assistant: list[bool]
    template: list[bool]


class TokenSource:
    """Fixed-length token rows from one or several datasets.

    Args:
        datasets: a :class:`DatasetSpec`, a path / Hub id, a ``datasets`` Dataset, or a list
            of those (a mixture).
        tokenizer: the shared tokenizer (pass the fine-tune's: its chat template renders
            chat data).
        context_size: tokens per row.
        proportions: token shares of the datasets (default: each spec's ``weight``).
        packing: pack documents into rows (default) or truncate one document per row.
        prepend_bos: every row starts with BOS and documents are separated by BOS (packing),
            or every document starts with BOS (truncation); a document that already starts
            with BOS (a chat template writing it) is not given a second one. ``None``
            (default): True exactly when the tokenizer has a BOS token, so a model without
            one (Qwen) never sees a fake BOS. ``True`` without a BOS token is an error.
        max_rows: stop after this many rows (None: until the first dataset runs out).
        chat_markers: explicit assistant-turn markers for chat data (default: read the
            conversation structure off the tokenizer's own chat template).
        chat_template_kwargs: extra variables for the chat template (e.g.
            ``{"enable_thinking": False}``).
    """

    def __init__(
        self,
        datasets: DatasetSpec | str | Any | list[DatasetSpec | str | Any],
        tokenizer: Any,
        context_size: int,
        *,
        proportions: list[float] | None = None,
        packing: bool = True,
        prepend_bos: bool | None = None,
        max_rows: int | None = None,
        chat_markers: ChatMarkers | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if context_size < 2:
            raise ValueError(f"context_size must be >= 2, got {context_size}")
        specs = list(datasets) if isinstance(datasets, list) else [datasets]
        self.specs = [DatasetSpec(s) if isinstance(s, str) else s for s in specs]
        if proportions is None:
            proportions = [s.weight if isinstance(s, DatasetSpec) else 1.0 for s in self.specs]
        if len(proportions) != len(self.specs):
            raise ValueError(f"got {len(proportions)} proportions for {len(self.specs)} datasets")
        self.proportions = [float(p) for p in proportions]
        self.tokenizer = tokenizer
        self.context_size = int(context_size)
        self.packing = packing
        self.bos_id = getattr(tokenizer, "bos_token_id", None)
        if prepend_bos is None:
            prepend_bos = self.bos_id is not None
        if prepend_bos and self.bos_id is None:
            raise ValueError(
                "prepend_bos=True but the tokenizer has no BOS token (a model such as Qwen is "
                "trained without one); leave prepend_bos unset or pass False"
            )
        self.prepend_bos = bool(prepend_bos)
        self.max_rows = max_rows
        self.chat_markers = chat_markers
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else getattr(tokenizer, "eos_token_id", None) or 0
        self.stats = SourceStats(per_dataset_tokens=[0] * len(self.specs))
        self._chat_flags = [self._spec_is_chat(s) for s in self.specs]

    # -- description
    @property
    def is_chat(self) -> bool:
        """Whether any dataset is chat data (then the assistant mask is recorded)."""
        return any(self._chat_flags)

    def _spec_is_chat(self, spec: Any) -> bool:
        if isinstance(spec, DatasetSpec) and spec.kind != "auto":
            return spec.kind == "chat"
        try:
            first = next(iter(load_rows(spec)), None)
        except Exception:  # pragma: no cover - reported when iterated
            return False
        if first is None:
            return False
        column = spec.column if isinstance(spec, DatasetSpec) else None
        return detect_kind(first, "auto", column)[0] == "chat"

    def describe(self) -> dict[str, Any]:
        """JSON-able description of the token stream (for manifests; resume compares it)."""
        out: dict[str, Any] = {
            "datasets": [
                s.describe() if isinstance(s, DatasetSpec) else {"object": repr(s)[:200]}
                for s in self.specs
            ],
            "proportions": self.proportions,
            "context_size": self.context_size,
            "packing": self.packing,
            "prepend_bos": self.prepend_bos,
            "max_rows": self.max_rows,
        }
        # only when set, so caches described before these options existed still resume
        if self.chat_markers is not None:
            out["chat_markers"] = asdict(self.chat_markers)
        if self.chat_template_kwargs:
            out["chat_template_kwargs"] = self.chat_template_kwargs
        return out

    # -- iteration
    def _documents(self) -> Iterator[tuple[int, Document]]:
        streams = [
            iter_encoded_documents(
                s,
                self.tokenizer,
                markers=self.chat_markers,
                template_kwargs=self.chat_template_kwargs,
            )
            for s in self.specs
        ]
        return mix_documents(streams, self.proportions)

    def rows(self) -> Iterator[tuple[list[int], int, list[bool], bool]]:
        """(row tokens, number of real tokens, doc-start flags, is-chat) per row."""
        for r in self._rows():
            yield r.tokens, r.n_real, r.starts, r.chat

    def _rows(self) -> Iterator[_Row]:
        self.stats = SourceStats(per_dataset_tokens=[0] * len(self.specs))
        gen = self._packed() if self.packing else self._truncated()
        n = 0
        for row in gen:
            if self.max_rows is not None and n >= self.max_rows:
                return
            self.stats.rows += 1
            n += 1
            yield row

    def _with_bos(self, doc: Document) -> Document:
        """The document with BOS prepended (unless it starts with one); a prepended BOS is
        neither assistant nor template."""
        if self.prepend_bos and (not doc.ids or doc.ids[0] != self.bos_id):
            return Document(
                [int(self.bos_id), *doc.ids],  # type: ignore[arg-type]
                None if doc.assistant is None else [False, *doc.assistant],
                None if doc.template is None else [False, *doc.template],
            )
        return doc

    def _packed(self) -> Iterator[_Row]:
        s = self.context_size
        buf: list[int] = []
        starts: list[bool] = []
        chat: list[bool] = []
        asst: list[bool] = []
        tmpl: list[bool] = []
        for i, doc in self._documents():
            self.stats.documents += 1
            self.stats.per_dataset_tokens[i] += len(doc.ids)
            doc = self._with_bos(doc)
            n = len(doc.ids)
            buf.extend(doc.ids)
            starts.extend([True] + [False] * (n - 1))
            chat.extend([self._chat_flags[i]] * n)
            asst.extend(doc.assistant if doc.assistant is not None else [False] * n)
            tmpl.extend(doc.template if doc.template is not None else [False] * n)
            while buf:
                cont = self.prepend_bos and buf[0] != self.bos_id
                need = s - 1 if cont else s
                if len(buf) < need:
                    break
                # a document continued from the previous row: the row starts with BOS (not
                # part of any conversation, so no chat mask)
                lead = [int(self.bos_id)] if cont else []  # type: ignore[arg-type]
                pre = [False] * len(lead)
                yield _Row(
                    [*lead, *buf[:need]],
                    s,
                    [*pre, *starts[:need]],
                    any(chat[:need]),
                    [*pre, *asst[:need]],
                    [*pre, *tmpl[:need]],
                )
                buf, starts, chat = buf[need:], starts[need:], chat[need:]
                asst, tmpl = asst[need:], tmpl[need:]
        self.stats.dropped_tail_tokens = len(buf)

    def _truncated(self) -> Iterator[_Row]:
        s = self.context_size
        for i, doc in self._documents():
            self.stats.documents += 1
            self.stats.per_dataset_tokens[i] += len(doc.ids)
            doc = self._with_bos(doc)
            ids = doc.ids
            if len(ids) > s:
                self.stats.truncated_tokens += len(ids) - s
                ids = ids[:s]
            n_real = len(ids)
            pad = [False] * (s - n_real)
            self.stats.padded_tokens += s - n_real
            yield _Row(
                ids + [self.pad_id] * (s - n_real),
                n_real,
                [True] + [False] * (s - 1),
                self._chat_flags[i],
                (doc.assistant or [False] * n_real)[:n_real] + pad,
                (doc.template or [False] * n_real)[:n_real] + pad,
            )

    def batches(
        self, batch_size: int, start_row: int = 0, stop_row: int | None = None
    ) -> Iterator[TokenBatch]:
        """Batches of rows ``start_row..stop_row`` (rows are deterministic, so a harvest can
        resume by skipping)."""
        it = itertools.islice(self._rows(), start_row, stop_row)
        idx = start_row
        while True:
            chunk = list(itertools.islice(it, batch_size))
            if not chunk:
                return
            toks = torch.tensor([r.tokens for r in chunk], dtype=torch.long)
            am = torch.zeros_like(toks, dtype=torch.bool)
            for j, r in enumerate(chunk):
                am[j, : r.n_real] = True
            starts = torch.tensor([r.starts for r in chunk], dtype=torch.bool)
            is_chat = torch.tensor([r.chat for r in chunk], dtype=torch.bool)
            rows = torch.arange(idx, idx + len(chunk), dtype=torch.long)
            idx += len(chunk)
            asst = tmpl = None
            if self.is_chat:
                asst = torch.tensor([r.assistant for r in chunk], dtype=torch.bool)
                tmpl = torch.tensor([r.template for r in chunk], dtype=torch.bool)
            yield TokenBatch(toks, am, starts, rows, is_chat, asst, tmpl)


class TensorTokenSource:
    """Serve a pre-tokenised ``(n_rows, seq)`` tensor as :class:`TokenBatch` es.

    ``attention_mask`` marks real tokens (rows may be left- or right-padded). Chat rows may
    bring their own ``assistant`` / ``template`` masks (e.g. from
    :func:`~sae_diff.pairing.masks.encode_chat`); with ``is_chat`` and no ``assistant``
    mask, consumers search the rows for assistant-turn markers.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        name: str = "tensor",
        is_chat: bool = False,
        assistant: torch.Tensor | None = None,
        template: torch.Tensor | None = None,
    ) -> None:
        if tokens.dim() != 2:
            raise ValueError("tokens must be (n_rows, seq)")
        self.tokens = tokens.long()
        self.attention_mask = (
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones_like(self.tokens, dtype=torch.bool)
        )
        for label, m in (
            ("attention_mask", self.attention_mask),
            ("assistant", assistant),
            ("template", template),
        ):
            if m is not None and m.shape != self.tokens.shape:
                raise ValueError(
                    f"{label} has shape {tuple(m.shape)} but tokens are {tuple(tokens.shape)}"
                )
        self.assistant = None if assistant is None else assistant.bool()
        self.template = None if template is None else template.bool()
        is_chat = is_chat or assistant is not None
        self.context_size = int(tokens.shape[1])
        self.name = name
        self._is_chat = is_chat
        self.stats = SourceStats(rows=int(tokens.shape[0]))

    @property
    def is_chat(self) -> bool:
        return self._is_chat

    def describe(self) -> dict[str, Any]:
        import hashlib

        digest = hashlib.sha256(self.tokens.numpy().tobytes()).hexdigest()[:16]
        return {
            "datasets": [{"tensor": self.name, "sha256_16": digest}],
            "context_size": self.context_size,
            "n_rows": int(self.tokens.shape[0]),
        }

    def batches(
        self, batch_size: int, start_row: int = 0, stop_row: int | None = None
    ) -> Iterator[TokenBatch]:
        stop = self.tokens.shape[0] if stop_row is None else min(stop_row, self.tokens.shape[0])
        for i in range(start_row, stop, batch_size):
            j = min(i + batch_size, stop)
            t = self.tokens[i:j]
            am = self.attention_mask[i:j]
            # a row's document starts at its first real token (rows may be left-padded)
            starts = torch.zeros_like(t, dtype=torch.bool)
            starts[torch.arange(j - i), am.long().argmax(dim=1)] = True
            yield TokenBatch(
                t,
                am,
                starts,
                torch.arange(i, j),
                torch.full((j - i,), self._is_chat),
                None if self.assistant is None else self.assistant[i:j],
                None if self.template is None else self.template[i:j],
            )


__all__ = [
    "DatasetSpec",
    "Document",
    "SourceStats",
    "TensorTokenSource",
    "TokenBatch",
    "TokenSource",
    "detect_kind",
    "iter_encoded_documents",
    "load_rows",
    "mix_documents",
]

#: moved to sae_diff.data.documents / sae_diff.data.token_batch (one release; see sae_diff.moved)
__getattr__ = moved_names(
    __name__,
    {
        **to(
            "sae_diff.data.documents",
            [
                "CHAT_COLUMNS",
                "Kind",
                "TEXT_COLUMNS",
                "TOKEN_COLUMNS",
                "iter_documents",
                "render_chat",
            ],
        ),
        "BATCH_FIELDS": "sae_diff.data.token_batch",
    },
)
