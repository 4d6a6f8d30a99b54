"""Invariants of the BatchTopK crosscoder's reference-matching defaults (issue 18).

The long comparison against crosscoder_learning's trainer is ``benchmarks/fidelity.py``; these
tests pin the cheap, exact properties the defaults rely on: the initial weight scale per model,
the restart of the threshold average after its warm-up step, and the exact fold of the input
centring into the biases.
"""

from __future__ import annotations

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

import sae_diff  # noqa: F401  (registers the architectures)
from sae_diff.dictionaries.batchtopk_crosscoder import (
    BatchTopKCrosscoderTraining,
    BatchTopKCrosscoderTrainingConfig,
)
from sae_diff.dictionaries.crosscoder import L1CrosscoderTraining, L1CrosscoderTrainingConfig


def _btk(**kw: object) -> BatchTopKCrosscoderTraining:
    base: dict[str, object] = {"d_in": 12, "d_sae": 40, "k": 3}
    base.update(kw)
    return BatchTopKCrosscoderTraining(BatchTopKCrosscoderTrainingConfig(**base))  # type: ignore[arg-type]


def test_default_decoder_rows_start_at_norm_one_per_model_and_encoder_is_transpose() -> None:
    torch.manual_seed(0)
    sae = _btk()
    per_model = sae.W_dec.detach().norm(dim=-1)  # (d_sae, n_models)
    torch.testing.assert_close(per_model, torch.ones_like(per_model))
    torch.testing.assert_close(sae.W_enc_flat.detach(), sae.W_dec_flat.detach().T)
    # the code normalisation of a fresh latent is then n_models (sum of per-model norms)
    torch.testing.assert_close(sae.code_scale().detach(), torch.full((40,), 2.0))


def test_per_model_init_norm_is_configurable_and_none_falls_back_to_sae_lens() -> None:
    torch.manual_seed(0)
    sae = _btk(decoder_init_norm_per_model=0.5)
    torch.testing.assert_close(sae.W_dec.detach().norm(dim=-1), torch.full((40, 2), 0.5))
    old = _btk(
        decoder_init_norm_per_model=None
    )  # SAELens's decoder_init_norm on the concatenated row
    torch.testing.assert_close(old.W_dec_flat.detach().norm(dim=-1), torch.full((40,), 0.1))
    l1 = L1CrosscoderTraining(L1CrosscoderTrainingConfig(d_in=12, d_sae=40))  # unchanged default
    torch.testing.assert_close(l1.W_dec_flat.detach().norm(dim=-1), torch.full((40,), 0.1))
    assert not l1.cfg.center_inputs


@pytest.mark.parametrize(
    "bad",
    [
        {"decoder_init_norm_per_model": 0.0},
        {"threshold_start_step": -1},
        {"threshold_ema_decay": 1.0},
    ],
)
def test_bad_settings_are_rejected_with_the_field_named(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        _btk(**bad)


def _naive_threshold(mins: list[float], decay: float, start: int) -> float:
    """The reference's rule, restated: EMA from the first batch, restarted at step start + 1."""
    theta = None
    for step, m in enumerate(mins):
        theta = m if theta is None or step == start + 1 else decay * theta + (1 - decay) * m
    assert theta is not None
    return theta


@pytest.mark.parametrize("sparse", [True, False])
def test_threshold_average_restarts_after_the_warm_up_step(sparse: bool) -> None:
    torch.manual_seed(1)
    start, decay = 3, 0.5
    sae = _btk(
        d_in=8,
        d_sae=64,
        k=2,
        threshold_start_step=start,
        threshold_ema_decay=decay,
        sparse_kernels=sparse,
        dtype="float64",
    )
    mins: list[float] = []
    for step in range(8):
        x = torch.randn(32, 2, 8, dtype=torch.float64) * (1 + step)  # the min kept score moves
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients={},
                dead_neuron_mask=None,
                n_training_steps=step,
                is_logging_step=False,
            )
        )
        fa = out.feature_acts.to_dense() if out.feature_acts.is_sparse else out.feature_acts
        with torch.no_grad():
            v = (fa * sae.code_scale())[fa > 0]
        mins.append(float(v.min()))
        assert float(sae.topk_threshold) == pytest.approx(
            _naive_threshold(mins, decay, start), rel=1e-12
        )
        if step == start + 1:  # restarted: the average forgot every earlier batch
            assert float(sae.topk_threshold) == pytest.approx(mins[-1], rel=1e-12)
    assert _naive_threshold(mins, decay, start) != pytest.approx(_naive_threshold(mins, decay, 100))


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_centring_folds_into_the_biases_exactly(apply_b_dec: bool) -> None:
    """Training form on c (x - mu) and the exported raw-space form agree in float64."""
    torch.manual_seed(2)
    sae = _btk(d_in=10, d_sae=30, k=4, dtype="float64", apply_b_dec_to_input=apply_b_dec)
    mu = torch.randn(2, 10) * 5
    sae.set_norm_offsets(mu)
    sae.set_norm_factors([0.3, 2.5])
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.5)
        sae.W_dec.mul_(torch.rand(30, 2, 1, dtype=torch.float64) + 0.5)
    x = torch.randn(50, 2, 10, dtype=torch.float64) * 4 + mu.double()
    x_n = sae.normalised_input(x)
    torch.testing.assert_close(
        x_n, (x - mu.double()) * torch.tensor([0.3, 2.5], dtype=torch.float64)[:, None]
    )
    with torch.no_grad():
        hidden_train = sae.hidden_pre(x_n)
        recon_train = sae.unnormalise(sae.decode_normalised(torch.relu(hidden_train)))
        inf = sae.to_inference()
        hidden_inf = inf.hidden_pre(x)  # raw activations in
        recon_inf = inf.decode(torch.relu(hidden_inf))
    assert "norm_offsets" not in inf.state_dict()
    torch.testing.assert_close(hidden_inf, hidden_train, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(recon_inf, recon_train, rtol=1e-12, atol=1e-10)
    # the fold moved the biases (the test is not vacuous)
    assert (inf.b_dec - sae.b_dec).abs().max() > 1e-3
    assert apply_b_dec or (inf.b_enc - sae.b_enc).abs().max() > 1e-3


def test_checkpoint_without_offsets_loads_as_uncentred() -> None:
    sae = _btk()
    state = {k: v for k, v in sae.state_dict().items() if k != "norm_offsets"}
    other = _btk()
    other.set_norm_offsets(torch.ones(2, 12))
    other.load_state_dict(state)
    assert torch.equal(other.norm_offsets, torch.zeros(2, 12))
    x = torch.randn(3, 2, 12)
    torch.testing.assert_close(other.normalised_input(x), x)  # no stale centring
    centred = _btk()
    centred.set_norm_offsets(torch.full((2, 12), 2.0))
    other.load_state_dict(centred.state_dict())  # a centred checkpoint turns centring on
    torch.testing.assert_close(other.normalised_input(x), x - 2.0)
    with pytest.raises(ValueError, match="norm_offsets"):
        other.set_norm_offsets(torch.ones(3, 12))


@pytest.mark.parametrize("loss_form", ["norm", "squared"])
def test_loss_forms_match_their_definitions(loss_form: str) -> None:
    """``norm`` = the reference's mean over tokens and models of ||x^m - xhat^m||; ``squared``
    = sum over models of the squared error, mean over tokens (naive float64 loops)."""
    torch.manual_seed(4)
    sae = _btk(d_in=6, d_sae=20, k=2, dtype="float64", loss_form=loss_form)
    x = torch.randn(9, 2, 6, dtype=torch.float64)
    out = sae.training_forward_pass(
        TrainStepInput(
            sae_in=x,
            coefficients={},
            dead_neuron_mask=None,
            n_training_steps=0,
            is_logging_step=False,
        )
    )
    e = (out.sae_in - out.sae_out).detach()
    per = [[float(e[i, m].pow(2).sum()) for m in range(2)] for i in range(9)]
    if loss_form == "norm":
        expect = sum(v**0.5 for row in per for v in row) / 18
    else:
        expect = sum(sum(row) for row in per) / 9
    assert float(out.losses["mse_loss"]) == pytest.approx(expect, rel=1e-12)
    assert _btk().cfg.loss_form == "norm"  # the reference's form is the default
