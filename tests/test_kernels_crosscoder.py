"""The BatchTopK crosscoder's sparse training step equals its dense reference step."""

from __future__ import annotations

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

import sae_diff  # noqa: F401  (registers the architectures)
from sae_diff.dictionaries.batchtopk_crosscoder import (
    BatchTopKCrosscoderTraining,
    BatchTopKCrosscoderTrainingConfig,
)


def _pair(dtype: str, code_normalisation: str, apply_b_dec: bool, loss_form: str = "norm"):
    cfgs = [
        BatchTopKCrosscoderTrainingConfig(
            d_in=16,
            d_sae=3000,
            k=6,
            dtype=dtype,
            device="cpu",
            norm_factors=[0.8, 1.3],
            code_normalisation=code_normalisation,
            sparse_kernels=sparse,
            apply_b_dec_to_input=apply_b_dec,
            k_aux=5,
            loss_form=loss_form,
        )
        for sparse in (True, False)
    ]
    torch.manual_seed(3)
    sparse_m = BatchTopKCrosscoderTraining(cfgs[0])
    dense_m = BatchTopKCrosscoderTraining(cfgs[1])
    with torch.no_grad():
        sparse_m.b_enc.normal_(0, 0.05)
        sparse_m.b_dec.normal_(0, 0.1)
        sparse_m.W_dec.mul_(torch.rand(3000, 2, 1, dtype=sparse_m.W_dec.dtype) + 0.5)
    dense_m.load_state_dict(sparse_m.state_dict())
    return sparse_m, dense_m


@pytest.mark.parametrize(("dtype", "tol"), [("float64", 1e-10), ("float32", 1e-4)])
@pytest.mark.parametrize(
    ("code_normalisation", "apply_b_dec", "loss_form"),
    [
        ("crosscoder", False, "norm"),
        ("crosscoder", False, "squared"),
        ("sae", True, "norm"),
        ("none", False, "squared"),
    ],
)
def test_sparse_step_matches_dense_step(
    dtype: str, tol: float, code_normalisation: str, apply_b_dec: bool, loss_form: str
) -> None:
    sparse_m, dense_m = _pair(dtype, code_normalisation, apply_b_dec, loss_form)
    dt = getattr(torch, dtype)
    x = torch.randn(40, 2, 16, dtype=dt) * 3
    dead = torch.zeros(3000, dtype=torch.bool)
    dead[::7] = True
    for step in range(2):  # the second step uses the tracked threshold as the hint
        outs = []
        for m in (sparse_m, dense_m):
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
            outs.append(out)
        o_s, o_d = outs
        for name in ("mse_loss", "auxiliary_reconstruction_loss"):
            torch.testing.assert_close(o_s.losses[name], o_d.losses[name], rtol=tol, atol=tol)
        assert float(o_s.losses["auxiliary_reconstruction_loss"].detach()) > 0
        torch.testing.assert_close(o_s.sae_out, o_d.sae_out, rtol=tol, atol=tol)
        fa = o_s.feature_acts.to_dense()
        assert torch.equal(fa != 0, o_d.feature_acts.detach() != 0)
        torch.testing.assert_close(fa, o_d.feature_acts.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(
            sparse_m.topk_threshold, dense_m.topk_threshold, rtol=tol, atol=0
        )
        for (name, p_s), (_, p_d) in zip(sparse_m.named_parameters(), dense_m.named_parameters()):
            assert p_s.grad is not None and p_d.grad is not None, name
            torch.testing.assert_close(p_s.grad, p_d.grad, rtol=tol * 10, atol=tol * 10, msg=name)
