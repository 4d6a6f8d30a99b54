"""The background shard writer: a failed write surfaces in the harvesting thread, and the
manifest never lists a shard that is not on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sae_diff.data import cache as cache_mod
from sae_diff.data.cache import ActivationCache, ActivationCacheWriter


def _add(w: ActivationCacheWriter, start: int, rows: int = 4) -> None:
    no = torch.zeros(rows, 3, dtype=torch.bool)
    w.add(
        torch.zeros(rows, 3, dtype=torch.long),
        torch.randn(rows, 3, 2, 4),
        {"bos": no, "padding": no},
        attention_mask=torch.ones(rows, 3, dtype=torch.bool),
        doc_starts=torch.zeros(rows, 3, dtype=torch.bool),
        row_index=torch.arange(start, start + rows),
    )


def test_write_error_is_raised_and_manifest_stays_consistent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = ActivationCacheWriter(tmp_path, {"hook_name": "x"}, rows_per_shard=4, d_model=4)
    _add(w, 0)
    w.wait()
    real = cache_mod._atomic_write

    def failing(path: Path, data: bytes) -> None:
        if path.name.startswith("shard_00001"):
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(cache_mod, "_atomic_write", failing)
    _add(w, 4)
    with pytest.raises(OSError, match="disk full"):
        w.close()
    w.shutdown()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard_00000.safetensors"]
    assert not manifest["complete"]
    reader = ActivationCache(tmp_path, allow_incomplete=True)
    assert reader.n_rows == 4 and reader.load_shard(0)["acts"].shape == (4, 3, 2, 4)


def test_reader_rehashes_a_shard_that_changed(tmp_path: Path) -> None:
    w = ActivationCacheWriter(tmp_path, {"hook_name": "x"}, rows_per_shard=4, d_model=4)
    _add(w, 0)
    w.close()
    w.shutdown()
    reader = ActivationCache(tmp_path)
    reader.load_shard(0)  # hashed and remembered
    shard = tmp_path / "shard_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    before = shard.stat().st_mtime_ns
    shard.write_bytes(bytes(data))  # same size
    os.utime(shard, ns=(before + 10**9, before + 10**9))  # a later modification time
    with pytest.raises(cache_mod.CacheError, match="sha256"):
        reader.load_shard(0)
