"""Distributed runs on torch.distributed (gloo, 2 CPU processes launched with torchrun).

One ``torchrun --nproc_per_node=2 -m sae_diff.cli train`` run harvests the cache sharded
(each rank writes its own shards, rank 0 commits the manifest) and trains data-parallel; it
must equal the one-process run of the same config: the same cache files byte for byte and
the same manifest (statistics included), the same trained dictionary to float tolerance
(BatchTopK threshold included), and a checkpoint written by the 2-process run must resume
in one process to the same result (the data order does not depend on the world size).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

import sae_diff  # noqa: F401
from sae_diff.data.store import PairedActivationsStore
from sae_diff.training.config import config_from_dict
from sae_diff.training.runner import PairedSAETrainingRunner

ROOT = Path(__file__).resolve().parents[1]


def run_config(tmp: Path, name: str, **over: Any) -> dict[str, Any]:
    """A tiny BatchTopK crosscoder run (smoke-test pair, d=16, 12 steps of 128 tokens).

    The aux-K coefficient is 0: the aux loss is normalised by each rank's local residual
    variance (documented in sae_diff.training.distributed), which is not the one-process loss;
    with it on, two latents of this run differ by up to 2.7e-4 after 12 steps."""
    d: dict[str, Any] = {
        "model_name": "tiny-ft", "base_model_name": "tiny-base",
        "smoke_test_models": {"n_layers": 2, "d_model": 16, "n_heads": 4, "d_vocab": 48, "n_ctx": 16},
        "model_from_pretrained_kwargs": {},
        "hook_name": "blocks.0.hook_resid_post", "context_size": 16, "store_batch_size_prompts": 4,
        "cache_rows_per_shard": 8, "n_batches_in_buffer": 2,
        "training_tokens": 1536, "train_batch_size_tokens": 128, "lr": 3e-3, "lr_warm_up_steps": 2,
        "dead_feature_window": 3, "feature_sampling_window": 5, "n_norm_batches": 2, "n_eval_batches": 1,
        "eval_at_end": False, "verbose": False, "seed": 11, "n_checkpoints": 1,
        "sae": {"architecture": "batchtopk_crosscoder", "d_in": 16, "d_sae": 64, "k": 4,
                "threshold_ema_decay": 0.9, "threshold_start_step": 0, "aux_loss_coefficient": 0.0},
        "cache_path": str(tmp / f"cache_{name}"), "checkpoint_path": str(tmp / f"ckpt_{name}"),
        "output_path": str(tmp / f"out_{name}"),
    }
    d.update(over)
    return d


def torchrun(args: list[str], nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def shard_files(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.glob("shard_*.safetensors"))}


def manifest(cache: Path) -> dict[str, Any]:
    return json.loads((cache / "manifest.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The 1-process run (in this process) and the 2-process torchrun run of one config."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("dist")
    one = run_config(tmp, "one")
    runner = PairedSAETrainingRunner(config_from_dict(one))
    runner.run()
    two = run_config(tmp, "two")
    cfg_file = tmp / "two.yaml"
    cfg_file.write_text(yaml.safe_dump(two))
    proc = torchrun(["-m", "sae_diff.cli", "train", "--config", str(cfg_file)])
    return {"tmp": tmp, "one": one, "two": two, "runner": runner, "proc": proc}


def test_sharded_harvest_equals_one_process_harvest(runs: dict[str, Any]) -> None:
    one, two = Path(runs["one"]["cache_path"]), Path(runs["two"]["cache_path"])
    a, b = shard_files(one), shard_files(two)
    assert len(a) >= 4 and list(a) == list(b)  # several shards, so both ranks wrote some
    for name in a:
        assert a[name] == b[name], f"{name} differs between the 1- and 2-process harvests"
    assert manifest(one) == manifest(two)  # rows, checksums, merged RunningStats: identical
    assert not list(two.glob("*.tmp"))


def test_ranks_wrote_disjoint_shards(runs: dict[str, Any]) -> None:
    out = runs["proc"].stdout + runs["proc"].stderr
    assert "2 processes; this rank computed" in out, out[-2000:]
    # rank 0 computes shards 0, 2, 4, ...: it reports half of them (rounded up)
    n = len(shard_files(Path(runs["two"]["cache_path"])))
    assert f"this rank computed {(n + 1) // 2} shards" in out


def close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Equal to float32 rounding (the 2-process sums of gradients round differently)."""
    err = (got.double() - want.double()).abs().max().item()
    assert torch.allclose(got, want, rtol=2e-4, atol=2e-5), f"{name}: max abs difference {err:.3g}"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "sae_weights.safetensors"))


def test_two_process_training_equals_one_process(runs: dict[str, Any]) -> None:
    a = _weights(Path(runs["one"]["output_path"]))
    b = _weights(Path(runs["two"]["output_path"]))
    assert set(a) == set(b) and "threshold" in a
    for k in a:
        close(b[k], a[k], k)
    # the run actually learnt something (not two copies of the initialisation)
    ck = sorted(p for p in Path(runs["one"]["checkpoint_path"]).rglob("trainer_state.pt"))
    assert ck, "the one-process run wrote no checkpoint"
    stats_one = torch.load(ck[-1].parent / "trainer_state.pt", weights_only=True)
    ck2 = sorted(Path(runs["two"]["checkpoint_path"]).rglob("trainer_state.pt"))
    stats_two = torch.load(ck2[-1].parent / "trainer_state.pt", weights_only=True)
    # SAELens's dead-latent statistics reduced across ranks: the same firing counts
    assert torch.equal(stats_one["n_forward_passes_since_fired"], stats_two["n_forward_passes_since_fired"])
    assert torch.equal(stats_one["act_freq_scores"], stats_two["act_freq_scores"])
    assert stats_one["n_training_samples"] == stats_two["n_training_samples"]
    # non-trivial: some latents were silent on the whole global batch (MIN over ranks matters)
    assert int((stats_one["n_forward_passes_since_fired"] > 0).sum()) > 0
    assert float(stats_one["act_freq_scores"].sum()) > 0


def test_two_process_checkpoint_resumes_in_one_process(runs: dict[str, Any]) -> None:
    tmp = runs["tmp"]
    ck = sorted(p.parent for p in Path(runs["two"]["checkpoint_path"]).rglob("trainer_state.pt")
                if not p.parent.name.startswith("final"))
    assert ck, "the 2-process run wrote no intermediate checkpoint"
    resumed = PairedSAETrainingRunner.from_checkpoint(ck[0], output_path=str(tmp / "out_resumed"),
                                                      checkpoint_path=str(tmp / "ckpt_resumed"))
    resumed.run()
    mid = _weights(ck[0])
    assert resumed.sae is not None
    assert (mid["W_dec"] - resumed.sae.W_dec.detach()).abs().max() > 1e-3, "nothing trained after the checkpoint"
    a = _weights(Path(runs["one"]["output_path"]))
    b = _weights(tmp / "out_resumed")
    for k in a:
        close(b[k], a[k], k)


def test_store_slices_partition_the_global_batch(runs: dict[str, Any]) -> None:
    cache = runs["one"]["cache_path"]
    full = PairedActivationsStore.from_cache(cache, batch_size=64, buffer_size=128, seed=3)
    parts = [PairedActivationsStore.from_cache(cache, batch_size=64, buffer_size=128, seed=3, rank=r, world_size=2)
             for r in range(2)]
    for _ in range(5):
        whole = next(full)
        torch.testing.assert_close(torch.cat([next(p) for p in parts]), whole, rtol=0, atol=0)
    assert parts[0].state_dict()["n_tokens_served"] == full.state_dict()["n_tokens_served"]
    with pytest.raises(ValueError, match="divisible"):
        PairedActivationsStore.from_cache(cache, batch_size=63, seed=3, rank=0, world_size=2)


def test_manifest_commit_needs_every_shard(runs: dict[str, Any], tmp_path: Path) -> None:
    """Rank 0 commits only a complete, contiguous set of shards of one configuration."""
    from sae_diff.data.cache import CacheError
    from sae_diff.data.harvest import commit_sharded_manifest

    src = Path(runs["one"]["cache_path"])
    meta = manifest(src)["meta"]
    folder = tmp_path / "partial"
    folder.mkdir()
    for name, data in shard_files(src).items():
        if name != "shard_00001.safetensors":  # one rank did not finish
            (folder / name).write_bytes(data)
    with pytest.raises(CacheError, match="expected shard_00001.safetensors"):
        commit_sharded_manifest(folder, meta)
    assert not (folder / "manifest.json").exists()
    (folder / "shard_00001.safetensors").write_bytes((src / "shard_00001.safetensors").read_bytes())
    with pytest.raises(CacheError, match="another configuration"):
        commit_sharded_manifest(folder, {**meta, "hook_name": "blocks.1.hook_resid_post"})
    assert commit_sharded_manifest(folder, meta) == manifest(src)


# ---------------------------------------------------------------------- global BatchTopK
def _topk_worker(rank: int, world_size: int, init_file: str) -> None:
    """One rank: its slice of a planted global score matrix through the distributed BatchTopK;
    the kept set must be the one-process kernel's flat top-K (ties included)."""
    import torch.distributed as dist

    from sae_diff.dictionaries import kernels
    from sae_diff.training import distributed as sd

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        B, n, k = 12, 40, 3.0
        g = torch.Generator().manual_seed(5)
        scores = torch.randn(B * world_size, n, generator=g)
        scores[B:] *= 3.0  # rank 1 holds most of the top-K: its 1.5K/W offer is too short
        scores[2, :5] = scores[B + 1, :5] = 0.75  # ties across ranks at the selection boundary
        scale = torch.rand(n, generator=g) + 0.5
        K = int(k * B * world_size)
        ref = kernels.batch_topk(scores, K, scale=scale, force_slow=True)
        want = {(int(r), int(c)) for r, c in zip(ref.row, ref.col)}
        mine = scores[rank * B:(rank + 1) * B]
        for margin, n_calls in ((1.5, 2), (100.0, 1)):  # imbalanced: exact fallback; then a full offer
            sd.MARGIN = margin
            record = sd._TopKRecord()
            calls: list[int] = []

            def counted(*a: Any, _calls: list[int] = calls, **kw: Any) -> Any:
                _calls.append(int(a[1]))
                return kernels.batch_topk(*a, **kw)

            sel = sd.global_batch_topk(counted, k, record)(mine, int(k * B), None, scale=scale)
            assert len(calls) == n_calls, f"margin {margin}: offers {calls}"
            got = [(int(r) + rank * B, int(c)) for r, c in zip(sel.row, sel.col)]
            everyone: list[Any] = [None] * world_size
            dist.all_gather_object(everyone, got)
            union = [x for part in everyone for x in part]
            assert len(union) == K and set(union) == want, f"margin {margin}: not the global top-K"
            assert sel.kth_score == ref.kth_score
            assert record.min_positive is not None and float(record.min_positive) == float(ref.scores.min())
        # dense path (distinct scores: torch.topk's tie order is unspecified)
        v = torch.relu(torch.randn(B * world_size, n, generator=g))
        dense_ref = torch.zeros(v.numel(), dtype=torch.bool)
        dense_ref[v.flatten().topk(K).indices] = True
        mask = sd.global_batch_topk_mask(k, sd._TopKRecord())(v[rank * B:(rank + 1) * B], int(k * B))
        parts: list[Any] = [None] * world_size
        dist.all_gather_object(parts, mask)
        assert torch.equal(torch.cat(parts).flatten(), dense_ref)
    finally:
        dist.destroy_process_group()


def test_global_batch_topk_equals_one_process_selection(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_topk_worker, args=(2, str(tmp_path / "pg")), nprocs=2, join=True)
