"""Disk cache: round trip, resume after a crash, corruption detection, manifest, stats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_models import make_tokenizer, random_tokens, tiny_pair

from sae_diff.data.cache import ActivationCache, ActivationCacheWriter, CacheError
from sae_diff.data.harvest import HarvestConfig, harvest_cache, harvest_from_config
from sae_diff.data.sources import TensorTokenSource, TokenSource
from sae_diff.pairing.masks import MaskConfig
from sae_diff.pairing.model import PairedModel

HOOK = "blocks.1.hook_resid_pre"


TINY_PAIR = {
    "n_layers": 2,
    "base_name": "tiny-base",
    "ft_name": "tiny-ft",
}  # the `pair` fixture of conftest.py


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return random_tokens(21, 10, seed=3)


def _harvest(pair, tokens, out, **kw):
    kw.setdefault("rows_per_shard", 8)
    kw.setdefault("batch_size", 3)
    return harvest_cache(
        pair, TensorTokenSource(tokens), out, HOOK, progress=False, verbose=False, **kw
    )


def test_round_trip_equals_paired_activations(pair, tokens, tmp_path: Path) -> None:
    s = _harvest(pair, tokens, tmp_path / "c")
    assert (s.rows, s.tokens, s.shards) == (21, 210, 3) and s.bytes > 0 and s.tokens_per_s > 0
    cache = ActivationCache(tmp_path / "c")
    allt = cache.read_all()
    torch.testing.assert_close(allt["tokens"], tokens)
    expected = pair.paired_activations(tokens, [HOOK])[HOOK]
    torch.testing.assert_close(allt["acts"], expected, rtol=0, atol=0)
    assert allt["row_index"].tolist() == list(range(21))
    assert {"mask_bos", "mask_padding", "mask_high_norm", "mask_special", "mask_first_n"} <= set(
        allt
    )
    assert allt["mask_bos"][:, 0].all() and not allt["mask_bos"][:, 1:].any()
    # manifest records models, hook, dtype, hashes, source
    meta = cache.meta
    assert (
        meta["models"]["base"]["name"] == "tiny-base" and meta["models"]["ft"]["name"] == "tiny-ft"
    )
    assert meta["hook_name"] == HOOK and meta["dtype"] == "float32"
    assert meta["models"]["tokenizer_hash"] and meta["models"]["chat_template_hash"]
    assert meta["source"]["n_rows"] == 21
    # running stats over kept tokens (no BOS) match a direct computation
    kept = expected[:, 1:].reshape(-1, 2, pair.d_model).double()
    torch.testing.assert_close(cache.stats.mean, kept.mean(0))
    torch.testing.assert_close(cache.stats.mean_norm, kept.norm(dim=-1).mean(0))
    assert cache.stats.count == kept.shape[0]
    # block iteration drops BOS and covers every kept token once
    blocks = list(cache.iter_blocks(block_rows=3, seed=1))
    got = torch.cat(blocks)
    assert got.shape == kept.shape
    torch.testing.assert_close(got.double().sum(0), kept.sum(0))


def test_bfloat16_cache(pair, tokens, tmp_path: Path) -> None:
    _harvest(pair, tokens[:8], tmp_path / "c", dtype="bfloat16")
    cache = ActivationCache(tmp_path / "c")
    assert cache.dtype == torch.bfloat16 and cache.load_shard(0)["acts"].dtype == torch.bfloat16


class Crash(RuntimeError):
    pass


class CrashingSource(TensorTokenSource):
    def __init__(self, tokens, crash_after_rows):
        super().__init__(tokens)
        self.crash_after_rows = crash_after_rows

    def batches(self, batch_size, start_row=0, stop_row=None):
        for b in super().batches(batch_size, start_row, stop_row):
            if int(b.row_index[-1]) >= self.crash_after_rows:
                raise Crash("simulated crash")
            yield b


def test_resume_after_crash_is_identical(pair, tokens, tmp_path: Path) -> None:
    _harvest(pair, tokens, tmp_path / "ref")
    out = tmp_path / "crashed"
    with pytest.raises(Crash):
        harvest_cache(
            pair,
            CrashingSource(tokens, 12),
            out,
            HOOK,
            rows_per_shard=8,
            batch_size=3,
            progress=False,
        )
    # crashed mid-shard: one shard committed, plus a stray half-written temp file
    (out / "shard_00001.safetensors.tmp").write_bytes(b"partial")
    with pytest.raises(CacheError, match="did not finish"):
        ActivationCache(out)
    assert ActivationCache(out, allow_incomplete=True).n_rows == 8
    s = _harvest(pair, tokens, out)  # resume with the same arguments
    assert s.resumed_from_rows == 8
    ref, res = (json.loads((d / "manifest.json").read_text()) for d in (tmp_path / "ref", out))
    assert ref["shards"] == res["shards"] and ref["stats"] == res["stats"]
    assert not list(out.glob("*.tmp"))


def test_resume_with_other_config_refused(pair, tokens, tmp_path: Path) -> None:
    _harvest(pair, tokens[:8], tmp_path / "c")
    with pytest.raises(CacheError, match="different configuration.*dtype"):
        _harvest(pair, tokens[:8], tmp_path / "c", dtype="bfloat16")
    _harvest(pair, tokens[:8], tmp_path / "c", dtype="bfloat16", overwrite=True)


def test_flipped_byte_and_truncation_caught(pair, tokens, tmp_path: Path) -> None:
    _harvest(pair, tokens, tmp_path / "c")
    shard = tmp_path / "c" / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    cache = ActivationCache(tmp_path / "c")  # sizes still fine
    cache.load_shard(0)
    with pytest.raises(CacheError, match=r"shard_00001\.safetensors fails its sha256"):
        cache.load_shard(1)
    with pytest.raises(CacheError, match="shard_00001"):
        list(cache.iter_blocks(shuffle=False))
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(CacheError, match=r"shard_00001\.safetensors has \d+ bytes.*partial"):
        ActivationCache(tmp_path / "c")
    shard.unlink()
    with pytest.raises(CacheError, match="missing"):
        ActivationCache(tmp_path / "c")
    with pytest.raises(CacheError, match="no manifest.json"):
        ActivationCache(tmp_path)


def test_writer_rejects_mismatched_tokens(tmp_path: Path) -> None:
    w = ActivationCacheWriter(tmp_path, {"hook_name": "x"}, rows_per_shard=4, d_model=4)
    toks = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(CacheError, match="base and ft must run on exactly these tokens"):
        w.add(
            toks,
            torch.zeros(2, 4, 2, 4),
            {},
            attention_mask=torch.ones(2, 5, dtype=torch.bool),
            doc_starts=torch.zeros(2, 5, dtype=torch.bool),
            row_index=torch.arange(2),
        )


def test_chat_cache_records_assistant_mask_and_config_entry(tmp_path: Path) -> None:
    base, ft = tiny_pair(n_layers=2)
    pair = PairedModel(base, ft)
    chat = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes sir"}]
    chat.write_text("\n".join(json.dumps({"messages": msgs}) for _ in range(6)))
    cfg = HarvestConfig(
        base="unused",
        ft="unused",
        hook_name=HOOK,
        out_dir=str(tmp_path / "c"),
        datasets=[{"path": str(chat)}],
        context_size=30,
        packing=False,
        rows_per_shard=4,
        first_n=2,
    )
    harvest_from_config(cfg, paired_model=pair, progress=False)
    cache = ActivationCache(tmp_path / "c")
    sh = cache.read_all()
    tok = make_tokenizer()
    row = sh["tokens"][0].tolist()
    kept = "".join(
        tok.convert_ids_to_tokens([t for t, m in zip(row, sh["mask_assistant"][0].tolist()) if m])
    )
    assert kept == "yes sir<end_of_turn>"
    assert cache.meta["is_chat"] and cache.meta["mask_config"]["first_n"] == 2
    only = torch.cat(list(cache.iter_blocks(mask_config=MaskConfig(only_assistant=True))))
    assert only.shape[0] == int(sh["mask_assistant"].sum())


def test_text_source_harvest_resume_skips(pair, tmp_path: Path) -> None:
    f = tmp_path / "t.jsonl"
    f.write_text(
        "\n".join(json.dumps({"text": "the quick brown fox jumps. " * 3}) for _ in range(10))
    )
    src = TokenSource(str(f), pair.tokenizer, context_size=16)
    s = harvest_cache(
        pair, src, tmp_path / "c", HOOK, rows_per_shard=5, batch_size=4, max_rows=12, progress=False
    )
    assert s.rows == 12 and s.shards == 3
    assert ActivationCache(tmp_path / "c").tokens()[:, 0].eq(pair.tokenizer.bos_token_id).all()
