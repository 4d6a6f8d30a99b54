"""PairedActivationsStore: modes, masks, shuffling buffer, cache and on-the-fly sources, and
feeding SAELens's SAETrainer (the cached vs on-the-fly equality and resume: test_pipeline.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_models import random_tokens
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

from sae_diff.data.harvest import harvest_cache
from sae_diff.data.sources import TensorTokenSource
from sae_diff.data.store import PairedActivationsStore, select_mode
from sae_diff.pairing.masks import MaskConfig
from sae_diff.pairing.model import PairedModel

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def cache_dir(pair: PairedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache")
    harvest_cache(
        pair,
        TensorTokenSource(random_tokens(24, 12, seed=5)),
        out,
        HOOK,
        rows_per_shard=8,
        batch_size=4,
        progress=False,
        verbose=False,
    )
    return out


def test_select_mode() -> None:
    x = torch.randn(5, 2, 3)
    assert select_mode(x, "paired") is x
    torch.testing.assert_close(select_mode(x, "base"), x[:, 0])
    torch.testing.assert_close(select_mode(x, "ft"), x[:, 1])
    torch.testing.assert_close(select_mode(x, "diff"), x[:, 1] - x[:, 0])
    torch.testing.assert_close(select_mode(x, "diff", "base_minus_ft"), x[:, 0] - x[:, 1])


@pytest.mark.parametrize("mode", ["paired", "diff", "base", "ft"])
def test_cache_store_shapes_and_coverage(cache_dir: Path, pair: PairedModel, mode: str) -> None:
    store = PairedActivationsStore.from_cache(
        cache_dir, mode=mode, batch_size=16, buffer_size=64, loop=False
    )
    batches = list(store)
    shape = (16, 2, pair.d_model) if mode == "paired" else (16, pair.d_model)
    assert all(b.shape == shape for b in batches)
    # one epoch serves every kept token (24 rows x 11 non-BOS tokens) up to a partial batch
    assert 24 * 11 - 16 < sum(b.shape[0] for b in batches) <= 24 * 11


def test_store_is_shuffled_and_masked(cache_dir: Path, pair: PairedModel) -> None:
    toks = random_tokens(24, 12, seed=5)
    full = pair.paired_activations(toks, [HOOK])[HOOK]
    bos_rows = full[:, 0].reshape(-1, 2, pair.d_model)
    store = PairedActivationsStore.from_cache(
        cache_dir, batch_size=24 * 11, buffer_size=24 * 11, loop=False
    )
    (batch,) = list(store)
    # no BOS activation survives; the batch is a permutation of the kept tokens
    assert not (batch[:, None] == bos_rows[None]).all(-1).all(-1).any()
    kept = full[:, 1:].reshape(-1, 2, pair.d_model)
    torch.testing.assert_close(batch.sum(0), kept.sum(0), rtol=1e-5, atol=1e-4)
    assert not torch.equal(batch, kept)
    # first-n recomputed from document starts at read time
    s2 = PairedActivationsStore.from_cache(
        cache_dir, mask_config=MaskConfig(first_n=3), batch_size=8, buffer_size=8, loop=False
    )
    assert sum(b.shape[0] for b in s2) == 24 * 9


def test_store_loops_epochs(cache_dir: Path) -> None:
    store = PairedActivationsStore.from_cache(cache_dir, mode="ft", batch_size=100, buffer_size=200)
    for _ in range(8):  # 8 x 100 > 264 kept tokens: needs several epochs
        assert next(store).shape == (100, 16)
    assert store.epoch >= 2 and store.n_tokens_served == 800
    assert store.scaling_factors().shape == (2,)


def test_store_from_model_matches_cache(pair: PairedModel) -> None:
    toks = random_tokens(6, 12, seed=7)
    store = PairedActivationsStore.from_model(
        pair,
        TensorTokenSource(toks),
        HOOK,
        store_batch_size_prompts=2,
        mode="diff",
        diff_sign="base_minus_ft",
        batch_size=66,
        buffer_size=66,
        loop=False,
    )
    (batch,) = list(store)
    full = pair.paired_activations(toks, [HOOK])[HOOK][:, 1:]
    expected = (full[..., 0, :] - full[..., 1, :]).reshape(-1, pair.d_model)
    torch.testing.assert_close(batch.sum(0), expected.sum(0), rtol=1e-5, atol=1e-4)


def test_store_bad_inputs(cache_dir: Path, pair: PairedModel) -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        PairedActivationsStore.from_cache(cache_dir, mode="chat")
    with pytest.raises(ValueError, match="diff_sign"):
        PairedActivationsStore.from_cache(cache_dir, mode="diff", diff_sign="ft-base")
    with pytest.raises(ValueError, match="buffer_size"):
        PairedActivationsStore.from_cache(cache_dir, batch_size=10, buffer_size=5)
    with pytest.raises(KeyError, match="unknown hook"):
        PairedActivationsStore.from_model(
            pair, TensorTokenSource(random_tokens()), "blocks.5.hook_x"
        )
    empty = PairedActivationsStore.from_model(
        pair, TensorTokenSource(random_tokens(2, 1)), HOOK, batch_size=4, buffer_size=4
    )
    with pytest.raises(ValueError, match="no tokens after masking"):
        next(empty)


def _trainer_cfg(steps: int, batch: int) -> SAETrainerConfig:
    return SAETrainerConfig(
        total_training_samples=steps * batch,
        train_batch_size_samples=batch,
        lr=1e-3,
        lr_end=1e-3,
        n_batches_for_norm_estimate=2,
    )


@pytest.mark.parametrize("mode", ["base", "ft", "diff"])
def test_store_feeds_saetrainer(cache_dir: Path, mode: str) -> None:
    store = PairedActivationsStore.from_cache(cache_dir, mode=mode, batch_size=32, buffer_size=128)
    sae = BatchTopKTrainingSAE(
        BatchTopKTrainingSAEConfig(
            d_in=16, d_sae=32, k=4, normalize_activations="expected_average_only_in"
        )
    )
    w0 = sae.W_enc.detach().clone()
    trained = SAETrainer(_trainer_cfg(5, 32), sae, store).fit()
    assert not torch.equal(trained.W_enc.detach(), w0)
    assert store.n_tokens_served >= 5 * 32


def test_store_feeds_crosscoder_trainer(cache_dir: Path) -> None:
    bt = pytest.importorskip("sae_diff.dictionaries.batchtopk_crosscoder")
    store = PairedActivationsStore.from_cache(
        cache_dir, mode="paired", batch_size=32, buffer_size=128
    )
    cc = bt.BatchTopKCrosscoderTraining(
        bt.BatchTopKCrosscoderTrainingConfig(d_in=16, d_sae=32, k=4)
    )
    w0 = cc.W_enc.detach().clone()
    trained = SAETrainer(_trainer_cfg(4, 32), cc, store).fit()
    assert not torch.equal(trained.W_enc.detach(), w0)


def test_callable_blocks_window_shuffle_and_resume() -> None:
    """Direct construction: every window is a seeded permutation of its tokens (plus the
    carried remainder), and a fresh store resumes from state_dict (replaying the epoch's
    earlier blocks of a plain callable)."""
    x = torch.arange(40 * 2 * 3, dtype=torch.float64).reshape(40, 2, 3)

    def make() -> PairedActivationsStore:
        return PairedActivationsStore(
            lambda epoch: iter([x[:15], x[15:22], x[22:]]),
            d_model=3,
            batch_size=6,
            buffer_size=12,
            seed=4,
        )

    store = make()
    batches = [next(store) for _ in range(20)]
    # epoch 1 (window 1: blocks 0, 15 tokens -> 2 batches, 3 carried; ...): tokens served
    # exactly once per epoch except the < 1 batch remainder
    first = torch.cat(batches[:6])[:, 0, 0].long() // 6
    assert len(set(first.tolist())) == 36 and set(first.tolist()) <= set(range(40))
    assert not torch.equal(torch.cat(batches[:2]), x[:12])  # shuffled
    s2 = make()
    for _ in range(7):
        next(s2)
    resumed = make()
    resumed.load_state_dict(s2.state_dict())
    assert all(torch.equal(next(resumed), b) for b in batches[7:])
