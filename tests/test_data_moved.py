"""Names that moved out of sae_diff.data's long modules keep working from their old modules
for one release: the same object, with a DeprecationWarning naming the new module; names the
old module still uses itself are plain re-exports (no warning)."""

from __future__ import annotations

import importlib
import warnings

import pytest

MOVED = [
    ("sae_diff.data.sources", "CHAT_COLUMNS", "sae_diff.data.documents"),
    ("sae_diff.data.sources", "TEXT_COLUMNS", "sae_diff.data.documents"),
    ("sae_diff.data.sources", "TOKEN_COLUMNS", "sae_diff.data.documents"),
    ("sae_diff.data.sources", "Kind", "sae_diff.data.documents"),
    ("sae_diff.data.sources", "iter_documents", "sae_diff.data.documents"),
    ("sae_diff.data.sources", "render_chat", "sae_diff.data.documents"),
    ("sae_diff.data.sources", "BATCH_FIELDS", "sae_diff.data.token_batch"),
    ("sae_diff.data.store", "indexed_model_shards", "sae_diff.data.shards"),
    ("sae_diff.data.store", "_shard_batches", "sae_diff.data.shards"),
    ("sae_diff.data.harvest", "commit_sharded_manifest", "sae_diff.data.cache_manifest"),
    ("sae_diff.data.cache", "harvest_cache", "sae_diff.data.harvest"),
]

REEXPORTED = [
    ("sae_diff.data.sources", "DatasetSpec", "sae_diff.data.documents"),
    ("sae_diff.data.sources", "TokenBatch", "sae_diff.data.token_batch"),
    ("sae_diff.data.sources", "load_rows", "sae_diff.data.documents"),
    ("sae_diff.data.sources", "detect_kind", "sae_diff.data.documents"),
    ("sae_diff.data.store", "model_shards", "sae_diff.data.shards"),
    ("sae_diff.data.store", "shard_keep", "sae_diff.data.shards"),
    ("sae_diff.data.store", "DEFAULT_ROWS_PER_SHARD", "sae_diff.data.shards"),
    ("sae_diff.data.harvest", "HarvestSummary", "sae_diff.data.harvest_summary"),
    ("sae_diff.data.harvest", "harvest_cache_sharded", "sae_diff.data.harvest_sharded"),
    ("sae_diff.data.cache", "rebuild_manifest", "sae_diff.data.cache_manifest"),
    ("sae_diff.data", "DatasetSpec", "sae_diff.data.documents"),
    ("sae_diff.data", "HarvestSummary", "sae_diff.data.harvest_summary"),
    ("sae_diff.data", "TokenBatch", "sae_diff.data.token_batch"),
]


@pytest.mark.parametrize(("old", "name", "new"), MOVED)
def test_moved_name_warns_and_is_the_same_object(old: str, name: str, new: str) -> None:
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} moved to {new}\.{name}"):
        got = getattr(importlib.import_module(old), name)
    assert got is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize(("old", "name", "new"), REEXPORTED)
def test_reexported_name_is_the_same_object_without_warning(old: str, name: str, new: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        got = getattr(importlib.import_module(old), name)
    assert got is getattr(importlib.import_module(new), name)


def test_unknown_name_is_still_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        importlib.import_module("sae_diff.data.sources").no_such_name  # noqa: B018
