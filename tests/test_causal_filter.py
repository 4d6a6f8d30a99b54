"""Base-SAE diffing with a causal filter: the firing-shift ranking, the intervention KL against a
hand-run reference, and planted truth (two latents fire more on the fine-tune; only the one whose
ablation matters is kept against the random-latent baseline)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

from sae_diff.analysis import causal_filter as cf
from sae_diff.analysis.latent_scaling import latent_scaling
from sae_diff.evaluation.kl import token_kl
from tests.helpers_models import BOS_ID, PAD_ID, make_tokenizer, random_tokens, tiny_pair

HOOK = "blocks.1.hook_resid_pre"
D, N = 16, 10


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def base_sae(norms: list[float], biases: dict[int, float] | None = None) -> JumpReLUSAE:
    """Latent j reads and writes unit direction u_j (orthonormal); decoder norm ``norms[j]``;
    encoder bias ``biases[j]`` (0 by default)."""
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=N, apply_b_dec_to_input=False))
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    with torch.no_grad():
        sae.W_enc.copy_(u[:, :N])
        sae.W_dec.copy_(u[:, :N].T * torch.tensor(norms)[:, None])
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.zero_()
        for j, b in (biases or {}).items():
            sae.b_enc[j] = b
    sae.cfg.metadata.hook_name = HOOK
    return sae


def shift_frame(ratios: dict[int, float]) -> pd.DataFrame:
    freq_base = np.full(N, 0.1)
    ratio = np.array([ratios.get(j, 1.0) for j in range(N)])
    return pd.DataFrame(
        {"freq_on_base": freq_base, "freq_on_ft": freq_base * ratio, "freq_ratio": ratio},
        index=pd.Index(range(N), name="latent"),
    )


def test_rank_by_firing_shift_orders_and_filters() -> None:
    frame = shift_frame({3: 5.0, 7: 2.0})
    frame.loc[5, ["freq_on_base", "freq_on_ft", "freq_ratio"]] = [
        0.0,
        0.05,
        np.inf,
    ]  # never on base
    frame.loc[6, ["freq_on_ft", "freq_ratio"]] = [1e-6, 100.0]  # too rare on ft
    frame.loc[8, "freq_ratio"] = np.nan
    assert cf.rank_by_firing_shift(frame, n=3) == [5, 3, 7]
    with pytest.raises(ValueError, match="lacks"):
        cf.rank_by_firing_shift(frame.drop(columns="freq_ratio"))


def test_rank_reads_latent_scaling_firing_shift() -> None:
    """The ranking consumes latent_scaling's base-SAE firing shift: a latent whose direction the
    fine-tune's activations carry more often ranks first."""
    sae = base_sae([1.0] * N)
    g = torch.Generator().manual_seed(1)
    codes = (torch.rand(4000, N, generator=g) < 0.1).float()
    x_base = codes @ sae.W_enc.detach().T
    extra = (torch.rand(4000, 1, generator=g) < 0.3).float() * sae.W_enc.detach()[:, 4]
    x_ft = x_base + extra
    res = latent_scaling(sae, [torch.stack([x_base, x_ft], dim=1)], kind="base_sae", progress=False)
    assert cf.rank_by_firing_shift(res, n=1) == [4]


def test_intervention_kl_matches_a_hand_run_reference() -> None:
    _, ft = tiny_pair()
    sae = base_sae([1.0] * N)
    tokens = random_tokens(batch=4, seq=12)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 6:] = True  # "assistant" tokens
    kl = cf.intervention_kl(ft, sae, tokens, [2], mask, batch_size=3)
    with torch.no_grad():

        def ablate(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
            f = torch.relu(act @ sae.W_enc[:, 2] + sae.b_enc[2])
            return act - f[..., None] * sae.W_dec[2]

        ref = token_kl(ft(tokens), ft.run_with_hooks(tokens, fwd_hooks=[(HOOK, ablate)]))
    pred = torch.zeros_like(mask)
    pred[:, 5:11] = True  # positions predicting tokens 6..11
    assert kl.shape == (1,) and float(kl[0]) > 0
    assert float(kl[0]) == pytest.approx(float(ref[pred].double().mean()), rel=1e-5)
    with pytest.raises(ValueError, match="Unknown mode"):
        cf.intervention_kl(ft, sae, tokens, [2], mask, mode="zap")


def test_filter_keeps_the_causal_candidate_and_drops_the_inert_one() -> None:
    """Planted: latents 0 and 1 fire 5x / 4x more on the fine-tune; latent 0 writes strongly
    (decoder norm 8, and an encoder bias that makes it fire on most tokens: ablating it moves the
    residual far), latent 1 barely (norm 0.01); the other active latents (norm 1) are the random
    baseline."""
    _, ft = tiny_pair()
    sae = base_sae([8.0, 0.01] + [1.0] * (N - 2), biases={0: 1.0, 1: 1.0})
    tokens = random_tokens(batch=6, seq=12, seed=3)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 4:] = True
    res = cf.causal_filter(
        ft,
        sae,
        tokens,
        shift_frame({0: 5.0, 1: 4.0}),
        mask,
        n_candidates=2,
        n_random=8,
        quantile=1.0,
    )
    assert list(res.table.index[:2]) == [0, 1]
    assert res.kept == [0], res.table
    kl = res.table["kl"]
    assert kl[0] > res.threshold > kl[1]
    steer = cf.causal_filter(
        ft,
        sae,
        tokens,
        shift_frame({0: 5.0, 1: 4.0}),
        mask,
        n_candidates=2,
        n_random=8,
        mode="steer",
        scale=4.0,
    )
    assert set(steer.table.index) == set(res.table.index) and (steer.table["kl"] > 0).all()


@pytest.mark.slow
def test_causal_filter_on_the_organism_runs_end_to_end(tmp_path: Any) -> None:
    res, sae = cf.causal_filter_on_organism(
        tmp_path,
        n_docs=48,
        max_rows=48,
        expansion=2,
        k=8,
        train_steps=20,
        batch_size=128,
        n_eval=2,
        n_candidates=4,
        n_random=4,
    )
    assert sae.cfg.metadata.hook_name == "blocks.2.hook_resid_pre"
    assert list(res.table["role"]) == ["candidate"] * 4 + ["random"] * 4
    assert (res.table["kl"] >= 0).all() and np.isfinite(res.table["kl"]).all()
    cand = res.table[res.table["role"] == "candidate"]
    assert (cand["freq_ratio"].diff().dropna() <= 0).all()  # ranked by firing shift
    assert set(res.kept) == set(cand.index[cand["kl"] > res.threshold])


@pytest.mark.slow
def test_runs_from_the_shipped_config(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    import yaml

    shipped = yaml.safe_load(
        (
            Path(__file__).resolve().parents[1]
            / "configs"
            / "analysis"
            / "causal_filter_organism.yaml"
        ).read_text()
    )
    small = {
        **shipped,
        "n_docs": 48,
        "max_rows": 48,
        "expansion": 2,
        "k": 8,
        "train_steps": 20,
        "batch_size": 128,
        "n_eval": 2,
        "n_candidates": 3,
        "n_random": 3,
    }
    cfg = tmp_path / "cf.yaml"
    cfg.write_text(yaml.safe_dump(small))
    assert cf.main(["--config", str(cfg), "--out", str(tmp_path / "out")]) == 0
    assert "kept" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "out" / "causal_filter.csv")
    assert len(table) == 6 and (tmp_path / "out" / "base_sae" / "cfg.json").is_file()
    cfg.write_text(yaml.safe_dump({**small, "n_candidate": 3}))
    with pytest.raises(ValueError, match=r"Unknown field\(s\) \['n_candidate'\]"):
        cf.main(["--config", str(cfg)])


# ---------------------------------------------------------------------------- split forward
def full_forward_kl(
    model: Any, sae: Any, tokens: torch.Tensor, latents: list[int], mask: torch.Tensor, **kw: Any
) -> torch.Tensor:
    """The reference: per latent, the whole model run with the intervention as a hook at
    ``kw["hook"]`` (written out here, independent of causal_filter), KL summed in float64."""
    hook, mode, scale = kw["hook"], kw["mode"], kw["scale"]
    pred = torch.zeros_like(mask)
    pred[:, :-1] = mask[:, 1:]
    out = torch.zeros(len(latents), dtype=torch.float64)
    with torch.no_grad():
        clean = model(tokens)
        for i, j in enumerate(latents):
            d = sae.W_dec[j]

            def edit(act: torch.Tensor, hook: Any = None, j: int = j, d: torch.Tensor = d) -> Any:
                if mode == "steer":
                    return act + scale * d / d.norm()
                return act - sae.encode(act)[..., j : j + 1] * d

            run = model.run_with_hooks(tokens, fwd_hooks=[(hook, edit)])
            out[i] = token_kl(clean, run)[pred].double().mean()
    return out


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(
    ("hook", "split"),
    [
        ("blocks.0.hook_resid_pre", True),  # split layer 0: the first half is the embedding
        ("blocks.1.hook_resid_pre", True),
        ("blocks.0.hook_resid_post", True),  # the same residual, named after block 0
        ("blocks.1.hook_resid_post", True),  # split layer n_layers: only ln_final + unembed
        ("blocks.1.hook_mlp_out", False),  # not on the residual stream: full forward per latent
        ("blocks.1.hook_resid_mid", False),  # inside a block: full forward per latent
    ],
)
@pytest.mark.parametrize("mode", ["ablate", "steer"])
def test_split_forward_equals_the_full_forward_with_a_hook(
    hook: str, split: bool, mode: str
) -> None:
    """The layers before the hook run once per batch (the embedding's calls counted), the rest
    once per latent, and every KL equals the full forward's with the intervention as a hook."""
    _, ft = tiny_pair()
    sae = base_sae([2.0] * N, biases={j: 0.5 for j in range(N)})
    tokens = random_tokens(batch=5, seq=12, seed=4)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 6:] = True
    mask[3] = False  # a row without assistant tokens
    latents = [0, 3, 7, 9]
    calls = count_calls(ft.embed)
    kl = cf.intervention_kl(ft, sae, tokens, latents, mask, hook_name=hook, mode=mode, batch_size=2)
    n_batches = 3  # rows 0-1, 2-3, 4 (2-3 still has row 2's tokens)
    assert calls[0] == n_batches * (1 if split else 1 + len(latents))
    ref = full_forward_kl(ft, sae, tokens, latents, mask, hook=hook, mode=mode, scale=4.0)
    assert (ref > 1e-4).all()
    assert torch.allclose(kl, ref, rtol=1e-5, atol=1e-7), (kl - ref).abs().max()


def test_split_forward_keeps_the_left_padding_mask() -> None:
    """A model whose tokenizer pads on the left builds its attention mask from the tokens; the
    split path (which starts mid-model, without tokens) must pass the same mask to both halves."""
    _, ft = tiny_pair(tokenizer=make_tokenizer())
    ft.tokenizer.padding_side = "left"
    sae = base_sae([2.0] * N, biases={j: 0.5 for j in range(N)})
    tokens = random_tokens(batch=4, seq=12, seed=5)
    tokens[:2, :4] = PAD_ID  # left padding, then BOS
    tokens[:2, 4] = BOS_ID
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 7:] = True
    kl = cf.intervention_kl(ft, sae, tokens, [1, 5], mask, batch_size=4)
    ref = full_forward_kl(ft, sae, tokens, [1, 5], mask, hook=HOOK, mode="ablate", scale=4.0)
    assert torch.allclose(kl, ref, rtol=1e-5, atol=1e-7), (kl - ref).abs().max()
    ft.tokenizer.padding_side = "right"  # the mask matters: without it the KL differs
    assert not torch.allclose(
        full_forward_kl(ft, sae, tokens, [1, 5], mask, hook=HOOK, mode="ablate", scale=4.0), ref
    )
