"""The deprecated HarvestConfig and its translation into the one config (PairedRunnerConfig).

``HarvestConfig.runner_config_fields()`` must give a config that ``sae-diff harvest --config``
harvests the same way: same pair, hook, folder, datasets with the same token shares, rows,
batch size, shard size, dtype and token selection. The runner side is read through the
functions ``sae-diff harvest`` itself uses (``sae_diff.training.data``), not re-derived here.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import pytest

from sae_diff.data.documents import DatasetSpec
from sae_diff.data.harvest import HarvestConfig, main
from sae_diff.pairing.masks import MaskConfig

SAE = {"architecture": "batchtopk_crosscoder", "d_in": 16, "d_sae": 48, "k": 4}


def _harvest_config(**over: Any) -> HarvestConfig:
    kw: dict[str, Any] = {
        "base": "tiny-base",
        "ft": "tiny-ft",
        "hook_name": "blocks.0.hook_resid_post",
        "out_dir": "cache/tiny",
        "datasets": [
            {"path": "text.jsonl", "kind": "text"},
            {"path": "chat.jsonl", "kind": "chat", "column": "messages"},
        ],
        "context_size": 16,
        "packing": False,
        "proportions": [3.0, 1.0],
        "batch_size": 4,
        "rows_per_shard": 32,
        "dtype": "bfloat16",
        "max_rows": 40,
        "device": "cpu",
        "backend": "hooked",
        "ft_path": "weights/ft",
        "first_n": 2,
        "high_norm_ratio": 7.5,
        "prepend_bos": False,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    kw.update(over)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return HarvestConfig(**kw)


def test_constructing_harvest_config_warns_and_names_the_replacement() -> None:
    with pytest.warns(DeprecationWarning) as record:
        HarvestConfig(base="b", ft="f", hook_name="blocks.0.hook_resid_post", out_dir="c")
    message = str(record[0].message)
    assert "PairedRunnerConfig" in message and "sae-diff harvest --config" in message
    assert record[0].filename == __file__  # points at the caller, not at the dataclass


def test_python_m_harvest_main_warns(tmp_path: Path) -> None:
    with pytest.warns(DeprecationWarning, match="sae-diff harvest --config"):
        with pytest.raises(FileNotFoundError):
            main([str(tmp_path / "missing.json"), "--no-progress"])


def test_runner_config_fields_maps_every_field() -> None:
    h = _harvest_config()
    fields = h.runner_config_fields()
    assert fields == {
        "base_model_name": "tiny-base",
        "model_name": "tiny-ft",
        "hook_name": "blocks.0.hook_resid_post",
        "cache_path": "cache/tiny",
        "dataset_mixture": [
            {"path": "text.jsonl", "kind": "text", "weight": 3.0},
            {"path": "chat.jsonl", "kind": "chat", "column": "messages", "weight": 1.0},
        ],
        "context_size": 16,
        "disable_concat_sequences": True,
        "store_batch_size_prompts": 4,
        "cache_rows_per_shard": 32,
        "cache_dtype": "bfloat16",
        "device": "cpu",
        "model_backend": "hooked",
        "ft_weights_path": "weights/ft",
        "mask_first_n": 2,
        "mask_high_norm": 7.5,
        "prepend_bos": False,
        "chat_template_kwargs": {"enable_thinking": False},
        "training_tokens": 40 * 16,
    }
    # the config's own datasets are not changed by the translation
    assert "weight" not in h.datasets[0]
    # every HarvestConfig field is translated, or is one of the documented exceptions
    untranslated = {"proportions", "packing", "max_rows", "overwrite"}
    names = {f.name for f in dataclasses.fields(HarvestConfig)}
    sources = {
        "base",
        "ft",
        "hook_name",
        "out_dir",
        "datasets",
        "context_size",
        "batch_size",
        "rows_per_shard",
        "dtype",
        "device",
        "backend",
        "ft_path",
        "first_n",
        "high_norm_ratio",
        "prepend_bos",
        "chat_template_kwargs",
    }
    assert names == sources | untranslated


def test_runner_config_fields_without_proportions_or_max_rows() -> None:
    h = _harvest_config(proportions=None, max_rows=None, packing=True, datasets=[{"path": "a"}])
    fields = h.runner_config_fields()
    assert fields["dataset_mixture"] == [{"path": "a"}]  # each spec keeps its own weight
    assert fields["disable_concat_sequences"] is False
    assert "training_tokens" not in fields  # "until the source ends" has no equivalent


def test_runner_config_fields_rejects_mismatched_proportions() -> None:
    with pytest.raises(ValueError, match="2 proportions for 1 datasets"):
        _harvest_config(datasets=[{"path": "a"}]).runner_config_fields()


def test_runner_config_built_from_the_fields_harvests_the_same_way() -> None:
    """PairedRunnerConfig(**fields, sae=...) constructs, and what `sae-diff harvest` reads
    from it equals what harvest_from_config passes to harvest_cache."""
    from sae_diff.training import data as tdata
    from sae_diff.training.config import config_from_dict

    h = _harvest_config()
    # the training-only settings a harvest has no opinion on: the dictionary and its batch
    cfg = config_from_dict(
        {**h.runner_config_fields(), "sae": dict(SAE), "train_batch_size_tokens": 128}
    )
    assert (cfg.base_model_name, cfg.model_name, cfg.hook_name, cfg.cache_path) == (
        h.base,
        h.ft,
        h.hook_name,
        h.out_dir,
    )
    assert tdata.train_rows(cfg) == h.max_rows
    assert tdata.storage_dtype(cfg) == h.dtype
    assert cfg.store_batch_size_prompts == h.batch_size
    assert cfg.cache_rows_per_shard == h.rows_per_shard
    assert cfg.disable_concat_sequences is (not h.packing)
    assert cfg.chat_template_kwargs == h.chat_template_kwargs
    assert (cfg.device, cfg.model_backend, cfg.ft_weights_path) == ("cpu", "hooked", "weights/ft")
    # the datasets with the harvest's token shares (TokenSource(proportions=...) == weights)
    assert tdata.dataset_specs(cfg) == [
        DatasetSpec(**{**d, "weight": p})
        for d, p in zip(h.datasets, h.proportions or [], strict=True)
    ]
    # the token selection: the MaskConfig harvest_from_config records with the cache
    assert tdata.mask_config(cfg) == MaskConfig(
        first_n=h.first_n, high_norm_ratio=h.high_norm_ratio
    )
