"""Foundation tests: shapes, BatchTopK invariants, aux loss, folding, save/load, bad input."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.sae import TrainStepInput

import sae_diff
from sae_diff.dictionaries import geometry
from sae_diff.dictionaries.batchtopk_crosscoder import (
    BatchTopKCrosscoderTraining,
    JumpReLUCrosscoder,
)
from sae_diff.dictionaries.crosscoder import Crosscoder, L1CrosscoderTraining
from sae_diff.dictionaries.diff_sae import BatchTopKDiffSAETraining, DiffSAE
from sae_diff.dictionaries.registry import training_config, training_sae


def step_input(
    x: torch.Tensor, dead: torch.Tensor | None = None, l1: float = 1.0
) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x,
        coefficients={"l1": l1},
        dead_neuron_mask=dead,
        n_training_steps=0,
        is_logging_step=False,
    )


def make(arch: str, d: int = 8, n: int = 32, **kw) -> torch.nn.Module:
    return training_sae(training_config(arch, d_in=d, d_sae=n, **kw))


def test_registered_in_sae_lens_and_idempotent() -> None:
    from sae_lens import registry

    for name in ("crosscoder", "jumprelu_crosscoder", "diff_sae"):
        assert name in registry.SAE_CLASS_REGISTRY
    for name in ("crosscoder", "batchtopk_crosscoder", "batchtopk_diff_sae"):
        assert name in registry.SAE_TRAINING_CLASS_REGISTRY
    importlib.reload(sae_diff)
    sae_diff.register_architectures()
    sae_diff.register_architectures()
    assert registry.SAE_CLASS_REGISTRY["crosscoder"][0].__name__ == "Crosscoder"


def test_conflicting_registration_is_refused() -> None:
    from sae_lens import registry

    from sae_diff.dictionaries.registry import _register

    table = {"crosscoder": (int, int)}
    with pytest.raises(ValueError, match="already has a different class"):
        _register(table, "crosscoder", (Crosscoder, object), registry.register_sae_class)


@pytest.mark.parametrize("arch", ["crosscoder", "batchtopk_crosscoder"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_crosscoder_shapes_and_dtypes(arch: str, dtype: torch.dtype) -> None:
    sae = make(
        arch,
        dtype="float64" if dtype == torch.float64 else "float32",
        **({"k": 4} if "topk" in arch else {}),
    )
    x = torch.randn(5, 7, 2, 8, dtype=dtype)
    f = sae.encode(x)
    assert f.shape == (5, 7, 32) and f.dtype == dtype
    assert sae.decode(f).shape == (5, 7, 2, 8)
    inf = sae.to_inference()
    assert isinstance(inf, Crosscoder if arch == "crosscoder" else JumpReLUCrosscoder)
    assert inf(x).shape == x.shape and inf(x).dtype == dtype


def test_three_model_crosscoder_trains_a_step() -> None:
    sae = make("batchtopk_crosscoder", n_models=3, k=4)
    x = torch.randn(16, 3, 8)
    out = sae.training_forward_pass(step_input(x))
    out.loss.backward()
    assert sae.W_enc.grad is not None and sae.W_enc.shape == (3, 8, 32)
    assert sae.to_inference()(x).shape == (16, 3, 8)


def test_batchtopk_keeps_exactly_batch_times_k() -> None:
    sae = make("batchtopk_crosscoder", d=16, n=128, k=5)
    with torch.no_grad():
        sae.b_enc.fill_(1.0)  # every pre-activation positive: selection, not ReLU, decides
    f, _ = sae.encode_with_hidden_pre(torch.randn(64, 2, 16))
    assert int((f > 0).sum()) == 64 * 5
    per_token = (f > 0).sum(-1)
    assert per_token.min() < per_token.max()  # variable per token: batch, not per-token, top-k


def test_batchtopk_selection_uses_code_normalisation() -> None:
    sae = make("batchtopk_crosscoder", d=4, n=8, k=1)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.copy_(torch.tensor([1.0, 0.9, 0, 0, 0, 0, 0, 0]))
        sae.W_dec.zero_()
        sae.W_dec[0, 0, 0] = 1.0  # s_0 = 1
        sae.W_dec[1, :, 0] = 2.0  # s_1 = 4 (sum of per-model norms)
    f, _ = sae.encode_with_hidden_pre(torch.zeros(1, 2, 4))
    # latent 1 has the smaller pre-activation but the larger score 0.9*4 > 1*1; value stays unscaled.
    assert float(f[0, 1].detach()) == pytest.approx(0.9) and float(f[0, 0].detach()) == 0


def test_aux_loss_nonzero_for_dead_latents_and_reaches_them() -> None:
    sae = make("batchtopk_crosscoder", d=8, n=32, k=2)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:10] = True
    out = sae.training_forward_pass(step_input(torch.randn(64, 2, 8), dead=dead))
    aux = out.losses["auxiliary_reconstruction_loss"]
    assert aux > 0
    aux.backward()
    enc_grad = sae.W_enc.grad.abs().sum(dim=(0, 1))
    dec_grad = sae.W_dec.grad.abs().sum(dim=(1, 2))
    assert (enc_grad[:10] > 0).all() and (dec_grad[:10] > 0).all()
    assert (dec_grad[10:] == 0).all()  # only dead latents reconstruct the residual
    sae.zero_grad()
    out = sae.training_forward_pass(
        step_input(torch.randn(64, 2, 8), dead=torch.zeros(32, dtype=torch.bool))
    )
    assert out.losses["auxiliary_reconstruction_loss"] == 0
    # and it is in the back-propagated total
    assert torch.allclose(out.loss, out.losses["mse_loss"])


def test_threshold_ema() -> None:
    sae = make("batchtopk_crosscoder", d=8, n=32, k=2, threshold_ema_decay=0.5)
    f = torch.zeros(4, 32)
    f[0, 0] = 2.0
    f[1, 1] = 3.0
    scale = sae.code_scale().detach()
    sae.update_threshold(f)
    first = float(torch.minimum(2.0 * scale[0], 3.0 * scale[1]))
    assert float(sae.topk_threshold) == pytest.approx(first, rel=1e-6)
    f2 = torch.zeros(4, 32)
    f2[2, 2] = 1.0
    sae.update_threshold(f2)
    assert float(sae.topk_threshold) == pytest.approx(0.5 * first + 0.5 * float(scale[2]), rel=1e-6)


def _with_factors(sae: torch.nn.Module, factors: list[float]) -> torch.nn.Module:
    sae.set_norm_factors(factors)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    return sae


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_folding_leaves_l1_outputs_unchanged(apply_b_dec: bool) -> None:
    sae = _with_factors(
        make("crosscoder", dtype="float64", apply_b_dec_to_input=apply_b_dec), [0.3, 4.0]
    )
    x = torch.randn(20, 2, 8, dtype=torch.float64) * 5
    inf = sae.to_inference()
    assert inf.cfg.norm_factors == pytest.approx([0.3, 4.0])
    torch.testing.assert_close(inf.encode(x), sae.encode(x), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(inf(x), sae(x), atol=1e-10, rtol=1e-10)


def test_folding_batchtopk_gives_the_jumprelu_of_the_training_space() -> None:
    sae = _with_factors(make("batchtopk_crosscoder", dtype="float64", k=4), [0.5, 2.0])
    sae.topk_threshold.fill_(0.3)
    x = torch.randn(50, 2, 8, dtype=torch.float64) * 3
    # reference, computed by hand in the normalised (training) space
    x_n = x * torch.tensor([0.5, 2.0], dtype=torch.float64)[:, None]
    p = torch.relu(torch.einsum("bmd,mdn->bn", x_n, sae.W_enc) + sae.b_enc)
    s = sae.W_dec.norm(dim=-1).sum(-1)
    f_ref = p * (p * s > 0.3)
    recon_ref = (torch.einsum("bn,nmd->bmd", f_ref, sae.W_dec) + sae.b_dec) / torch.tensor(
        [0.5, 2.0], dtype=torch.float64
    )[:, None]
    inf = sae.to_inference()
    torch.testing.assert_close(inf.encode(x), f_ref.detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(inf(x), recon_ref.detach(), atol=1e-10, rtol=1e-10)
    # geometry undoes the fold: Δ of the saved dictionary = Δ of the training weights
    torch.testing.assert_close(geometry.relative_norm(inf), geometry.relative_norm(sae))


def test_save_load_round_trip_through_sae_lens(tmp_path) -> None:
    sae = _with_factors(make("batchtopk_crosscoder", k=3), [0.7, 1.3])
    sae.topk_threshold.fill_(0.05)
    sae.cfg.metadata.base_model_name = "toy-base"
    sae.cfg.metadata.model_name = "toy-chat"
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    sae.save_inference_model(tmp_path / "cc")
    loaded = SAE.load_from_disk(tmp_path / "cc")
    assert isinstance(loaded, JumpReLUCrosscoder)
    x = torch.randn(10, 2, 8)
    torch.testing.assert_close(loaded(x), sae.to_inference()(x))
    cfg = loaded.cfg
    assert cfg.k == 3 and cfg.norm_factors == pytest.approx([0.7, 1.3])
    assert cfg.metadata.base_model_name == "toy-base" and cfg.metadata.model_name == "toy-chat"
    assert cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert torch.allclose(loaded.threshold, 0.05 / sae.code_scale().detach())
    assert not list(tmp_path.joinpath("cc").glob("*.tmp"))  # atomic writes leave no temp files


def test_diff_sae_paired_and_difference_inputs_agree(tmp_path) -> None:
    sae = make("batchtopk_diff_sae", d=8, n=32, k=3)
    x = torch.randn(12, 2, 8)
    diff = x[:, 1] - x[:, 0]
    torch.testing.assert_close(sae.encode(x), sae.encode(diff))
    sae.training_forward_pass(step_input(x))  # sets the threshold
    sae.save_inference_model(tmp_path / "d")
    loaded = SAE.load_from_disk(tmp_path / "d")
    assert isinstance(loaded, DiffSAE) and loaded.cfg.diff_sign == "ft_minus_base"
    torch.testing.assert_close(loaded.encode(x[:, None]), loaded.encode(diff[:, None]))
    flipped = make("batchtopk_diff_sae", d=8, n=32, k=3, diff_sign="base_minus_ft")
    flipped.load_state_dict(sae.state_dict())
    torch.testing.assert_close(flipped.encode(x), sae.encode(-diff))
    assert isinstance(sae, BatchTopKDiffSAETraining)


def test_prepare_sets_norm_factors_and_decoder_bias() -> None:
    from sae_diff.dictionaries.normalisation import prepare_crosscoder

    sae = make("batchtopk_crosscoder", d=16, n=32, k=2, center_inputs=False, input_scaling="sqrt_d")
    batches = [torch.randn(256, 2, 16) * torch.tensor([3.0, 0.5])[:, None] + 1.0 for _ in range(4)]
    factors = prepare_crosscoder(sae, iter(batches), n_batches=4)
    norms = torch.cat(batches).norm(dim=-1).mean(0)
    torch.testing.assert_close(factors, math.sqrt(16) / norms)
    torch.testing.assert_close(sae.b_dec.data, torch.cat(batches).mean(0) * factors[:, None])


def test_prepare_centres_by_default() -> None:
    """The default (reference) BatchTopK crosscoder: x_n = c (x - mu), E||x_n||^2 = 1 on the
    centred data (or E||x_n|| = sqrt(d) with input_scaling="sqrt_d"), decoder bias at the
    normalised mean (zero)."""
    from sae_diff.dictionaries.normalisation import prepare_crosscoder

    batches = [torch.randn(256, 2, 16) * torch.tensor([3.0, 0.5])[:, None] + 1.0 for _ in range(4)]
    data = torch.cat(batches).double()
    mu = data.mean(0)
    for scaling in ("unit_rms", "sqrt_d"):
        sae = make("batchtopk_crosscoder", d=16, n=32, k=2, input_scaling=scaling)
        factors = prepare_crosscoder(sae, iter(batches), n_batches=4)
        torch.testing.assert_close(sae.norm_offsets.double(), mu, atol=1e-6, rtol=0)
        norms = (data - mu).norm(dim=-1)
        expect = (
            1 / norms.pow(2).mean(0).sqrt()
            if scaling == "unit_rms"
            else math.sqrt(16) / norms.mean(0)
        )
        torch.testing.assert_close(factors.double(), expect, atol=1e-5, rtol=1e-5)
        assert sae.b_dec.abs().max() < 1e-5
        x_n = sae.normalised_input(torch.cat(batches)).double()
        if scaling == "unit_rms":
            torch.testing.assert_close(
                x_n.pow(2).sum(-1).mean(0), torch.ones(2, dtype=torch.float64)
            )
        else:
            torch.testing.assert_close(
                x_n.norm(dim=-1).mean(0), torch.full((2,), 4.0, dtype=torch.float64)
            )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 40}, "k must satisfy"),
        ({"k": 2, "code_normalisation": "bogus"}, "Unknown code_normalisation"),
        ({"k": 2, "norm_factors": [1.0]}, "one scalar per model"),
    ],
)
def test_bad_configs(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        training_config("batchtopk_crosscoder", d_in=8, d_sae=32, **kwargs)


def test_unknown_architecture_name() -> None:
    with pytest.raises(
        ValueError, match="Unknown architecture 'crosscoderr'.*batchtopk_crosscoder"
    ):
        training_config("crosscoderr", d_in=8, d_sae=32)
    with pytest.raises(ValueError, match="Unknown diff_sign"):
        training_config("batchtopk_diff_sae", d_in=8, d_sae=32, k=2, diff_sign="ft-base")


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.randn(4, 8), "Expected paired activations"),
        (torch.randn(4, 2, 9), "d_in=8"),
        (torch.full((4, 2, 8), float("nan")), "NaN"),
    ],
)
def test_bad_crosscoder_input(x: torch.Tensor, match: str) -> None:
    for sae in (make("batchtopk_crosscoder", k=2), make("crosscoder").to_inference()):
        with pytest.raises(ValueError, match=match):
            sae.encode(x)


def test_bad_diff_sae_input() -> None:
    sae = make("batchtopk_diff_sae", k=2)
    with pytest.raises(ValueError, match="last dimension d_in=8"):
        sae.encode(torch.randn(4, 2, 9))
    with pytest.raises(ValueError, match="NaN"):
        sae.encode(torch.full((4, 2, 8), float("nan")))


def test_set_norm_factors_validates() -> None:
    sae = make("crosscoder")
    with pytest.raises(ValueError, match="positive finite"):
        sae.set_norm_factors([1.0, -2.0])
    assert isinstance(sae, L1CrosscoderTraining)
    assert isinstance(make("batchtopk_crosscoder", k=2), BatchTopKCrosscoderTraining)
