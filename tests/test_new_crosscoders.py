"""The field's other crosscoder variants (issue 17): JumpReLU trained directly, shared-latent
(L1 and BatchTopK) and dedicated-feature crosscoders.

Each is checked against planted ground truth (``sae_diff.synthetic``): trained with SAELens's
SAETrainer, it must recover the planted directions with the right model attribution, and keep its
structural guarantee (tied decoders bit-identical; dedicated latents exactly zero on the other
model). Plus: the inference form against the training form, save / load, bad configs, and a short
``sae-diff train`` run on the organism from each shipped config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainStepInput
from sae_lens.training.sae_trainer import SAETrainer

import sae_diff  # noqa: F401  (registers the architectures)
from sae_diff.dictionaries import cross_architecture_crosscoder as xa
from sae_diff.dictionaries import dedicated_crosscoder as dc
from sae_diff.dictionaries import geometry
from sae_diff.dictionaries import shared_crosscoder as sc
from sae_diff.dictionaries.normalisation import prepare_crosscoder
from sae_diff.dictionaries.registry import training_config, training_sae
from sae_diff.synthetic import PlantedPairedData
from tests import hub_stub as _stub_module
from tests.hub_stub import HubStub

hub_stub = _stub_module.hub_stub  # the fixture: a running stub with huggingface_hub pointed at it

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPECTED_TAG = {"shared": "shared", "ft_only": "ft_only", "base_only": "base_only"}
SMALL: dict[str, dict[str, Any]] = {
    "jumprelu_crosscoder": {"l0_coefficient": 2.0},
    "shared_crosscoder": {"n_shared_latents": 8, "l1_coefficient": 0.3},
    "shared_batchtopk_crosscoder": {"n_shared_latents": 8, "k": 2, "shared_sparsity_ratio": 0.5},
    "dedicated_batchtopk_crosscoder": {"n_base_dedicated": 6, "n_ft_dedicated": 6, "k": 2},
    "cross_architecture_crosscoder": {"k": 2, "d_in_base": 6},
}


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train(
    arch: str,
    data: PlantedPairedData,
    steps: int,
    batch: int = 256,
    d_sae: int = 48,
    lr: float = 1e-2,
    **kw: Any,
) -> Any:
    torch.manual_seed(0)
    sae = training_sae(training_config(arch, d_in=data.d, d_sae=d_sae, **kw))
    provider = data.batches(batch, seed=1)
    prepare_crosscoder(sae, provider, n_batches=4)
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch,
        train_batch_size_samples=batch,
        lr=lr,
        lr_end=lr,
        dead_feature_window=50,
        feature_sampling_window=100,
    )
    SAETrainer(cfg, sae, provider).fit()
    return sae


def match_planted(sae: Any, data: PlantedPairedData) -> tuple[torch.Tensor, torch.Tensor]:
    """For each planted feature: best cosine of its concatenated (base, ft) direction with a
    learned raw-space decoder row, and that latent."""
    rows = geometry.decoder_rows(sae, normalised=False).flatten(1)
    planted = data.directions.flatten(1)
    cos = (
        torch.nn.functional.normalize(planted, dim=-1)
        @ torch.nn.functional.normalize(rows, dim=-1).T
    )
    best, idx = cos.max(dim=1)
    return best, idx


def step(sae: Any, x: torch.Tensor, i: int = 0, dead: torch.Tensor | None = None) -> Any:
    return sae.training_forward_pass(
        TrainStepInput(
            sae_in=x,
            coefficients={"l1": 0.1, "l0": 0.1},
            dead_neuron_mask=dead,
            n_training_steps=i,
            is_logging_step=False,
        )
    )


# --- JumpReLU crosscoder trained directly ---------------------------------------------------
@pytest.mark.slow
def test_jumprelu_crosscoder_recovers_planted_directions(tmp_path: Path) -> None:
    data = PlantedPairedData.make(
        d=32, n_shared=8, n_ft_only=4, n_base_only=4, active_per_token=2.0, seed=0
    )
    sae = train("jumprelu_crosscoder", data, steps=500, **SMALL["jumprelu_crosscoder"])
    sae.save_inference_model(tmp_path / "cc")
    inf = SAE.load_from_disk(tmp_path / "cc")
    best, idx = match_planted(inf, data)
    assert best.min() > 0.9 and best.mean() > 0.98, best
    learned = geometry.tags(geometry.relative_norm(inf))[idx.numpy()]
    assert list(learned) == [EXPECTED_TAG[k] for k in data.kinds]
    # sparse on the training distribution: about the planted 2 active features per token
    x, _ = data.sample(4096, torch.Generator().manual_seed(123))
    l0 = (inf.encode(x) > 0).float().sum(-1).mean().item()
    assert 1.5 <= l0 <= 3.0, l0
    assert (inf.threshold > 0).float().mean() > 0.5  # thresholds were learnt, not left at 0


def test_jumprelu_crosscoder_inference_equals_training_form() -> None:
    torch.manual_seed(0)
    sae = training_sae(
        training_config("jumprelu_crosscoder", d_in=8, d_sae=32, jumprelu_init_threshold=0.3)
    )
    sae.set_norm_factors(torch.tensor([0.7, 1.3]))
    sae.set_norm_offsets(torch.randn(2, 8) * 0.1)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for i in range(5):
        out = step(sae, torch.randn(64, 2, 8), i)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    x = torch.randn(256, 2, 8)
    inf = sae.to_inference()
    assert type(inf).__name__ == "JumpReLUCrosscoder"
    torch.testing.assert_close(inf.threshold, sae.threshold.detach().clamp(min=0))
    with torch.no_grad():
        f_train = sae.encode(x)
        assert (f_train > 0).any() and (f_train == 0).any()
        torch.testing.assert_close(inf.encode(x), f_train, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(inf(x), sae(x), rtol=1e-4, atol=1e-4)


def test_jumprelu_threshold_gets_a_gradient_and_losses_match_a_naive_reference() -> None:
    torch.manual_seed(1)
    sae = training_sae(
        training_config(
            "jumprelu_crosscoder",
            d_in=8,
            d_sae=16,
            jumprelu_init_threshold=0.5,
            jumprelu_bandwidth=1.0,
            pre_act_loss_coefficient=0.01,
        )
    )
    x = torch.randn(32, 2, 8)
    out = step(sae, x)
    out.loss.backward()
    assert sae.threshold.grad is not None and sae.threshold.grad.abs().sum() > 0
    # independent float64 reference of the loss terms
    with torch.no_grad():
        W_enc, b_enc = sae.W_enc.double(), sae.b_enc.double()
        W_dec, b_dec, th = sae.W_dec.double(), sae.b_dec.double(), sae.threshold.double()
        h = torch.einsum("bmd,mdn->bn", x.double(), W_enc) + b_enc
        f = h * (h > th)
        xhat = torch.einsum("bn,nmd->bmd", f, W_dec) + b_dec
        s = W_dec.norm(dim=-1).sum(-1)
        mse = (xhat - x.double()).pow(2).sum((-1, -2)).mean()
        tanh = 0.1 * torch.tanh(4.0 * f * s).sum(-1).mean()
        pre = 0.01 * ((th - h).relu() * s).sum(-1).mean()
    torch.testing.assert_close(out.losses["mse_loss"].double(), mse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.losses["l0_loss"].double(), tanh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["pre_act_loss"].double(), pre, rtol=1e-5, atol=1e-7)


# --- shared-latent crosscoders ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["shared_crosscoder", "shared_batchtopk_crosscoder"])
def test_shared_crosscoder_ties_and_recovers_planted_directions(tmp_path: Path, arch: str) -> None:
    data = PlantedPairedData.make(
        d=32, n_shared=8, n_ft_only=4, n_base_only=4, active_per_token=2.0, seed=2
    )
    sae = train(arch, data, steps=500, **SMALL[arch])
    assert sc.tie_gap(sae) == 0.0  # bit-identical through 500 Adam steps and gradient clipping
    sae.save_inference_model(tmp_path / "cc")
    inf = SAE.load_from_disk(tmp_path / "cc")
    assert inf.cfg.n_shared_latents == 8 and sc.tie_gap(inf) < 1e-6
    best, idx = match_planted(inf, data)
    exclusive = torch.tensor([k != "shared" for k in data.kinds])
    # every exclusive feature found cleanly; shared ones on average (a tied latent may blend two)
    assert best[exclusive].min() > 0.9 and best[~exclusive].mean() > 0.9, best
    delta = geometry.relative_norm(inf)
    assert torch.allclose(
        delta[:8], torch.full((8,), 0.5), atol=1e-6
    )  # tied: Δ = 0.5 by construction
    learned = geometry.tags(delta)[idx.numpy()]
    assert list(learned) == [EXPECTED_TAG[k] for k in data.kinds]
    # exclusive planted features live in free latents (a tied latent cannot be exclusive)
    kinds = data.kinds
    assert all(int(idx[i]) >= 8 for i, k in enumerate(kinds) if k != "shared")
    # the cheaper tied latents take up most of the shared planted features
    n_shared_in_tied = sum(int(idx[i]) < 8 for i, k in enumerate(kinds) if k == "shared")
    assert n_shared_in_tied >= 6, idx


def test_shared_tie_hook_gives_the_tied_gradient() -> None:
    """The hook's gradient on a shared row is d/dd of the loss with one tied vector (float64 reference)."""
    torch.manual_seed(0)
    sae = training_sae(
        training_config(
            "shared_crosscoder",
            d_in=6,
            d_sae=10,
            n_shared_latents=3,
            shared_sparsity_ratio=0.2,
            l1_coefficient=0.5,
            dtype="float64",
        )
    )
    x = torch.randn(20, 2, 6, dtype=torch.float64)
    out = step(sae, x)
    out.loss.backward()
    grad = sae.W_dec.grad.clone()
    # reference: rebuild the decoder from one tied parameter and differentiate
    tied = sae.W_dec.detach()[:3, 0].clone().requires_grad_(True)
    free = sae.W_dec.detach()[3:].clone()
    W_dec = torch.cat([tied[:, None, :].expand(3, 2, 6), free])
    with torch.no_grad():
        h = torch.relu(torch.einsum("bmd,mdn->bn", x, sae.W_enc) + sae.b_enc)
    xhat = torch.einsum("bn,nmd->bmd", h, W_dec) + sae.b_dec.detach()
    w = torch.tensor([0.2] * 3 + [1.0] * 7, dtype=torch.float64)
    loss = (xhat - x).pow(2).sum((-1, -2)).mean() + 0.1 * (h * W_dec.norm(dim=-1).sum(-1) * w).sum(
        -1
    ).mean()
    loss.backward()
    torch.testing.assert_close(grad[:3, 0], tied.grad)
    torch.testing.assert_close(grad[:3, 1], tied.grad)


# --- dedicated-feature crosscoder -------------------------------------------------------------
@pytest.mark.slow
def test_dedicated_crosscoder_finds_exclusive_features_in_the_right_partition(
    tmp_path: Path,
) -> None:
    data = PlantedPairedData.make(
        d=32, n_shared=8, n_ft_only=4, n_base_only=4, active_per_token=2.0, seed=3
    )
    # the shared partition (12 latents) sized near the 8 planted shared features: with spare
    # shared capacity, BatchTopK lets shared latents take exclusive features too (docs/methods.md)
    sae = train(
        "dedicated_batchtopk_crosscoder",
        data,
        steps=500,
        d_sae=24,
        **SMALL["dedicated_batchtopk_crosscoder"],
    )
    assert dc.leak(sae) == 0.0  # dedicated latents never touched the other model
    sae.save_inference_model(tmp_path / "cc")
    inf = SAE.load_from_disk(tmp_path / "cc")
    assert dc.leak(inf) == 0.0
    part = inf.partition()
    delta = geometry.relative_norm(inf)
    assert (delta[torch.from_numpy(part == "base_dedicated")] == 1.0).all()
    assert (delta[torch.from_numpy(part == "ft_dedicated")] == 0.0).all()
    best, idx = match_planted(inf, data)
    exclusive = torch.tensor([k != "shared" for k in data.kinds])
    assert best[exclusive].min() > 0.9, best  # every exclusive feature recovered ...
    learned = geometry.tags(delta)[idx.numpy()]
    assert [t for t, e in zip(learned, exclusive) if e] == [
        k for k in data.kinds if k != "shared"
    ]  # ... right model
    expected = {"ft_only": "ft_dedicated", "base_only": "base_dedicated"}
    in_partition = [part[int(j)] == expected[k] for j, k in zip(idx, data.kinds) if k != "shared"]
    assert sum(in_partition) >= 6, in_partition  # ... mostly by a dedicated latent of its own model
    # no dedicated latent learnt a shared feature in full (it can only write one model)
    dedicated = torch.from_numpy(part != "shared")
    assert not any(
        bool(dedicated[int(j)]) and b > 0.9 for j, b, e in zip(idx, best, exclusive) if not e
    )


def test_dedicated_config_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="sum to at most d_sae"):
        training_config(
            "dedicated_batchtopk_crosscoder",
            d_in=8,
            d_sae=16,
            k=2,
            n_base_dedicated=10,
            n_ft_dedicated=10,
        )
    with pytest.raises(ValueError, match="n_shared_latents must be in"):
        training_config("shared_crosscoder", d_in=8, d_sae=16, n_shared_latents=17)
    with pytest.raises(ValueError, match="shared_sparsity_ratio"):
        training_config(
            "shared_batchtopk_crosscoder", d_in=8, d_sae=16, k=2, shared_sparsity_ratio=0.0
        )
    with pytest.raises(ValueError, match="jumprelu_bandwidth"):
        training_config("jumprelu_crosscoder", d_in=8, d_sae=16, jumprelu_bandwidth=-1.0)


# --- cross-architecture crosscoder (different d_model) -------------------------------------------
@pytest.mark.slow
def test_cross_architecture_crosscoder_recovers_planted_features_across_widths(
    tmp_path: Path,
) -> None:
    data = PlantedPairedData.make_cross_architecture(
        d_base=24, d_ft=32, n_shared=8, n_ft_only=4, n_base_only=4, seed=0
    )
    x, _ = data.sample(64, torch.Generator().manual_seed(0))
    assert (x[:, 0, 24:] == 0).all()  # the base model's padding
    sae = train("cross_architecture_crosscoder", data, steps=500, k=2, d_in_base=24, d_in_ft=32)
    assert xa.padding_leak(sae) == 0.0
    sae.save_inference_model(tmp_path / "cc")
    inf = SAE.load_from_disk(tmp_path / "cc")
    assert type(inf).__name__ == "CrossArchitectureCrosscoder" and xa.padding_leak(inf) == 0.0
    best, idx = match_planted(inf, data)
    assert best.min() > 0.9, best
    learned = geometry.tags(geometry.relative_norm(inf))[idx.numpy()]
    assert list(learned) == [EXPECTED_TAG[k] for k in data.kinds]


def test_pad_pair_and_width_validation() -> None:
    xb, xc = torch.randn(3, 5, 6), torch.randn(3, 5, 8)
    x = xa.pad_pair(xb, xc)
    assert x.shape == (3, 5, 2, 8) and torch.equal(x[..., 0, :6], xb) and (x[..., 0, 6:] == 0).all()
    assert torch.equal(x[..., 1, :], xc)
    with pytest.raises(ValueError, match="same tokens"):
        xa.pad_pair(torch.randn(3, 6), torch.randn(4, 8))
    with pytest.raises(ValueError, match="set d_in to the wider model"):
        training_config(
            "cross_architecture_crosscoder", d_in=8, d_sae=16, k=2, d_in_base=6, d_in_ft=7
        )


# --- synthetic: rotated directions --------------------------------------------------------------
def test_synthetic_rotated_directions() -> None:
    data = PlantedPairedData.make(
        d=16, n_shared=2, n_ft_only=1, n_base_only=1, n_rotated=3, rotation_cos=0.3
    )
    assert data.kinds == ["shared"] * 2 + ["ft_only", "base_only"] + ["rotated"] * 3
    cos = torch.nn.functional.cosine_similarity(
        data.directions[:, 0], data.directions[:, 1], dim=-1
    )
    torch.testing.assert_close(cos[-3:], torch.full((3,), 0.3))
    flat = torch.cat([data.directions[:, 0], data.directions[-3:, 1]])
    flat = flat[flat.norm(dim=-1) > 0]
    gram = flat @ flat.T  # base directions of all features and ft of rotated: unit and orthogonal
    # except each rotated feature's own pair (cos 0.3)
    off = gram - torch.eye(len(flat))
    assert (off.abs() > 1e-5).sum() == 2 * 3
    with pytest.raises(ValueError, match="orthogonal directions"):
        PlantedPairedData.make(d=8, n_shared=4, n_ft_only=0, n_base_only=0, n_rotated=3)


# --- save / load and YAML training --------------------------------------------------------------
@pytest.mark.parametrize("arch", list(SMALL))
def test_save_load_round_trip(tmp_path: Path, arch: str) -> None:
    torch.manual_seed(0)
    kw = {k: v for k, v in SMALL[arch].items() if k != "n_shared_latents"}
    if "shared" in arch:
        kw["n_shared_latents"] = 4
    sae = training_sae(training_config(arch, d_in=8, d_sae=32, **kw))
    sae.set_norm_factors(torch.tensor([0.7, 1.3]))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for i in range(3):
        step(sae, torch.randn(64, 2, 8), i).loss.backward()
        opt.step()
        opt.zero_grad()
    sae.save_inference_model(tmp_path / "d")
    loaded = SAE.load_from_disk(tmp_path / "d")
    mem = sae.to_inference()
    assert type(loaded) is type(mem) and loaded.cfg.architecture() == mem.cfg.architecture()
    x = torch.randn(16, 2, 8)
    assert torch.equal(loaded.encode(x), mem.encode(x))
    assert torch.equal(loaded(x), mem(x))
    assert loaded.cfg.norm_factors == pytest.approx([0.7, 1.3])


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "jumprelu_crosscoder",
        "shared_crosscoder",
        "shared_batchtopk_crosscoder",
        "dedicated_crosscoder",
    ],
)
def test_organism_config_trains_with_sae_diff_train(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from sae_diff.cli import main

    config = CONFIGS / f"organism_{name}.yaml"
    out = tmp_path / "out"
    flags = [
        "--training_tokens",
        "2048",
        "--train_batch_size_tokens",
        "256",
        "--context_size",
        "64",
        "--store_batch_size_prompts",
        "16",
        "--n_eval_batches",
        "1",
        "--n_norm_batches",
        "2",
        "--lr_warm_up_steps",
        "2",
        "--checkpoint_path",
        str(tmp_path / "ck"),
        "--n_checkpoints",
        "0",
        "--output_path",
        str(out),
    ]
    assert main(["train", "--config", str(config), *flags]) == 0
    assert "Saved to" in capsys.readouterr().out
    sae = SAE.load_from_disk(str(out))
    assert sae.cfg.metadata.hook_name == "blocks.2.hook_resid_pre"
    if name.startswith("shared"):
        assert sae.cfg.n_shared_latents > 0 and sc.tie_gap(sae) < 1e-5
    if name == "dedicated_crosscoder":
        assert dc.leak(sae) == 0.0 and sae.cfg.n_ft_dedicated > 0


# --- Hub round trip (local stand-in, tests/hub_stub.py) -------------------------------------------


@pytest.mark.parametrize("arch", list(SMALL))
def test_upload_then_from_pretrained(hub_stub: HubStub, tmp_path: Path, arch: str) -> None:
    from sae_diff.hub import upload_dictionary

    torch.manual_seed(0)
    kw = {k: v for k, v in SMALL[arch].items() if k != "n_shared_latents"}
    if "shared" in arch:
        kw["n_shared_latents"] = 4
    cfg = training_config(arch, d_in=8, d_sae=32, **kw)
    for key, value in {
        "base_model_name": "org/base",
        "model_name": "org/ft",
        "hook_name": "blocks.1.hook_resid_post",
    }.items():
        cfg.metadata[key] = value
    sae = training_sae(cfg)
    sae.set_norm_factors(torch.tensor([0.7, 1.3]))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for i in range(3):
        step(sae, torch.randn(64, 2, 8), i).loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path / "out"
    sae.save_inference_model(out)
    upload_dictionary(out, "my-org/diffing", sae_id=f"l1/{arch}", show_progress=False)
    loaded = SAE.from_pretrained("my-org/diffing", f"l1/{arch}")
    local = SAE.load_from_disk(out)
    assert type(loaded) is type(local) and type(local).__name__ == type(sae.to_inference()).__name__
    x = torch.randn(16, 2, 8)
    assert torch.equal(loaded.encode(x), local.encode(x))
    assert torch.equal(loaded(x), local(x))
    assert loaded.cfg.metadata.base_model_name == "org/base"
    assert not hub_stub.unhandled


@pytest.mark.parametrize(
    "arch",
    [
        "shared_crosscoder",
        "shared_batchtopk_crosscoder",
        "dedicated_batchtopk_crosscoder",
        "cross_architecture_crosscoder",
    ],
)
def test_structure_survives_deepcopy(arch: str) -> None:
    """Tensor hooks are lost by copy.deepcopy; the classes re-register them at the next step."""
    import copy

    kw = {k: v for k, v in SMALL[arch].items() if k != "n_shared_latents"}
    if "shared" in arch:
        kw["n_shared_latents"] = 4
    sae = copy.deepcopy(training_sae(training_config(arch, d_in=8, d_sae=32, **kw)))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for i in range(3):
        step(sae, torch.randn(64, 2, 8), i).loss.backward()
        opt.step()
        opt.zero_grad()
    if "shared" in arch:
        assert sc.tie_gap(sae) == 0.0
    else:
        assert dc.leak(sae) == 0.0
    if arch == "cross_architecture_crosscoder":
        assert xa.padding_leak(sae) == 0.0
