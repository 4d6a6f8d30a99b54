"""Distributed runs on torch.distributed (gloo, 2 CPU processes launched with torchrun).

One torchrun launch of 2 processes (``tests/distributed_driver.py``, which runs
``sae-diff harvest`` and ``sae-diff train`` through the CLI) harvests the cache sharded
(each rank writes its own shards, rank 0 commits the manifest) and trains data-parallel; it
must equal the one-process run of the same config: the same cache files byte for byte and
the same manifest (statistics included), the same trained dictionary to float tolerance
(BatchTopK threshold included), and a checkpoint written by the 2-process run must resume
in one process to the same result, and a one-process checkpoint in 2 processes (the data
order does not depend on the world size).
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
        "model_name": "tiny-ft",
        "base_model_name": "tiny-base",
        "smoke_test_models": {
            "n_layers": 2,
            "d_model": 16,
            "n_heads": 4,
            "d_vocab": 48,
            "n_ctx": 16,
        },
        "model_from_pretrained_kwargs": {},
        "hook_name": "blocks.0.hook_resid_post",
        "context_size": 16,
        "store_batch_size_prompts": 4,
        "cache_rows_per_shard": 8,
        "n_batches_in_buffer": 2,
        "training_tokens": 1536,
        "train_batch_size_tokens": 128,
        "lr": 3e-3,
        "lr_warm_up_steps": 2,
        "dead_feature_window": 3,
        "feature_sampling_window": 5,
        "n_norm_batches": 2,
        "n_eval_batches": 1,
        "eval_at_end": False,
        "verbose": False,
        "seed": 11,
        "n_checkpoints": 1,
        "sae": {
            "architecture": "batchtopk_crosscoder",
            "d_in": 16,
            "d_sae": 64,
            "k": 4,
            "threshold_ema_decay": 0.9,
            "threshold_start_step": 0,
            "aux_loss_coefficient": 0.0,
        },
        "cache_path": str(tmp / f"cache_{name}"),
        "checkpoint_path": str(tmp / f"ckpt_{name}"),
        "output_path": str(tmp / f"out_{name}"),
    }
    d.update(over)
    return d


def torchrun(
    args: list[str], nproc: int = 2, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *args,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return proc


def shard_files(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.glob("shard_*.safetensors"))}


def manifest(cache: Path) -> dict[str, Any]:
    return json.loads((cache / "manifest.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The 1-process run (in this process), then ONE torchrun launch of 2 processes
    (``tests/distributed_driver.py``): resume a sharded harvest that lost a shard, train the
    same config data-parallel (sharded harvest first), check the global BatchTopK."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("dist")
    one = run_config(tmp, "one")
    runner = PairedSAETrainingRunner(config_from_dict(one))
    runner.run()
    # an interrupted sharded harvest: every shard but one on disk, no manifest yet
    resume_dir = tmp / "cache_resume"
    resume_dir.mkdir()
    for name, data in shard_files(Path(one["cache_path"])).items():
        if name != "shard_00002.safetensors":
            (resume_dir / name).write_bytes(data)
    stamps = {p.name: p.stat().st_mtime_ns for p in resume_dir.glob("shard_*.safetensors")}
    two = run_config(tmp, "two")
    (tmp / "two.yaml").write_text(yaml.safe_dump(two))
    (tmp / "resume.yaml").write_text(yaml.safe_dump({**two, "cache_path": str(resume_dir)}))
    one_ckpt = sorted(
        p.parent
        for p in Path(one["checkpoint_path"]).rglob("trainer_state.pt")
        if not p.parent.name.startswith("final")
    )[0]
    proc = torchrun(
        [
            str(ROOT / "tests" / "distributed_driver.py"),
            str(tmp / "resume.yaml"),
            str(tmp / "two.yaml"),
            str(tmp / "topk.json"),
            str(one_ckpt),
            str(tmp / "out_resumed_by_two"),
        ]
    )
    return {
        "tmp": tmp,
        "one": one,
        "two": two,
        "runner": runner,
        "proc": proc,
        "resume_dir": resume_dir,
        "stamps": stamps,
    }


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
    # training's harvest: rank 0 computes shards 0, 2, 4, ...: half of them (rounded up);
    # the resumed harvest: only the lost shard 2, which is rank 0's
    n = len(shard_files(Path(runs["two"]["cache_path"])))
    assert f"this rank computed {(n + 1) // 2} shards" in out
    assert "this rank computed 1 shards" in out


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
    assert torch.equal(
        stats_one["n_forward_passes_since_fired"], stats_two["n_forward_passes_since_fired"]
    )
    assert torch.equal(stats_one["act_freq_scores"], stats_two["act_freq_scores"])
    assert stats_one["n_training_samples"] == stats_two["n_training_samples"]
    # non-trivial: some latents were silent on the whole global batch (MIN over ranks matters)
    assert int((stats_one["n_forward_passes_since_fired"] > 0).sum()) > 0
    assert float(stats_one["act_freq_scores"].sum()) > 0


def test_two_process_checkpoint_resumes_in_one_process(runs: dict[str, Any]) -> None:
    tmp = runs["tmp"]
    ck = sorted(
        p.parent
        for p in Path(runs["two"]["checkpoint_path"]).rglob("trainer_state.pt")
        if not p.parent.name.startswith("final")
    )
    assert ck, "the 2-process run wrote no intermediate checkpoint"
    resumed = PairedSAETrainingRunner.from_checkpoint(
        ck[0], output_path=str(tmp / "out_resumed"), checkpoint_path=str(tmp / "ckpt_resumed")
    )
    resumed.run()
    mid = _weights(ck[0])
    assert resumed.sae is not None
    assert (mid["W_dec"] - resumed.sae.W_dec.detach()).abs().max() > 1e-3, (
        "nothing trained after the checkpoint"
    )
    a = _weights(Path(runs["one"]["output_path"]))
    b = _weights(tmp / "out_resumed")
    assert set(a) == set(b) and "threshold" in a
    for k in a:
        close(b[k], a[k], k)


def test_one_process_checkpoint_resumes_in_two_processes(runs: dict[str, Any]) -> None:
    a = _weights(Path(runs["one"]["output_path"]))
    b = _weights(runs["tmp"] / "out_resumed_by_two")
    assert set(a) == set(b) and "threshold" in a
    for k in a:
        close(b[k], a[k], k)


def test_store_slices_partition_the_global_batch(runs: dict[str, Any]) -> None:
    cache = runs["one"]["cache_path"]
    full = PairedActivationsStore.from_cache(cache, batch_size=64, buffer_size=128, seed=3)
    parts = [
        PairedActivationsStore.from_cache(
            cache, batch_size=64, buffer_size=128, seed=3, rank=r, world_size=2
        )
        for r in range(2)
    ]
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


def test_interrupted_sharded_harvest_resumes(runs: dict[str, Any]) -> None:
    """`sae-diff harvest` under torchrun on a folder that lost a shard and has no manifest yet
    (a rank stopped before the commit) recomputes only that shard and commits the same cache."""
    folder, src = runs["resume_dir"], Path(runs["one"]["cache_path"])
    assert shard_files(folder) == shard_files(src)
    assert manifest(folder) == manifest(src)
    stamps = runs["stamps"]
    assert all(
        p.stat().st_mtime_ns == stamps[p.name]
        for p in folder.glob("shard_*.safetensors")
        if p.name in stamps
    )


def test_global_batch_topk_equals_one_process_selection(runs: dict[str, Any]) -> None:
    """Planted scores over 2 ranks: the kept set is the one-process kernel's flat top-K, ties
    included, also when one rank holds most of it (the exact fallback), and on the dense path
    (``tests/distributed_driver.py::check_global_topk``)."""
    result = json.loads((runs["tmp"] / "topk.json").read_text())
    assert result["ok"], result.get("error")
