"""One data pipeline: the cached and on-the-fly paths select the same tokens, bf16 storage
reads back exactly, and the store resumes exactly (and cheaply) from its state_dict."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers_models import BOS_ID

from sae_diff.data.cache import ActivationCache
from sae_diff.data.harvest import harvest_cache
from sae_diff.data.sources import TokenSource
from sae_diff.data.store import PairedActivationsStore, model_shards, shard_keep
from sae_diff.pairing.masks import MaskConfig
from sae_diff.pairing.model import PairedModel
from sae_diff.training import data as tdata
from sae_diff.training.config import ConfigError, config_from_dict

HOOK = "blocks.1.hook_resid_pre"
ROWS, PER_SHARD, FWD = 14, 4, 3  # shards of 4 rows, forwards of 3 rows (restarting per shard)
MASKS = MaskConfig(first_n=2, exclude_special=False)


def source(pair: PairedModel) -> TokenSource:
    """Packed rows of text and Gemma-style chat (documents cross row boundaries)."""
    words = "the cat sat on a mat, then it ran far away! why? no idea".split()
    texts = Dataset.from_dict(
        {"text": [" ".join(words[i % 7 : i % 7 + 3 + i % 5]) for i in range(40)]}
    )
    chats = Dataset.from_dict(
        {
            "messages": [
                [
                    {"role": "user", "content": f"hi {w}"},
                    {"role": "assistant", "content": f"ok, {w} it is"},
                ]
                for w in words
            ]
        }
    )
    return TokenSource([texts, chats], pair.tokenizer, 12, proportions=[0.5, 0.5])


def cache_of(
    pair: PairedModel, root: Path, dtype: str = "float32", masks: MaskConfig = MASKS
) -> Path:
    out = root / f"cache_{dtype}_{abs(hash(repr(masks)))}"
    if not (out / "manifest.json").exists():
        harvest_cache(
            pair,
            source(pair),
            out,
            HOOK,
            batch_size=FWD,
            rows_per_shard=PER_SHARD,
            dtype=dtype,
            mask_config=masks,
            max_rows=ROWS,
            progress=False,
            verbose=False,
        )
    return out


def on_the_fly(
    pair: PairedModel, dtype: str = "float32", masks: MaskConfig = MASKS, **kw: Any
) -> PairedActivationsStore:
    return PairedActivationsStore.from_model(
        pair,
        source(pair),
        HOOK,
        store_batch_size_prompts=FWD,
        rows_per_shard=PER_SHARD,
        storage_dtype=dtype,
        mask_config=masks,
        stop_row=ROWS,
        **kw,
    )


CHAT_ONLY = MaskConfig(only_assistant=True, exclude_special=True)


@pytest.mark.parametrize("masks", [MASKS, CHAT_ONLY], ids=["first_n", "assistant_only"])
def test_cache_and_on_the_fly_select_the_same_tokens(
    pair: PairedModel, tmp_path: Path, masks: MaskConfig
) -> None:
    cache = ActivationCache(cache_of(pair, tmp_path, masks=masks))
    fly = list(
        model_shards(
            pair,
            source(pair),
            HOOK,
            batch_size=FWD,
            rows_per_shard=PER_SHARD,
            mask_config=masks,
            stop_row=ROWS,
        )
    )
    assert len(fly) == cache.n_shards == -(-ROWS // PER_SHARD)
    n_kept = 0
    for i, shard in enumerate(fly):
        disk = cache.load_shard(i)
        keep = shard_keep(shard, masks)
        assert torch.equal(keep, shard_keep(disk, masks))
        assert torch.equal(shard["tokens"][keep], disk["tokens"][keep])  # token ids, in order
        assert torch.equal(shard["acts"][keep], disk["acts"][keep])  # activations, bit for bit
        assert not (shard["tokens"][keep] == BOS_ID).any()  # mask_bos: no BOS served
        n_kept += int(keep.sum())
    assert 0 < n_kept < ROWS * 12
    # the served batches too: the same sequence when the cache is read in harvest order
    if masks is CHAT_ONLY:  # only assistant content (and end-of-turn) tokens of chat rows
        assert all(not shard_keep(s, masks)[~s["mask_assistant"]].any() for s in fly)
    common = {"batch_size": 10, "buffer_size": 20, "seed": 3, "loop": False}
    a = list(PairedActivationsStore.from_cache(cache, shuffle=False, mask_config=masks, **common))
    b = list(on_the_fly(pair, masks=masks, **common))
    assert len(a) == len(b) == n_kept // 10
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
def test_runner_selects_the_same_tokens_with_and_without_cache(
    tmp_path: Path, cache_dtype: str
) -> None:
    """The run's provider from one config with and without cache_path: the same multiset of
    paired activations over an epoch (the cache reads its shards in a seeded order)."""
    d = {
        "model_name": "t-ft",
        "base_model_name": "t-base",
        "smoke_test_models": {
            "n_layers": 2,
            "d_model": 16,
            "n_heads": 4,
            "d_vocab": 48,
            "n_ctx": 16,
        },
        "model_from_pretrained_kwargs": {},
        "hook_name": "blocks.1.hook_resid_pre",
        "context_size": 16,
        "store_batch_size_prompts": 5,
        "training_tokens": 16 * 23,
        "train_batch_size_tokens": 16,
        "n_batches_in_buffer": 3,
        "cache_rows_per_shard": 6,
        "mask_first_n": 3,
        "mask_high_norm": 1.5,
        "sae": {"architecture": "batchtopk_crosscoder", "d_in": 16, "d_sae": 32, "k": 4},
        "seed": 1,
    }
    fly_cfg = config_from_dict({**d, "cache_dtype": cache_dtype})
    cached_cfg = config_from_dict(
        {**d, "cache_path": str(tmp_path / "cache"), "cache_dtype": cache_dtype}
    )
    pair = tdata.load_pair(fly_cfg)

    def epoch(cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
        store = tdata.training_store(cfg, pair, loop=False)
        kept = torch.cat(list(store.kept_blocks(0))).float()  # every token the epoch selects
        served = torch.cat(list(store))  # all but the last < 1 batch, after the shuffle
        return kept.reshape(kept.shape[0], -1), served.reshape(served.shape[0], -1)

    (fly, fly_served), (cached, cached_served) = epoch(fly_cfg), epoch(cached_cfg)
    assert fly.shape == cached.shape and fly.shape[0] > 16 * 5
    assert not torch.equal(fly, cached)  # different orders (the cache shuffles its shards) ...
    order = lambda x: torch.from_numpy(np.lexsort(x.T.numpy()[::-1].copy()))  # noqa: E731
    assert torch.equal(fly[order(fly)], cached[order(cached)])  # ... of the same tokens
    assert fly_served.shape == cached_served.shape and fly_served.shape[0] > fly.shape[0] - 16
    assert not torch.equal(fly_served, cached_served)
    # the high-norm mask (median over the shard) removed some tokens in both
    n_total = 23 * (16 - 3)
    assert fly.shape[0] < n_total - 16


def test_bf16_cache_reads_back_exactly(pair: PairedModel, tmp_path: Path) -> None:
    masks = MaskConfig(first_n=2, exclude_high_norm=False)  # the same tokens in both dtypes
    f32 = cache_of(pair, tmp_path, "float32", masks)
    bf16 = cache_of(pair, tmp_path, "bfloat16", masks)
    c32, c16 = ActivationCache(f32), ActivationCache(bf16)
    assert c16.dtype == torch.bfloat16 and c16.nbytes < 0.7 * c32.nbytes
    common = {"mask_config": masks, "batch_size": 8, "buffer_size": 24, "seed": 5, "loop": False}
    for mode in ("paired", "diff"):
        a = list(PairedActivationsStore.from_cache(c32, mode=mode, **common))
        b = list(PairedActivationsStore.from_cache(c16, mode=mode, **common))
        assert len(a) == len(b) > 3
        for x32, x16 in zip(a, b):
            assert x16.dtype == torch.float32
            if mode == "paired":  # upcast is exact: the stored bf16 values
                assert torch.equal(x16, x32.to(torch.bfloat16).float())
    # diff mode: ft - base of the upcast values, computed in float32 (not rounded to bf16)
    paired = list(PairedActivationsStore.from_cache(c16, mode="paired", **common))
    diff = list(PairedActivationsStore.from_cache(c16, mode="diff", **common))
    for p, dd in zip(paired, diff):
        assert torch.equal(dd, p[:, 1] - p[:, 0])
    # on the fly with bf16 storage is the bf16 cache
    fly = list(
        on_the_fly(pair, "bfloat16", masks, batch_size=8, buffer_size=24, seed=5, loop=False)
    )
    ref = list(PairedActivationsStore.from_cache(c16, shuffle=False, **common))
    assert all(torch.equal(x, y) for x, y in zip(fly, ref)) and len(fly) == len(ref)


def _count_forwards(pair: PairedModel, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"rows": 0}
    real = type(pair).paired_activations

    def counted(self: Any, tokens: torch.Tensor, *a: Any, **k: Any) -> Any:
        calls["rows"] += int(tokens.shape[0])
        return real(self, tokens, *a, **k)

    monkeypatch.setattr(type(pair), "paired_activations", counted)
    return calls


@pytest.mark.parametrize("kind", ["cache", "model"])
def test_store_resumes_exactly_from_state_dict(
    pair: PairedModel, tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = {"batch_size": 7, "buffer_size": 15, "seed": 11, "mode": "diff"}

    def make() -> PairedActivationsStore:
        if kind == "cache":
            return PairedActivationsStore.from_cache(
                cache_of(pair, tmp_path), mask_config=MASKS, **common
            )
        return on_the_fly(pair, **common)

    full = make()
    ref = [next(full) for _ in range(60)]  # several epochs and windows
    assert full.epoch >= 2
    for stop in (1, 5, 23, 41):
        s = make()
        head = [next(s) for _ in range(stop)]
        buf = io.BytesIO()
        torch.save(s.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        resumed = make()
        calls = _count_forwards(pair, monkeypatch)
        resumed.load_state_dict(state)
        first = next(resumed)
        if kind == "model":  # repositioned by rebuilding one window, not by replaying batches
            assert calls["rows"] <= ROWS
        tail = [first] + [next(resumed) for _ in range(60 - stop - 1)]
        monkeypatch.undo()
        assert all(torch.equal(x, y) for x, y in zip(head + tail, ref)), (
            f"resume after {stop} batches differs"
        )
        assert resumed.n_batches == 60 and resumed.n_tokens_served == 60 * 7
    # the order is a function of the seed
    other = (
        PairedActivationsStore.from_cache(
            cache_of(pair, tmp_path), mask_config=MASKS, **{**common, "seed": 12}
        )
        if kind == "cache"
        else on_the_fly(pair, **{**common, "seed": 12})
    )
    assert not torch.equal(next(other), ref[0])


def test_store_resume_errors(pair: PairedModel, tmp_path: Path) -> None:
    store = PairedActivationsStore.from_cache(cache_of(pair, tmp_path), batch_size=7, seed=1)
    next(store)
    with pytest.raises(RuntimeError, match="fresh store"):
        store.load_state_dict(store.state_dict())
    other = PairedActivationsStore.from_cache(cache_of(pair, tmp_path), batch_size=7, seed=2)
    with pytest.raises(ValueError, match="seed=1"):
        other.load_state_dict(store.state_dict())


def test_cache_dtype_is_validated(tmp_path: Path) -> None:
    d = {
        "model_name": "t-ft",
        "base_model_name": "t-base",
        "smoke_test_models": {
            "n_layers": 1,
            "d_model": 16,
            "n_heads": 4,
            "d_vocab": 48,
            "n_ctx": 16,
        },
        "model_from_pretrained_kwargs": {},
        "hook_name": "blocks.0.hook_resid_post",
        "context_size": 16,
        "training_tokens": 256,
        "train_batch_size_tokens": 16,
        "sae": {"architecture": "batchtopk_crosscoder", "d_in": 16, "d_sae": 32, "k": 4},
    }
    with pytest.raises(ConfigError, match="cache_dtype='fp8'.*bfloat16"):
        config_from_dict({**d, "cache_dtype": "fp8"})
    with pytest.raises(ConfigError, match="cache_rows_per_shard"):
        config_from_dict({**d, "cache_rows_per_shard": 0})


def test_issue_example_row_is_masked_alike(pair: PairedModel, tmp_path: Path) -> None:
    """``mask_first_n: 2, mask_bos: true`` on the packed row ``[BOS a b c d BOS e f g h]``:
    both paths drop positions 0-1 (the row start) and the second BOS, and keep ``e``."""
    from helpers_models import make_tokenizer

    from sae_diff.data.sources import TensorTokenSource

    tok = make_tokenizer()
    ids = (
        tok("abcd", add_special_tokens=False)["input_ids"],
        tok("efgh", add_special_tokens=False)["input_ids"],
    )
    row = torch.tensor([[BOS_ID, *ids[0], BOS_ID, *ids[1]]] * 3)
    masks = MaskConfig(first_n=2, exclude_high_norm=False)
    src = TensorTokenSource(row)
    harvest_cache(
        pair,
        src,
        tmp_path / "c",
        HOOK,
        batch_size=2,
        rows_per_shard=2,
        mask_config=masks,
        progress=False,
        verbose=False,
    )
    expected = torch.tensor([False, False, True, True, True, False, True, True, True, True])
    disk = [shard_keep(ActivationCache(tmp_path / "c").load_shard(i), masks) for i in range(2)]
    fly = [
        shard_keep(s, masks)
        for s in model_shards(pair, src, HOOK, batch_size=2, rows_per_shard=2, mask_config=masks)
    ]
    for keep in (torch.cat(disk), torch.cat(fly)):
        assert torch.equal(keep, expected.expand(3, -1))
