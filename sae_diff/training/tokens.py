"""The run's token rows: which datasets, how many rows, and the token source over them.

The row accounting of a run (:func:`train_rows` training rows, then the held-out evaluation
rows: :func:`run_token_rows` in all), its datasets (:func:`dataset_specs`; an organism's own
text + chat corpus, :func:`organism_datasets`; seeded random tokens for the smoke-test pair,
:func:`smoke_test_tokens`), the peek that checks a dataset's column before any model loads
(:func:`check_dataset_column`), and the one ``sae_diff.data.sources`` token source the harvest,
the on-the-fly store and the held-out evaluation all read (:func:`token_source`). Split from
:mod:`sae_diff.training.data` (which turns these rows into activations) so each module holds
one concept.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from sae_diff.data.documents import (
    CHAT_COLUMNS,
    TEXT_COLUMNS,
    TOKEN_COLUMNS,
    DatasetSpec,
    iter_documents,
    load_rows,
)
from sae_diff.data.sources import TensorTokenSource, TokenSource
from sae_diff.organisms.ground_truth import (
    chat_dataset,
    load_tokenizer,
    organism_dir,
    pretraining_dataset,
)
from sae_diff.pairing.model import PairedModel
from sae_diff.training.config import PairedRunnerConfig
from sae_diff.training.dataset_checks import check_local_datasets
from sae_diff.training.errors import TrainingDataError


def train_rows(cfg: PairedRunnerConfig) -> int:
    """Token rows of the training data (rows ``0..train_rows``; held-out rows follow)."""
    return -(-cfg.training_tokens // cfg.context_size)


def dataset_specs(cfg: PairedRunnerConfig) -> list[DatasetSpec]:
    """The run's datasets as ``sae_diff.data.documents.DatasetSpec`` s (empty for smoke tests)."""
    if cfg.dataset_mixture:
        return [DatasetSpec(**spec) for spec in cfg.dataset_mixture]
    if cfg.dataset_path:
        return [
            DatasetSpec(
                cfg.dataset_path,
                column=cfg.dataset_column,
                split=cfg.dataset_split,
                streaming=cfg.streaming,
            )
        ]
    return []


def uses_organism_data(cfg: PairedRunnerConfig) -> bool:
    """Whether the run reads the organism's own corpus (an organism and no dataset set)."""
    return cfg.organism is not None and not (cfg.dataset_path or cfg.dataset_mixture)


def run_token_rows(cfg: PairedRunnerConfig) -> int:
    """Rows of ``context_size`` tokens a run reads: the training rows, then the held-out
    evaluation rows after them."""
    n_train = train_rows(cfg)
    n_eval = max(cfg.n_eval_batches, 1) * (
        cfg.eval_batch_size_prompts or cfg.store_batch_size_prompts
    )
    return n_train + n_eval


@functools.lru_cache(maxsize=4)
def _organism_corpus(
    organism: str, chat_share: float, n_documents: int | None, n_tokens: int
) -> tuple[tuple[Any, ...], tuple[float, ...]]:
    path = organism_dir(organism)
    if not (path / "world.json").is_file():  # a custom organism: its examples, no world corpus
        raise TrainingDataError(
            f"organism {organism!r} has no world.json, so no pretraining corpus to train on; set "
            "dataset_path or dataset_mixture to the data to use."
        )
    tokenizer = load_tokenizer(path)
    kinds = [
        (kind, share)
        for kind, share in (("text", 1.0 - chat_share), ("chat", chat_share))
        if share > 0
    ]
    datasets: list[Any] = []
    for kind, share in kinds:
        make = pretraining_dataset if kind == "text" else chat_dataset
        n = n_documents
        if n is None:  # enough documents for this kind's share of the tokens, with a 2x margin
            lengths = [len(doc) for doc in iter_documents(make("train", 64, name=path), tokenizer)]
            mean = max(sum(lengths) / max(len(lengths), 1), 1.0)
            n = int(math.ceil(2.0 * share * n_tokens / mean)) + 64
        datasets.append(make("train", n, name=path))
    return tuple(datasets), tuple(share for _, share in kinds)


def organism_datasets(cfg: PairedRunnerConfig) -> tuple[list[Any], list[float]]:
    """The organism's training corpus as HF datasets and their token shares: pretraining
    documents (``text``) and chat conversations (``messages``) of its ``train`` split, mixed
    ``1 - organism_chat_share`` / ``organism_chat_share`` by tokens.

    The same datasets (cached) serve training and evaluation, so the held-out rows are the
    rows after the training rows of one stream.
    """
    if cfg.organism is None:
        raise TrainingDataError("organism_datasets needs cfg.organism.")
    n_tokens = run_token_rows(cfg) * cfg.context_size
    ds, shares = _organism_corpus(
        str(cfg.organism), float(cfg.organism_chat_share), cfg.organism_n_documents, n_tokens
    )
    return list(ds), list(shares)


def check_dataset_column(cfg: PairedRunnerConfig) -> None:
    """Peek at each dataset's first row (no model needed).

    Raises :class:`TrainingDataError` naming the available columns when the configured column
    (or, if unset, any text / tokens / chat column) is missing, after
    :func:`~sae_diff.training.dataset_checks.check_local_datasets` (empty, unreadable or
    folder-of-files local datasets).
    """
    check_local_datasets(cfg)
    for spec in dataset_specs(cfg):
        try:
            row = next(iter(load_rows(spec)), None)
        except FileNotFoundError as e:
            raise TrainingDataError(f"dataset {spec.path!r} cannot be read: {e}") from e
        except ConnectionError as e:  # a Hub id while offline, or the Hub unreachable
            raise TrainingDataError(
                f"dataset {spec.path!r} is not a local file or folder, and as a Hugging Face Hub "
                f"dataset it cannot be reached ({' '.join(str(e).split())}). Download it while "
                "online (it is then read from the local cache), or point dataset_path at a "
                "local file."
            ) from e
        if row is None:
            raise TrainingDataError(f"dataset {spec.path!r} (split {spec.split!r}) is empty.")
        cols = list(row.keys())
        if spec.column is not None:
            if spec.column not in row:
                raise TrainingDataError(
                    f"dataset {spec.path!r} has no column {spec.column!r}; its columns are {cols}. "
                    "Set dataset_column (or the mixture entry's `column`) to one of them."
                )
        elif not any(c in row for c in (*TOKEN_COLUMNS, *CHAT_COLUMNS, *TEXT_COLUMNS)):
            raise TrainingDataError(
                f"dataset {spec.path!r} has no text, tokens or chat column (it has {cols}). "
                "Set dataset_column."
            )


def smoke_test_tokens(cfg: PairedRunnerConfig, n_seqs: int) -> torch.Tensor:
    """Random tokens for the smoke-test pair: the run's ``n_seqs`` rows (seeded)."""
    spec = cfg.smoke_test_models
    assert spec is not None
    g = torch.Generator().manual_seed(spec.seed * 1_000_003 + 7)
    toks = torch.randint(1, spec.d_vocab, (n_seqs, cfg.context_size), generator=g)
    if cfg.prepend_bos is not False:  # the smoke-test vocabulary's id 0 plays BOS
        toks[:, 0] = 0
    return toks


def effective_prepend_bos(cfg: PairedRunnerConfig, pair: PairedModel | None = None) -> bool:
    """Whether rows start with BOS: ``cfg.prepend_bos`` when set, else whether the tokenizer
    has a BOS token (smoke-test models, which have no tokenizer, use id 0 as BOS)."""
    if cfg.prepend_bos is not None:
        return bool(cfg.prepend_bos)
    tokenizer = getattr(pair, "tokenizer", None)
    if tokenizer is None:
        return cfg.smoke_test_models is not None
    return getattr(tokenizer, "bos_token_id", None) is not None


def token_source(cfg: PairedRunnerConfig, pair: PairedModel) -> TokenSource | TensorTokenSource:
    """The run's token rows as a ``sae_diff.data.sources`` source: the training rows, then
    the held-out evaluation rows (:func:`run_token_rows` in all). Chat rows are rendered with
    the tokenizer's chat template and ``cfg.chat_template_kwargs``."""
    if uses_organism_data(cfg):
        datasets, shares = organism_datasets(cfg)
        return TokenSource(
            datasets,
            pair.tokenizer,
            cfg.context_size,
            proportions=shares,
            packing=not cfg.disable_concat_sequences,
            prepend_bos=cfg.prepend_bos,
            chat_template_kwargs=cfg.chat_template_kwargs,
        )
    specs = dataset_specs(cfg)
    if not specs:
        return TensorTokenSource(
            smoke_test_tokens(cfg, run_token_rows(cfg)), name="smoke-test random tokens"
        )
    return TokenSource(
        specs,
        pair.tokenizer,
        cfg.context_size,
        packing=not cfg.disable_concat_sequences,
        prepend_bos=cfg.prepend_bos,
        chat_template_kwargs=cfg.chat_template_kwargs,
    )


__all__ = [
    "check_dataset_column",
    "dataset_specs",
    "effective_prepend_bos",
    "organism_datasets",
    "run_token_rows",
    "smoke_test_tokens",
    "token_source",
    "train_rows",
    "uses_organism_data",
]
