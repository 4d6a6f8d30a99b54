"""Datasets in, token documents out: the first stage of a token source.

- :class:`DatasetSpec` names one dataset: a Hub id (streaming or not), a local file
  (``.jsonl``/``.json``/``.parquet``/``.csv``/``.txt``/``.arrow``) or a ``save_to_disk``
  folder, holding raw text, pre-tokenised ids, or chat ``messages`` (rendered with the
  fine-tuned tokenizer's chat template).
- :func:`load_rows` reads its rows through Hugging Face ``datasets``; :func:`detect_kind`
  finds the column and kind; :func:`iter_encoded_documents` turns each row into a
  :class:`Document`: token ids plus, for a conversation, its assistant / template masks
  (:func:`sae_diff.pairing.masks.encode_chat`), computed per conversation *before* packing.

:class:`~sae_diff.data.sources.TokenSource` mixes and packs these documents into rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from sae_diff.pairing.masks import ChatMarkers, encode_chat

Kind = Literal["auto", "text", "tokens", "chat"]
CHAT_COLUMNS = ("messages", "conversation", "conversations")
TOKEN_COLUMNS = ("tokens", "input_ids")
TEXT_COLUMNS = ("text", "content", "problem")
_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".arrow": "arrow",
}


@dataclass
class DatasetSpec:
    """One input dataset.

    Args:
        path: Hub id, local data file, or a folder written by ``Dataset.save_to_disk``.
        kind: ``"text"``, ``"tokens"`` (pre-tokenised ids), ``"chat"`` (a messages column
            rendered with the chat template) or ``"auto"`` (from the column names).
        column: the column to read (default: detected from ``kind``).
        split, name, revision: as for ``datasets.load_dataset``.
        streaming: stream instead of downloading/materialising.
        weight: share of *tokens* in a mixture (normalised over the mixture).
        start, stop: row slice of the dataset (recorded in cache manifests).
    """

    path: str
    kind: Kind = "auto"
    column: str | None = None
    split: str = "train"
    name: str | None = None
    revision: str | None = None
    streaming: bool = False
    weight: float = 1.0
    start: int = 0
    stop: int | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-able description (for manifests)."""
        return asdict(self)


def load_rows(spec: DatasetSpec | str | Any) -> Iterable[dict[str, Any]]:
    """The rows of a dataset (a ``datasets`` Dataset/IterableDataset, sliced by the spec)."""
    import datasets

    if isinstance(spec, (datasets.Dataset, datasets.IterableDataset)):
        return spec
    if isinstance(spec, str):
        spec = DatasetSpec(spec)
    p = Path(spec.path)
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()):
        ds: Any = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[spec.split]
        if spec.streaming:
            ds = ds.to_iterable_dataset()
    elif p.is_file():
        builder = _BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise ValueError(
                f"cannot read {p}: unknown file type {p.suffix!r}; use one of {sorted(_BUILDERS)}"
            )
        ds = datasets.load_dataset(
            builder, data_files=str(p), split=spec.split, streaming=spec.streaming
        )
    elif p.suffix.lower() in _BUILDERS or p.is_absolute() or str(spec.path).startswith("."):
        raise FileNotFoundError(f"dataset file {p} does not exist")
    else:
        ds = datasets.load_dataset(
            spec.path, spec.name, split=spec.split, streaming=spec.streaming, revision=spec.revision
        )
    if spec.start or spec.stop is not None:
        return _Sliced(ds, spec.start, spec.stop)
    return ds


class _Sliced:
    def __init__(self, ds: Iterable[dict[str, Any]], start: int, stop: int | None) -> None:
        self.ds, self.start, self.stop = ds, start, stop

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return itertools.islice(iter(self.ds), self.start, self.stop)


def detect_kind(
    row: dict[str, Any], kind: Kind = "auto", column: str | None = None
) -> tuple[Kind, str]:
    """(kind, column) for a dataset from its first row."""
    cols = list(row.keys())
    if column is not None:
        if column not in row:
            raise ValueError(f"column {column!r} not in the dataset; its columns are {cols}")
        if kind == "auto":
            v = row[column]
            kind = (
                "chat"
                if isinstance(v, list) and v and isinstance(v[0], dict)
                else ("tokens" if isinstance(v, list) else "text")
            )
        return kind, column
    order = {
        "chat": CHAT_COLUMNS,
        "tokens": TOKEN_COLUMNS,
        "text": TEXT_COLUMNS,
        "auto": CHAT_COLUMNS + TOKEN_COLUMNS + TEXT_COLUMNS,
    }[kind]
    for c in order:
        if c in row:
            if kind != "auto":
                return kind, c
            return ("chat" if c in CHAT_COLUMNS else "tokens" if c in TOKEN_COLUMNS else "text"), c
    raise ValueError(
        f"cannot find a {kind} column among {cols}; expected one of {list(order)} "
        "(or pass DatasetSpec(column=...))"
    )


def render_chat(messages: list[dict[str, Any]], tokenizer: Any) -> list[int]:
    """Token ids of a conversation rendered with the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "chat data needs a tokenizer with a chat template; the ft tokenizer has none "
            "(set tokenizer.chat_template, or load the fine-tune's own tokenizer)"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class Document:
    """One document's token ids and, for a chat conversation, its per-token chat masks."""

    ids: list[int]
    assistant: list[bool] | None = None
    template: list[bool] | None = None


def iter_documents(spec: DatasetSpec | str | Any, tokenizer: Any) -> Iterator[list[int]]:
    """Token ids of each document (one per row)."""
    for doc in iter_encoded_documents(spec, tokenizer):
        yield doc.ids


def iter_encoded_documents(
    spec: DatasetSpec | str | Any,
    tokenizer: Any,
    *,
    markers: ChatMarkers | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> Iterator[Document]:
    """Each document (one per dataset row) with its chat masks when it is a conversation
    (:func:`~sae_diff.pairing.masks.encode_chat`; ``markers`` / ``template_kwargs`` go
    there)."""
    kind: Kind = spec.kind if isinstance(spec, DatasetSpec) else "auto"
    column = spec.column if isinstance(spec, DatasetSpec) else None
    rows = iter(load_rows(spec))
    first = next(rows, None)
    if first is None:
        return
    kind, column = detect_kind(first, kind, column)
    if kind in ("text", "chat") and tokenizer is None:
        raise ValueError(f"{kind} data needs a tokenizer")
    for row in itertools.chain([first], rows):
        v = row[column]
        if kind == "tokens":
            yield Document([int(x) for x in (v.tolist() if hasattr(v, "tolist") else v)])
        elif kind == "chat":
            enc = encode_chat(v, tokenizer, markers=markers, template_kwargs=template_kwargs)
            yield Document(enc.input_ids, enc.assistant, enc.template)
        else:
            yield Document(list(tokenizer(v, add_special_tokens=False)["input_ids"]))


__all__ = [
    "CHAT_COLUMNS",
    "TEXT_COLUMNS",
    "TOKEN_COLUMNS",
    "DatasetSpec",
    "Document",
    "Kind",
    "detect_kind",
    "iter_documents",
    "iter_encoded_documents",
    "load_rows",
    "render_chat",
]
