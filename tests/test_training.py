"""Training runner: config validation, dry-run plans, end-to-end runs, exact resume."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE

import sae_diff  # noqa: F401
from sae_diff.data.store import PairedActivationsStore
from sae_diff.training import data as tdata
from sae_diff.training.config import ConfigError, config_from_dict, make_plan, parse_config
from sae_diff.training.runner import (
    SAE_DIFF_STATE_FILENAME,
    PairedSAETrainingRunner,
    find_checkpoint,
)
from sae_diff.training.trainer import TrainingInterrupted

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

ARCHS: dict[str, dict[str, Any]] = {
    "batchtopk_crosscoder": {
        "architecture": "batchtopk_crosscoder",
        "d_in": 16,
        "d_sae": 48,
        "k": 4,
        "threshold_ema_decay": 0.9,
    },
    "crosscoder": {
        "architecture": "crosscoder",
        "d_in": 16,
        "d_sae": 48,
        "l1_coefficient": 0.5,
        "l1_warm_up_steps": 6,
    },
    "batchtopk_diff_sae": {
        "architecture": "batchtopk_diff_sae",
        "d_in": 16,
        "d_sae": 48,
        "k": 4,
        "normalize_activations": "expected_average_only_in",
    },
}


def tiny(tmp_path: Path, arch: str = "batchtopk_crosscoder", **over: Any) -> dict[str, Any]:
    """A tiny smoke-test run: 2-layer d=16 random pair, 16 steps of 128 tokens."""
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
        "store_batch_size_prompts": 8,
        "training_tokens": 2048,
        "train_batch_size_tokens": 128,
        "lr": 3e-3,
        "lr_scheduler_name": "cosineannealing",
        "lr_warm_up_steps": 3,
        "dead_feature_window": 4,
        "feature_sampling_window": 5,
        "n_batches_for_norm_estimate": 2,
        "n_norm_batches": 2,
        "n_eval_batches": 1,
        "eval_at_end": False,
        "verbose": False,
        "seed": 7,
        "sae": dict(ARCHS[arch]),
        "checkpoint_path": str(tmp_path / "ckpt"),
        "output_path": str(tmp_path / "out"),
    }
    d.update(over)
    return d


def weights(sae: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


# ---------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sae": {"architecture": "nope", "d_in": 16, "d_sae": 48}}, "Unknown architecture 'nope'"),
        ({"sae": {**ARCHS["batchtopk_crosscoder"], "d_in": 24}}, "sae.d_in=24 does not match hook"),
        ({"sae": {**ARCHS["batchtopk_crosscoder"], "k": 49}}, "0 < k <= d_sae"),
        ({"sae": {**ARCHS["batchtopk_diff_sae"], "k": 100}}, "k"),
        ({"store_mode": "diff"}, "is a crosscoder"),
        ({"sae": ARCHS["batchtopk_diff_sae"], "store_mode": "paired"}, "is a diff-SAE"),
        (
            {
                "sae": {"architecture": "batchtopk", "d_in": 16, "d_sae": 48, "k": 4},
                "store_mode": "paired",
            },
            "one-model SAE",
        ),
        ({"hook_name": "blocks.5.hook_resid_post"}, "names layer 5"),
        ({"lr_warmup_steps": 3}, "Unknown config field"),
        ({"training_tokens": 64}, "at least one batch"),
        (
            {"smoke_test_models": None, "base_model_name": "", "dataset_path": "x"},
            "base_model_name is empty",
        ),
    ],
)
def test_bad_configs_fail_clearly(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**tiny(tmp_path), **change})


def test_missing_dataset_column_fails_before_models_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"content_x": f"row {i}"}) for i in range(3)))
    cfg = config_from_dict({**tiny(tmp_path), "dataset_path": str(data), "dataset_column": "text"})

    def no_models(*a: Any, **k: Any) -> Any:
        raise AssertionError("models were loaded before the data check")

    monkeypatch.setattr(tdata, "load_pair", no_models)
    monkeypatch.setattr("sae_diff.training.runner.load_pair", no_models)
    with pytest.raises(tdata.TrainingDataError, match=r"no column 'text'.*content_x"):
        PairedSAETrainingRunner(cfg).run()


# ---------------------------------------------------------------------- parsing, plans
def test_flags_override_file_and_architecture_switch(tmp_path: Path) -> None:
    cfg = parse_config(
        CONFIGS / "smoke_test_crosscoder.yaml",
        ["--lr", "2e-3", "--k", "16", "--noise", "0.5", "--log_to_wandb", "false"],
    )
    assert cfg.lr == 2e-3 and cfg.sae.k == 16 and cfg.smoke_test_models.noise == 0.5
    assert cfg.store_mode == "paired" and cfg.architecture == "batchtopk_crosscoder"
    with pytest.raises(ConfigError, match="Unrecognised flag"):
        parse_config(CONFIGS / "smoke_test_crosscoder.yaml", ["--not_a_field", "1"])
    # the same file as an L1 crosscoder: its flags exist, k does not
    with pytest.warns(UserWarning, match="ignoring the file.s sae fields"):
        l1 = parse_config(
            CONFIGS / "smoke_test_crosscoder.yaml",
            ["--l1_coefficient", "3"],
            architecture="crosscoder",
        )
    assert l1.architecture == "crosscoder" and l1.sae.l1_coefficient == 3


def test_config_round_trips_through_dict(tmp_path: Path) -> None:
    cfg = config_from_dict(tiny(tmp_path, "batchtopk_diff_sae"))
    again = type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.to_dict() == cfg.to_dict()


def test_plan_of_gemma_recipe() -> None:
    cfg = parse_config(CONFIGS / "gemma2_2b_batchtopk_crosscoder_l13.yaml")
    plan = make_plan(cfg)
    assert (plan.d_in, plan.d_sae, plan.k, plan.store_mode) == (2304, 73728, 100, "paired")
    assert plan.base_model == "google/gemma-2-2b" and plan.ft_model == "google/gemma-2-2b-it"
    assert plan.n_parameters == 2 * 2 * 2304 * 73728 + 73728 + 2 * 2304
    assert plan.cache_bytes == 100_000_000 * 2 * 2304 * 2  # both models, bfloat16
    assert plan.total_steps == 100_000_000 // 2048
    # the cache is sized in its storage dtype, not the models' dtype
    halved = make_plan(
        parse_config(
            CONFIGS / "gemma2_2b_batchtopk_crosscoder_l13.yaml",
            ["--dtype", "float32", "--cache_dtype", "bfloat16"],
        )
    )
    assert halved.cache_bytes == plan.cache_bytes
    full = make_plan(
        parse_config(
            CONFIGS / "gemma2_2b_batchtopk_crosscoder_l13.yaml",
            ["--dtype", "bfloat16", "--cache_dtype", "float32"],
        )
    )
    assert full.cache_bytes == 2 * plan.cache_bytes


# ---------------------------------------------------------------------- training
def test_train_writes_saelens_output_and_eval(tmp_path: Path) -> None:
    cfg = config_from_dict(tiny(tmp_path, n_checkpoints=1, eval_at_end=True))
    runner = PairedSAETrainingRunner(cfg)
    runner.run()
    out = Path(cfg.output_path)
    assert {
        "cfg.json",
        "sae_weights.safetensors",
        "sparsity.safetensors",
        "runner_cfg.json",
        "eval.json",
    } <= set(os.listdir(out))
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], (
        "temporary folders left behind"
    )
    m = runner.eval_metrics
    for key in (
        "metrics/fve_base",
        "metrics/fve_ft",
        "metrics/l0",
        "sparsity/dead_fraction_eval",
        "delta/ft_only",
        "model_performance_preservation/loss_recovered_ft",
    ):
        assert key in m
    assert (
        sum(m[f"delta/{t}"] for t in ("ft_only", "base_only", "shared", "other")) == cfg.sae.d_sae
    )
    loaded = SAE.load_from_disk(out)
    md = loaded.cfg.metadata
    assert (md.base_model_name, md.model_name, md.hook_name) == (
        "tiny-base",
        "tiny-ft",
        cfg.hook_name,
    )
    x = torch.randn(5, 2, 16)
    torch.testing.assert_close(loaded(x), runner.inference_sae(x))
    # the exported inference dictionary reconstructs raw activations like the training one
    # (before training's last threshold update they differ only by the JumpReLU threshold)
    assert m["metrics/fve_base"] > 0.0 and m["metrics/fve_ft"] > 0.0


@pytest.mark.parametrize("arch", list(ARCHS))
def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path: Path, arch: str) -> None:
    full = PairedSAETrainingRunner(config_from_dict(tiny(tmp_path / "a", arch)))
    w_full = weights(full.run())

    cfg = config_from_dict(tiny(tmp_path / "b", arch))
    with pytest.raises(TrainingInterrupted) as info:
        PairedSAETrainingRunner(cfg).run(stop_after_steps=7)
    ckpt = info.value.checkpoint
    assert (
        ckpt is not None
        and ckpt.name == str(7 * 128)
        and find_checkpoint(cfg.checkpoint_path) == ckpt
    )
    resumed = PairedSAETrainingRunner.from_checkpoint(cfg.checkpoint_path)
    w_res = weights(resumed.run())
    assert resumed.trainer is not None and resumed.trainer.n_training_steps == 16
    assert w_full.keys() == w_res.keys()
    for k in w_full:
        assert torch.equal(w_full[k], w_res[k]), f"{arch}: {k} differs after resume"

    # control: resuming with the data position lost gives different weights
    state = torch.load(ckpt / SAE_DIFF_STATE_FILENAME, weights_only=True)
    pos = state["provider"]
    assert pos["n_batches"] == 2 + 7  # 2 norm-estimation batches, then 7 steps
    pos.update(epoch=0, pos=0, window=0, served=0, epoch_tokens=0, carry=pos["carry"][:0])
    torch.save(state, ckpt / SAE_DIFF_STATE_FILENAME)
    wrong = weights(
        PairedSAETrainingRunner.from_checkpoint(ckpt, output_path=str(tmp_path / "c")).run()
    )
    assert any(not torch.equal(w_full[k], wrong[k]) for k in w_full)


def test_resume_from_periodic_checkpoint(tmp_path: Path) -> None:
    cfg = config_from_dict(tiny(tmp_path, n_checkpoints=2))
    runner = PairedSAETrainingRunner(cfg)
    w_full = weights(runner.run())
    ckpts = sorted(p.name for p in Path(cfg.checkpoint_path).iterdir())
    assert ckpts == ["1408", "768"]  # SAELens's thresholds, counted in samples
    for name in ckpts:
        assert {
            "sae_weights.safetensors",
            "cfg.json",
            "trainer_state.pt",
            "activation_scaler.json",
            SAE_DIFF_STATE_FILENAME,
            "runner_cfg.json",
        } <= set(os.listdir(Path(cfg.checkpoint_path) / name))
    resumed = PairedSAETrainingRunner.from_checkpoint(
        Path(cfg.checkpoint_path) / "768", output_path=str(tmp_path / "out2")
    )
    w_res = weights(resumed.run())
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)


def test_sigint_checkpoints_at_a_step_boundary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config_from_dict(tiny(tmp_path, "crosscoder"))
    real = PairedActivationsStore.__next__
    sent = {"done": False}

    def next_with_signal(self: Any) -> torch.Tensor:
        # crosscoders draw n_norm_batches=2 batches first; interrupt during step 5
        if self.n_batches == 2 + 4 and not sent["done"]:
            sent["done"] = True
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    monkeypatch.setattr(PairedActivationsStore, "__next__", next_with_signal)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the test runs as a background job
    with pytest.raises(TrainingInterrupted) as info:
        PairedSAETrainingRunner(cfg).run()
    assert info.value.checkpoint is not None and info.value.n_steps == 5
    assert signal.getsignal(signal.SIGINT) is before  # the runner restores the caller's handler
    monkeypatch.setattr(PairedActivationsStore, "__next__", real)
    w_res = weights(PairedSAETrainingRunner.from_checkpoint(info.value.checkpoint).run())
    w_full = weights(
        PairedSAETrainingRunner(config_from_dict(tiny(tmp_path / "full", "crosscoder"))).run()
    )
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
def test_train_from_disk_cache_and_resume(tmp_path: Path, cache_dtype: str) -> None:
    common = {
        "cache_path": str(tmp_path / "cache"),
        "eval_loss_recovered": False,
        "n_batches_in_buffer": 4,
        "cache_dtype": cache_dtype,
    }
    full = PairedSAETrainingRunner(
        config_from_dict(tiny(tmp_path / "a", "batchtopk_diff_sae", **common))
    )
    w_full = weights(full.run())
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["meta"]["dtype"] == cache_dtype
    cfg = config_from_dict(tiny(tmp_path / "b", "batchtopk_diff_sae", **common))
    with pytest.raises(TrainingInterrupted):
        PairedSAETrainingRunner(cfg).run(stop_after_steps=9)
    resumed = PairedSAETrainingRunner.from_checkpoint(cfg.checkpoint_path)
    w_res = weights(resumed.run())
    assert resumed.pair is None  # the cache alone resumes the run: no model was loaded
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
