"""The BatchTopK diff-SAE's sparse training step equals SAELens's dense BatchTopK step."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer

import sae_diff  # noqa: F401  (registers the architectures)
from sae_diff.dictionaries.diff_sae import (
    BatchTopKDiffSAETraining,
    BatchTopKDiffSAETrainingConfig,
)

D_IN, D_SAE, K, B = 16, 3000, 6, 40  # B * D_SAE = 120k: batch_topk's fast path is exercised


def _pair(
    dtype: str = "float64", d_sae: int = D_SAE, k: float = K, **kw: object
) -> tuple[BatchTopKDiffSAETraining, BatchTopKDiffSAETraining]:
    """A sparse-kernel and a dense diff-SAE with identical (perturbed) weights."""
    models = []
    for sparse in (True, False):
        cfg = BatchTopKDiffSAETrainingConfig(
            d_in=D_IN,
            d_sae=d_sae,
            k=k,
            dtype=dtype,
            device="cpu",
            sparse_kernels=sparse,
            **kw,  # type: ignore[arg-type]
        )
        torch.manual_seed(3)
        models.append(BatchTopKDiffSAETraining(cfg))
    sparse_m, dense_m = models
    with torch.no_grad():
        sparse_m.b_enc.normal_(0, 0.05)
        sparse_m.b_dec.normal_(0, 0.1)
        sparse_m.W_dec.mul_(torch.rand(d_sae, 1, dtype=sparse_m.W_dec.dtype) + 0.5)
        sparse_m.topk_threshold.fill_(0.3)  # a plausible hint for the first step's selection
    dense_m.load_state_dict(sparse_m.state_dict())
    return sparse_m, dense_m


def _dead_mask(kind: str) -> torch.Tensor | None:
    if kind == "none":
        return None
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    if kind == "few":  # num_dead < k_aux = d_in // 2: scale = num_dead / k_aux
        dead[[5, 700, 2999]] = True
    else:
        dead[::7] = True
    return dead


def _step(
    m: BatchTopKDiffSAETraining, x: torch.Tensor, dead: torch.Tensor | None, step: int
) -> TrainStepOutput:
    m.zero_grad(set_to_none=True)
    out = m.training_forward_pass(
        TrainStepInput(
            sae_in=x,
            coefficients={},
            dead_neuron_mask=dead,
            n_training_steps=step,
            is_logging_step=False,
        )
    )
    out.loss.backward()
    return out


def _assert_same_step(
    sparse_m: BatchTopKDiffSAETraining,
    dense_m: BatchTopKDiffSAETraining,
    x: torch.Tensor,
    dead: torch.Tensor | None,
    tol: float,
    steps: int = 2,
) -> None:
    for step in range(steps):  # the second step uses the tracked threshold as the hint
        o_s, o_d = _step(sparse_m, x, dead, step), _step(dense_m, x, dead, step)
        assert o_s.feature_acts.is_sparse and o_s.hidden_pre.numel() == 0
        for name in ("mse_loss", "auxiliary_reconstruction_loss"):
            torch.testing.assert_close(o_s.losses[name], o_d.losses[name], rtol=tol, atol=tol)
        torch.testing.assert_close(o_s.loss, o_d.loss, rtol=tol, atol=tol)
        aux = float(o_s.losses["auxiliary_reconstruction_loss"].detach())
        assert (aux > 0) == (dead is not None and bool(dead.any()))
        torch.testing.assert_close(o_s.sae_out, o_d.sae_out, rtol=tol, atol=tol)
        fa = o_s.feature_acts.to_dense()
        fd = o_d.feature_acts.detach()
        assert int((fd != 0).sum()) > 0
        assert torch.equal(fa != 0, fd != 0)
        torch.testing.assert_close(fa, fd, rtol=tol, atol=tol)
        torch.testing.assert_close(
            sparse_m.topk_threshold, dense_m.topk_threshold, rtol=tol, atol=0
        )
        assert o_s.metrics["topk_threshold"] is sparse_m.topk_threshold
        for (name, p_s), (_, p_d) in zip(
            sparse_m.named_parameters(), dense_m.named_parameters(), strict=True
        ):
            assert p_s.grad is not None and p_d.grad is not None, name
            torch.testing.assert_close(p_s.grad, p_d.grad, rtol=tol * 10, atol=tol * 10, msg=name)


def _inputs(dtype: torch.dtype, diff_sign: str, paired: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    pair = torch.randn(B, 2, D_IN, generator=g, dtype=dtype) * 3
    if paired:
        return pair
    d = pair[:, 1] - pair[:, 0]
    return d if diff_sign == "ft_minus_base" else -d


@pytest.mark.parametrize("dead_kind", ["none", "few", "many"])
@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("diff_sign", ["ft_minus_base", "base_minus_ft"])
@pytest.mark.parametrize(("rescale", "apply_b_dec"), [(True, False), (True, True), (False, False)])
def test_sparse_step_matches_dense_step(
    dead_kind: str, paired: bool, diff_sign: str, rescale: bool, apply_b_dec: bool
) -> None:
    sparse_m, dense_m = _pair(
        diff_sign=diff_sign,
        rescale_acts_by_decoder_norm=rescale,
        apply_b_dec_to_input=apply_b_dec,
    )
    x = _inputs(torch.float64, diff_sign, paired)
    _assert_same_step(sparse_m, dense_m, x, _dead_mask(dead_kind), tol=1e-10)


def test_sparse_step_float32() -> None:
    sparse_m, dense_m = _pair("float32", apply_b_dec_to_input=True)
    x = _inputs(torch.float32, "ft_minus_base", True)
    _assert_same_step(sparse_m, dense_m, x, _dead_mask("many"), tol=1e-4)


@pytest.mark.parametrize(
    "norm", ["none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"]
)
def test_sparse_step_normalize_activations(norm: str) -> None:
    sparse_m, dense_m = _pair(normalize_activations=norm, apply_b_dec_to_input=True)
    x = _inputs(torch.float64, "ft_minus_base", True)
    run_time = norm in ("constant_norm_rescale", "layer_norm")
    _assert_same_step(sparse_m, dense_m, x, None if run_time else _dead_mask("many"), tol=1e-10)
    if run_time:  # SAELens refuses the aux loss with run-time normalisation; so do we
        for m in (sparse_m, dense_m):
            with pytest.raises(ValueError, match="auxiliary loss"):
                _step(m, x, _dead_mask("many"), 2)


def test_fewer_positive_scores_than_k() -> None:
    """Kept zeros (fewer positive pre-activations than B*k) behave as in the dense step."""
    sparse_m, dense_m = _pair()
    with torch.no_grad():
        for m in (sparse_m, dense_m):
            m.b_enc.fill_(-1.5)  # ~17 positive pre-activations < B * k = 240
    x = _inputs(torch.float64, "ft_minus_base", False)
    _assert_same_step(sparse_m, dense_m, x, _dead_mask("many"), tol=1e-10, steps=1)


def _batches(seed: int, batch: int) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64)
    while True:
        base = torch.randn(batch, D_IN, generator=g, dtype=torch.float64)
        delta = torch.relu(torch.randn(batch, D_IN, generator=g, dtype=torch.float64)) @ mix
        yield torch.stack([base, base + 0.5 * delta], dim=1)


def test_saetrainer_run_and_saved_model_match(tmp_path: Path) -> None:
    """A few SAETrainer steps (dead latents appear) give the same weights; the saved
    inference model is the same whichever path trained it."""
    sparse_m, dense_m = _pair(d_sae=512, k=4)
    batch, steps = 64, 6
    trained = []
    for m in (sparse_m, dense_m):
        cfg = SAETrainerConfig(
            total_training_samples=steps * batch,
            train_batch_size_samples=batch,
            lr=3e-3,
            lr_end=3e-3,
            dead_feature_window=2,
            feature_sampling_window=1000,
        )
        trainer = SAETrainer(cfg, m, _batches(0, batch))
        trained.append(trainer.fit())
        assert int(trainer.dead_neurons.sum()) > 0  # the last steps had an auxiliary loss
    t_s, t_d = trained
    for (name, p_s), (_, p_d) in zip(t_s.named_parameters(), t_d.named_parameters(), strict=True):
        torch.testing.assert_close(p_s, p_d, rtol=1e-9, atol=1e-9, msg=name)
    torch.testing.assert_close(t_s.topk_threshold, t_d.topk_threshold, rtol=1e-9, atol=0)
    assert float(t_s.topk_threshold) > 0

    loaded = []
    for m, sub in ((t_s, "sparse"), (t_d, "dense")):
        m.save_inference_model(tmp_path / sub)
        loaded.append(SAE.load_from_disk(tmp_path / sub))
    a, b = loaded
    assert type(a) is type(b) and a.cfg.architecture() == "diff_sae"
    ca, cb = a.cfg.to_dict(), b.cfg.to_dict()
    da = ca.pop("metadata")["training_architecture_details"]
    db = cb.pop("metadata")["training_architecture_details"]
    assert ca == cb
    assert (da.pop("sparse_kernels"), db.pop("sparse_kernels")) == (True, False)
    assert da == db
    for (name, p_a), (_, p_b) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(p_a, p_b, rtol=1e-9, atol=1e-9, msg=name)
    x = next(_batches(5, 32))
    torch.testing.assert_close(a.encode(x), b.encode(x), rtol=1e-8, atol=1e-8)


def test_saved_inference_model_unchanged_by_flag(tmp_path: Path) -> None:
    """Identical weights, flag on vs off: identical saved weights and inference config."""
    sparse_m, dense_m = _pair()
    _step(sparse_m, _inputs(torch.float64, "ft_minus_base", True), None, 0)
    dense_m.load_state_dict(sparse_m.state_dict())
    sparse_m.save_inference_model(tmp_path / "s")
    dense_m.save_inference_model(tmp_path / "d")
    a, b = SAE.load_from_disk(tmp_path / "s"), SAE.load_from_disk(tmp_path / "d")
    for key in a.state_dict():
        assert torch.equal(a.state_dict()[key], b.state_dict()[key]), key
    ca, cb = a.cfg.to_dict(), b.cfg.to_dict()
    ca["metadata"]["training_architecture_details"].pop("sparse_kernels")
    cb["metadata"]["training_architecture_details"].pop("sparse_kernels")
    assert ca == cb
