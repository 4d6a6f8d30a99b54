"""Latent Scaling: planted ground truth, one-pass vs naive, streaming, min count, bad input.

Everything runs in float64 on tiny sizes. The planted data follow METHODS.md §3:
x = sum_j beta_j f_j d_j + noise orthogonal to the latent directions, so every beta is known
exactly and is recovered to 1e-6 (in practice to ~1e-12).
"""

from __future__ import annotations

import math

import pytest
import torch
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

import sae_diff  # noqa: F401  (registers the architectures)
from sae_diff.analysis.batches import PairedBatch
from sae_diff.analysis.latent_scaling import (
    _Encoder,
    as_inference,
    latent_scaling,
    latent_scaling_cost_ratio,
    latent_scaling_naive,
)
from sae_diff.dictionaries.base import CrosscoderSAE
from sae_diff.dictionaries.batchtopk_crosscoder import (
    BatchTopKCrosscoderTraining,
    BatchTopKCrosscoderTrainingConfig,
    JumpReLUCrosscoder,
    JumpReLUCrosscoderConfig,
)
from sae_diff.dictionaries.crosscoder import Crosscoder, CrosscoderConfig
from sae_diff.dictionaries.diff_sae import DiffSAE, DiffSAEConfig

D, N, TOKENS = 16, 6, 400
F64 = torch.float64


def _basis(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))
    return q.T  # rows orthonormal


def _planted_codes(seed: int = 1, tokens: int = TOKENS) -> torch.Tensor:
    """Codes f (tokens, N): active with prob 0.4 at values in [0.5, 2] (well above threshold)."""
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(tokens, N, generator=g, dtype=F64) < 0.4
    return torch.where(active, 0.5 + 1.5 * torch.rand(tokens, N, generator=g, dtype=F64), 0.0)


def _noise(U: torch.Tensor, tokens: int, seed: int) -> torch.Tensor:
    """Noise in the span of the non-latent directions U[N:], i.e. orthogonal to every u_j."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, D - N, generator=g, dtype=F64) @ U[N:]


def _planted_crosscoder(factors: tuple[float, float] = (1.0, 1.0)):
    """A JumpReLU crosscoder with known ν: returns (sae, batches, beta, gamma).

    ft decoder d_j^c = a_j u_j; base decoder d_j^b = gamma_j a_j u_j + w_j (w_j ⟂ all u);
    x^c = sum f a u + noise, x^b = sum beta f a u + noise; encoder reads u_j / a_j from x^c.
    Then beta_recon = (gamma, 1), beta_error = (beta, 1): nu_r = gamma, nu_eps = beta.
    The weights are built in the normalised space and the factors folded in, as on export.
    """
    U = _basis()
    u = U[:N]
    a = torch.tensor([1.0, 0.5, 2.0, 1.5, 0.8, 3.0], dtype=F64)
    beta = torch.tensor([0.0, 0.2, 0.5, 1.0, 1.3, 0.05], dtype=F64)
    gamma = torch.tensor([0.1, 0.9, 0.3, 1.0, 0.0, 0.6], dtype=F64)
    w = torch.randn(N, D - N, dtype=F64) @ U[N:]
    dec_c, dec_b = a[:, None] * u, gamma[:, None] * a[:, None] * u + w
    f = _planted_codes()
    x_c = f @ dec_c + _noise(U, TOKENS, 2)
    x_b = (f * beta) @ dec_c + _noise(U, TOKENS, 3)
    cfg = JumpReLUCrosscoderConfig(
        d_in=D, d_sae=N, dtype="float64", device="cpu", norm_factors=list(factors)
    )
    sae = JumpReLUCrosscoder(cfg)
    c = torch.tensor(factors, dtype=F64)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[1] = (u / a[:, None]).T
        sae.b_enc.zero_()
        sae.threshold.fill_(0.1)
        sae.W_dec[:, 0], sae.W_dec[:, 1] = dec_b, dec_c
        sae.b_dec[0] = torch.randn(D - N, dtype=F64) @ U[N:]
        sae.b_dec[1] = torch.randn(D - N, dtype=F64) @ U[N:]
        state = {k: v.clone() for k, v in sae.state_dict().items()}
        CrosscoderSAE.fold_norm_factors_into(state, c)
        sae.load_state_dict(state)
    x = torch.stack([x_b / c[0], x_c / c[1]], dim=1)  # raw activations
    return sae, list(x.split(64)), beta, gamma, f


def test_planted_crosscoder_betas_recovered_exactly():
    sae, batches, beta, gamma, f = _planted_crosscoder(factors=(0.5, 2.0))
    res = latent_scaling(sae, batches, min_count=0, progress=False)
    ones = torch.ones(N, dtype=F64)
    torch.testing.assert_close(res.betas["beta_error_ft"], ones, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.betas["beta_error_base"], beta, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.betas["beta_recon_ft"], ones, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.betas["beta_recon_base"], gamma, atol=1e-6, rtol=0)
    nu = res.ratios()
    torch.testing.assert_close(nu["nu_error"], beta, atol=1e-6, rtol=0)
    torch.testing.assert_close(nu["nu_recon"], gamma, atol=1e-6, rtol=0)
    # statistics against the planted codes
    assert res.count_active.tolist() == (f > 0).sum(0).tolist()
    torch.testing.assert_close(res.sum_sq_act, (f * f).sum(0))
    torch.testing.assert_close(res.max_act, f.max(0).values)
    assert res.n_tokens == TOKENS


def test_normalised_space_matters():
    """Folded factors must be undone: the betas do not depend on the per-model scalars."""
    a = latent_scaling(
        _planted_crosscoder((1.0, 1.0))[0],
        _planted_crosscoder((1.0, 1.0))[1],
        min_count=0,
        progress=False,
    )
    sae, batches, *_ = _planted_crosscoder((0.25, 3.0))
    b = latent_scaling(sae, batches, min_count=0, progress=False)
    for k in a.betas:
        torch.testing.assert_close(a.betas[k], b.betas[k], atol=1e-9, rtol=0)


def _planted_sae(kind: str):
    """SAE with decoder a_j u_j and encoder u_j / a_j; data make beta_act known per model."""
    U = _basis(4)
    u = U[:N]
    a = torch.tensor([1.0, 0.5, 2.0, 1.5, 0.8, 3.0], dtype=F64)
    beta = torch.tensor([0.0, 0.2, 0.5, 1.0, 1.3, 0.05], dtype=F64)
    f = _planted_codes(5)
    dec = a[:, None] * u
    nb, nc = _noise(U, TOKENS, 6), _noise(U, TOKENS, 7)
    if kind == "ft_sae":  # encoder reads x^c
        x_c, x_b = f @ dec + nc, (f * beta) @ dec + nb
        expect_base, expect_ft = beta, torch.ones(N, dtype=F64)
    elif kind == "base_sae":  # encoder reads x^b
        x_b, x_c = f @ dec + nb, (f * beta) @ dec + nc
        expect_base, expect_ft = torch.ones(N, dtype=F64), beta
    else:  # diff_sae: encoder reads x^c - x^b = sum f a u + noise
        x_b, x_c = (f * beta) @ dec + nb, (f * (1 + beta)) @ dec + nc
        expect_base, expect_ft = beta, 1 + beta
    if kind == "diff_sae":
        sae: JumpReLUSAE = DiffSAE(
            DiffSAEConfig(
                d_in=D, d_sae=N, dtype="float64", device="cpu", apply_b_dec_to_input=False
            )
        )
    else:
        sae = JumpReLUSAE(
            JumpReLUSAEConfig(
                d_in=D, d_sae=N, dtype="float64", device="cpu", apply_b_dec_to_input=False
            )
        )
    with torch.no_grad():
        sae.W_enc.copy_((u / a[:, None]).T)
        sae.b_enc.zero_()
        sae.threshold.fill_(0.1)
        sae.W_dec.copy_(dec)
        sae.b_dec.copy_(torch.randn(D, dtype=F64))
    return sae, list(torch.stack([x_b, x_c], 1).split(100)), expect_base, expect_ft


@pytest.mark.parametrize("kind", ["ft_sae", "base_sae", "diff_sae"])
def test_planted_sae_activation_betas(kind):
    sae, batches, eb, ec = _planted_sae(kind)
    res = latent_scaling(
        sae,
        batches,
        kind=None if kind == "diff_sae" else kind,
        min_count=0,
        progress=False,
        firing_shift=False,
    )
    assert res.kind == kind
    torch.testing.assert_close(res.betas["beta_act_base"], eb, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.betas["beta_act_ft"], ec, atol=1e-6, rtol=0)
    ok = ec.abs() > 1e-3  # nu = beta_base / beta_ft is undefined where beta_ft = 0
    torch.testing.assert_close(res.ratios()["nu_act"][ok], (eb / ec)[ok], atol=1e-6, rtol=0)
    naive = latent_scaling_naive(sae, batches, kind=kind)
    for k, v in naive.items():
        torch.testing.assert_close(res.betas[k], v, atol=1e-10, rtol=1e-10)


def _random_crosscoder(n: int = 24, d: int = 8, factors=(0.7, 1.9), jump: bool = True):
    cls, cfg_cls = (
        (JumpReLUCrosscoder, JumpReLUCrosscoderConfig) if jump else (Crosscoder, CrosscoderConfig)
    )
    sae = cls(cfg_cls(d_in=d, d_sae=n, dtype="float64", device="cpu", norm_factors=list(factors)))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_()
        if jump:
            sae.threshold.uniform_(0.0, 0.5)
    x = torch.randn(300, 2, d, dtype=F64) * torch.tensor([1.3, 0.6], dtype=F64)[:, None]
    return sae, x


@pytest.mark.parametrize("jump", [True, False])
def test_one_pass_equals_naive_per_latent_targets(jump):
    sae, x = _random_crosscoder(jump=jump)
    batches = list(x.split(70))
    targets = ("reconstruction", "error", "activation")
    res = latent_scaling(sae, batches, targets=targets, min_count=0, progress=False)
    naive = latent_scaling_naive(sae, batches, targets=targets, chunk=5)
    assert set(naive) == set(res.betas) and len(naive) == 6
    active = res.count_active > 0
    assert active.sum() > 10
    for k, v in naive.items():
        torch.testing.assert_close(res.betas[k][active], v[active], atol=1e-10, rtol=1e-10)
        assert torch.isnan(res.betas[k][~active]).all() and torch.isnan(v[~active]).all()


def test_streaming_equals_one_batch_and_subset_equals_full():
    sae, x = _random_crosscoder()
    one = latent_scaling(sae, [x], min_count=0, progress=False)
    many = latent_scaling(sae, list(x.split(37)) + [x[:0]], min_count=0, progress=False)
    sub_idx = [3, 17, 0, 9]
    sub = latent_scaling(sae, x.split(50), latents=sub_idx, min_count=0, progress=False)
    assert one.n_tokens == many.n_tokens == sub.n_tokens == 300
    assert torch.equal(one.count_active, many.count_active)
    for k in one.betas:
        torch.testing.assert_close(
            many.betas[k], one.betas[k], atol=1e-12, rtol=1e-12, equal_nan=True
        )
        torch.testing.assert_close(
            sub.betas[k], one.betas[k][sub_idx], atol=1e-12, rtol=1e-12, equal_nan=True
        )
    assert sub.latents.tolist() == sub_idx
    assert torch.equal(sub.count_active, one.count_active[sub_idx])


def test_fast_codes_equal_sae_encode():
    for jump in (True, False):
        sae, x = _random_crosscoder(jump=jump)
        enc = _Encoder(sae, "crosscoder")
        assert enc.fast
        i, j, v = enc.codes(x)
        dense = torch.zeros(x.shape[0], sae.cfg.d_sae, dtype=F64)
        dense[i, j] = v
        assert torch.equal(dense, sae.encode(x))
        # float32: the candidate threshold's margin must not drop or add any code
        sae32 = sae.to(torch.float32)
        x32 = x.float()
        i, j, v = _Encoder(sae32, "crosscoder").codes(x32)
        dense32 = torch.zeros(x.shape[0], sae.cfg.d_sae)
        dense32[i, j] = v
        assert torch.equal(dense32, sae32.encode(x32))
    # a hook on the dictionary disables the fast path, and results do not change
    sae, x = _random_crosscoder()
    plain = latent_scaling(sae, [x], min_count=0, progress=False)
    handle = sae.hook_sae_acts_post.register_forward_hook(lambda m, i, o: o)
    assert not _Encoder(sae, "crosscoder").fast
    hooked = latent_scaling(sae, [x], min_count=0, progress=False)
    handle.remove()
    for k in plain.betas:
        torch.testing.assert_close(hooked.betas[k], plain.betas[k], equal_nan=True)


def test_training_class_uses_inference_threshold_not_batch_topk():
    cfg = BatchTopKCrosscoderTrainingConfig(
        d_in=8, d_sae=24, k=4, dtype="float64", device="cpu", norm_factors=[0.8, 1.4]
    )
    tr = BatchTopKCrosscoderTraining(cfg)
    tr.topk_threshold.fill_(0.3)
    x = torch.randn(200, 2, 8, dtype=F64)
    inf = as_inference(tr)
    assert isinstance(inf, JumpReLUCrosscoder)
    a = latent_scaling(tr, [x], min_count=0, progress=False)
    b = latent_scaling(inf, [x], min_count=0, progress=False)
    for k in a.betas:
        torch.testing.assert_close(a.betas[k], b.betas[k], equal_nan=True)
    # the batch top-k of the training encoder keeps exactly k*B codes; the threshold does not
    assert int(a.count_active.sum()) != 4 * 200
    assert int(a.count_active.sum()) == int((inf.encode(x) != 0).sum())


def test_min_count_rule():
    sae, batches, beta, *_ = _planted_crosscoder()
    res = latent_scaling(sae, batches, progress=False, min_count=0)
    counts = res.count_active
    cut = int(counts.sort().values[2])  # exactly the count of the third-rarest latent
    res = latent_scaling(sae, batches, progress=False, min_count=cut)
    nu = res.ratios()["nu_error"]
    assert torch.isnan(nu[counts < cut]).all() and (counts < cut).sum() == 2
    torch.testing.assert_close(nu[counts >= cut], beta[counts >= cut], atol=1e-6, rtol=0)
    # betas themselves are still reported below the minimum
    assert torch.isfinite(res.betas["beta_error_base"]).all()
    df = res.to_frame()
    assert df["nu_error"].isna().sum() == 2 and (df["count_active"] == counts.numpy()).all()


def test_bad_input_errors():
    sae, x = _random_crosscoder()
    with pytest.raises(ValueError, match="no tokens"):
        latent_scaling(sae, [], progress=False)
    with pytest.raises(ValueError, match="no tokens"):
        latent_scaling(sae, [x[:0]], progress=False)
    one = Crosscoder(CrosscoderConfig(d_in=8, d_sae=4, n_models=1, dtype="float64", device="cpu"))
    with pytest.raises(ValueError, match="decoder row for the ft model"):
        latent_scaling(one, [x[:, :1]], progress=False)
    with pytest.raises(ValueError, match="n_models=2"):
        latent_scaling(sae, [x[:, :1]], progress=False)
    with pytest.raises(ValueError, match="d_in=8"):
        latent_scaling(sae, [torch.randn(4, 2, 5, dtype=F64)], progress=False)
    with pytest.raises(TypeError, match="iterable of batches"):
        latent_scaling(sae, x, progress=False)
    with pytest.raises(ValueError, match="Unknown Latent Scaling target"):
        latent_scaling(sae, [x], targets=["recon"], progress=False)
    plain, batches, *_ = _planted_sae("ft_sae")
    with pytest.raises(ValueError, match="kind='ft_sae'"):
        latent_scaling(plain, batches, progress=False)
    with pytest.raises(ValueError, match="need a crosscoder"):
        latent_scaling(plain, batches, kind="ft_sae", targets=["error"], progress=False)
    with pytest.raises(ValueError, match=r"\[0, 24\)"):
        latent_scaling(sae, [x], latents=[3, 24], progress=False)


def test_firing_shift_base_sae():
    """Base-SAE diffing: latents that fire more on the fine-tune's activations."""
    sae, _, _, _ = _planted_sae("base_sae")
    U = _basis(4)
    a = torch.tensor([1.0, 0.5, 2.0, 1.5, 0.8, 3.0], dtype=F64)
    f = _planted_codes(5)
    f_ft = f.clone()
    f_ft[:, 2] = torch.where(f[:, 2] > 0, f[:, 2], 1.0)  # latent 2 fires on every ft token
    f_ft[:, 4] = 2 * f[:, 4]  # latent 4 fires on the same tokens, twice as strongly
    x = torch.stack([f @ (a[:, None] * U[:N]), f_ft @ (a[:, None] * U[:N])], 1)
    res = latent_scaling(sae, x.split(128), kind="base_sae", min_count=1, progress=False)
    shift = res.firing_shift()
    fb, fc = (f > 0).double().mean(0), (f_ft > 0).double().mean(0)
    torch.testing.assert_close(shift["freq_on_base"], fb)
    torch.testing.assert_close(shift["freq_on_ft"], fc)
    torch.testing.assert_close(shift["freq_ratio"], fc / fb)
    torch.testing.assert_close(shift["mean_act_ratio"], f_ft.sum(0) / f.sum(0))
    assert shift["freq_ratio"][2] > 1.5 and shift["mean_act_ratio"][4] == pytest.approx(2.0)
    df = res.to_frame()
    assert {"freq_on_base", "freq_on_ft", "freq_ratio", "mean_act_ratio", "nu_act"} <= set(
        df.columns
    )


def test_masks_and_datasets_statistics():
    sae, x = _random_crosscoder()
    template = torch.rand(300) < 0.3
    batches = [
        (x[:150], {"template": template[:150]}, {"dataset": "chat"}),
        {"acts": x[150:], "masks": {"template": template[150:]}, "dataset": ["web"] * 150},
    ]
    res = latent_scaling(sae, batches, min_count=0, progress=False)
    f = sae.encode(x).detach()
    active = f != 0
    df = res.to_frame()
    assert df["freq[template]"].to_numpy() == pytest.approx(
        active[template].double().mean(0).numpy()
    )
    share = active[template].sum(0).double() / active.sum(0).clamp(min=1)
    assert df["share[template]"].fillna(0).to_numpy() == pytest.approx(share.numpy())
    assert df["freq[dataset=chat]"].to_numpy() == pytest.approx(
        active[:150].double().mean(0).numpy()
    )
    assert df["freq[dataset=web]"].to_numpy() == pytest.approx(
        active[150:].double().mean(0).numpy()
    )
    assert df["max_act"].to_numpy() == pytest.approx(f.max(0).values.numpy())
    # the PairedBatch form gives the same statistics
    pb = [PairedBatch(acts=x, masks={"template": template})]
    again = latent_scaling(sae, pb, min_count=0, progress=False).to_frame()
    assert again["share[template]"].equals(df["share[template]"])


def test_cost_ratio_reports_ratios():
    sae, x = _random_crosscoder()
    out = latent_scaling_cost_ratio(sae, list(x.split(100)), repeats=1, naive_latents=6)
    assert out["ratio"] > 0 and out["naive_speedup"] > 0 and math.isfinite(out["naive_s"])


def test_runs_on_a_paired_activations_store():
    """The real store (an iterator of (B, 2, d) tensors) works; a looping one needs max_tokens."""
    from sae_diff.data.store import PairedActivationsStore

    sae, x = _random_crosscoder()
    store = PairedActivationsStore(
        lambda epoch: iter([x[:150], x[150:]]),
        d_model=8,
        batch_size=50,
        buffer_size=100,
        loop=False,
    )
    res = latent_scaling(sae, store, min_count=0, progress=False)
    ref = latent_scaling(sae, [x], min_count=0, progress=False)
    assert res.n_tokens == 300
    for k in ref.betas:
        torch.testing.assert_close(
            res.betas[k], ref.betas[k], atol=1e-10, rtol=1e-10, equal_nan=True
        )
    looping = PairedActivationsStore(lambda epoch: iter([x]), d_model=8, batch_size=64, loop=True)
    assert latent_scaling(sae, looping, max_tokens=1000, progress=False).n_tokens == 1000
