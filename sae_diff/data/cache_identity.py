"""A cache's identity (models, hook, data, dtype) and the checks that a cache fits a run config
before training from or harvesting into it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_diff.data.cache_format import (
    MANIFEST,
    SHARD_GLOB,
    CacheError,
    CacheIdentityError,
    dtype_name,
    read_shard_description,
)
from sae_diff.data.cache_reader import ActivationCache
from sae_diff.data.documents import DatasetSpec

if TYPE_CHECKING:  # types only: sae_diff.training imports this module (no runtime cycle)
    from sae_diff.pairing.model import PairedModel
    from sae_diff.training.config import PairedRunnerConfig

# ---------------------------------------------------------------------- identity
#: what a cache's activations depend on; ``check_identity`` compares these fields
IDENTITY_FIELDS: tuple[str, ...] = (
    "base_model",
    "base_revision",
    "ft_model",
    "ft_revision",
    "hook_name",
    "d_model",
    "tokenizer_hash",
    "chat_template_hash",
    "datasets",
    "context_size",
    "packing",
    "prepend_bos",
    "chat_template_kwargs",
    "high_norm_ratio",
    "dtype",
)
_DATASET_KEYS = ("path", "kind", "column", "split", "name", "revision", "weight", "start", "stop")


def _dataset_identity(d: dict[str, Any]) -> dict[str, Any]:
    """The fields of a dataset description that change which tokens are read."""
    if "tensor" in d:
        return {"tensor": d["tensor"]}
    if "path" in d:
        return {k: d.get(k) for k in _DATASET_KEYS}
    return {"object": d.get("object")}


def cache_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """The identity of a cache (models and revisions, hook, width, tokenizer and chat-template
    hashes, datasets, context size, high-norm ratio, dtype) from its manifest ``meta``."""
    models = meta.get("models") or {}
    source = meta.get("source") or {}
    base, ft = models.get("base") or {}, models.get("ft") or {}
    return {
        "base_model": base.get("name"),
        "base_revision": base.get("revision"),
        "ft_model": ft.get("name"),
        "ft_revision": ft.get("revision"),
        "hook_name": meta.get("hook_name"),
        "d_model": meta.get("d_model"),
        "tokenizer_hash": models.get("tokenizer_hash"),
        "chat_template_hash": models.get("chat_template_hash"),
        "datasets": [_dataset_identity(d) for d in source.get("datasets", [])],
        "context_size": source.get("context_size"),
        # token-stream options (a dataset-backed source records them; a tensor source has none)
        "packing": source.get("packing"),
        "prepend_bos": source.get("prepend_bos"),
        "chat_template_kwargs": source.get("chat_template_kwargs") or {},
        "high_norm_ratio": (meta.get("mask_config") or {}).get("high_norm_ratio"),
        "dtype": meta.get("dtype"),
    }


def expected_identity(cfg: PairedRunnerConfig, pair: PairedModel | None = None) -> dict[str, Any]:
    """What a run config expects of its cache, without loading any model weights.

    Fields the config does not determine are ``None`` (not checked): the tokenizer and
    chat-template hashes and the revisions unless ``pair`` (a loaded ``PairedModel``) is
    given, the datasets of an organism's own corpus, the model names when the config leaves
    them to the organism. Pass ``pair`` once the models are loaded to check everything.

    Args:
        cfg: a :class:`~sae_diff.training.config.PairedRunnerConfig`.
        pair: optional loaded pair; its ``describe()`` supplies names, revisions and hashes.
    """
    datasets: list[dict[str, Any]] | None
    if cfg.dataset_mixture:
        datasets = [_dataset_identity(DatasetSpec(**d).describe()) for d in cfg.dataset_mixture]
    elif cfg.dataset_path:
        spec = DatasetSpec(cfg.dataset_path, column=cfg.dataset_column, split=cfg.dataset_split)
        datasets = [_dataset_identity(spec.describe())]
    elif cfg.organism is None and cfg.smoke_test_models is not None:
        datasets = [{"tensor": "smoke-test random tokens"}]
    else:
        datasets = None  # the organism's own corpus: identified by the organism's models
    try:  # the storage dtype: cache_dtype when set, else the models' dtype
        dtype: str | None = dtype_name(getattr(cfg, "cache_dtype", None) or cfg.dtype)
    except ValueError:
        dtype = None
    smoke = cfg.smoke_test_models is not None and cfg.organism is None
    out: dict[str, Any] = {
        "base_model": cfg.base_model_name or ("smoke-base" if smoke else None),
        "base_revision": None,
        "ft_model": cfg.model_name or None,
        "ft_revision": None,
        "hook_name": cfg.hook_name or None,
        "d_model": int(cfg.sae.d_in),
        "tokenizer_hash": None,
        "chat_template_hash": None,
        "datasets": datasets,
        "context_size": int(cfg.context_size),
        # a smoke run reads a tensor source, which records no stream options
        "packing": None if smoke else not cfg.disable_concat_sequences,
        "prepend_bos": None if smoke else cfg.prepend_bos,  # None: the tokenizer's choice
        "chat_template_kwargs": None if smoke else dict(cfg.chat_template_kwargs or {}),
        "high_norm_ratio": cfg.mask_high_norm,  # None (mask off): the cached ratio is unused
        "dtype": dtype,
    }
    if pair is not None:
        got = cache_identity({"models": pair.describe()})
        for k in (
            "base_model",
            "base_revision",
            "ft_model",
            "ft_revision",
            "tokenizer_hash",
            "chat_template_hash",
        ):
            out[k] = got[k]
    return out


def check_identity(
    cache: ActivationCache | dict[str, Any] | str | os.PathLike[str],
    expected: dict[str, Any],
    *,
    what: str = "the config",
) -> None:
    """Raise :class:`CacheIdentityError` listing EVERY field where ``cache`` differs from
    ``expected`` (see :func:`expected_identity`); ``None`` in ``expected`` skips a field.

    Call it before training from, or appending to, a cache: a cache harvested at another
    hook, of other models or data trains without any other error and yields a dictionary whose
    ``cfg.json`` describes activations it never saw.

    Args:
        cache: an open cache, its folder, or a manifest ``meta`` dict.
        expected: identity fields (:data:`IDENTITY_FIELDS`) and their expected values.
        what: how to name the expectation in the message (e.g. "the checkpoint's config").
    """
    if isinstance(cache, dict):
        meta, where = cache, "the cache"
    else:
        c = (
            cache
            if isinstance(cache, ActivationCache)
            else ActivationCache(cache, allow_incomplete=True)
        )
        meta, where = c.meta, str(c.dir)
    have = cache_identity(meta)
    unknown = sorted(set(expected) - set(IDENTITY_FIELDS))
    if unknown:
        raise ValueError(f"unknown identity field(s) {unknown}; use {list(IDENTITY_FIELDS)}")
    mismatches = [
        f"{k}: cache has {have[k]!r}, {what} says {v!r}"
        for k, v in expected.items()
        if v is not None and have.get(k) != v
    ]
    if mismatches:
        raise CacheIdentityError(
            f"{where} was harvested for another setup than {what} "
            f"({len(mismatches)} difference{'s' if len(mismatches) > 1 else ''}: "
            f"{'; '.join(mismatches)}). Nothing was changed. Point cache_path at a new folder "
            "and run `sae-diff harvest`, or fix the config; `sae-diff harvest --overwrite` "
            "replaces this cache.",
            mismatches,
        )


def check_config_cache(
    cfg: PairedRunnerConfig, *, pair: PairedModel | None = None, what: str = "the config"
) -> None:
    """Check ``cfg.cache_path`` against the run config ``cfg`` before training from it or
    harvesting into it: the storage dtype is one a cache can hold, the path is a folder, and a
    cache (or, with a lost manifest, its first shard's self-description) there was harvested
    for this setup (:func:`check_identity` with :func:`expected_identity`). Nothing happens
    when the folder holds no cache yet. Loads no model; pass ``pair`` once the models are
    loaded to compare revisions and tokenizer hashes too.

    Raises:
        CacheDtypeError, CacheError, CacheIdentityError: naming the problem and the fix.
    """
    if not cfg.cache_path:
        return
    dtype_name(cfg.cache_dtype or cfg.dtype)  # a dtype the cache can store
    folder = Path(cfg.cache_path)
    if folder.exists() and not folder.is_dir():
        raise CacheError(
            f"cache_path {str(folder)!r} is a file, not a cache folder; point cache_path at a "
            "folder (it is created when missing)."
        )
    expected = expected_identity(cfg, pair=pair)
    if (folder / MANIFEST).is_file():
        check_identity(ActivationCache(folder, allow_incomplete=True), expected, what=what)
    elif folder.is_dir() and (shards := sorted(folder.glob(SHARD_GLOB))):
        check_identity(read_shard_description(shards[0])["meta"], expected, what=what)
