"""Checkpoints in published layouts, built from random weights, and their forward passes.

Nothing here is foreign code: the writers use the documented key names, shapes and config
fields (docs/interop.md), and the reference forwards are written from that description,
independently of ``sae_diff.interop``:

dictionary_learning CrossCoder / BatchTopKCrossCoder (L models, d dims, n latents)::

    x_n  = (x - mean) * g,  g_m = target_rms / sqrt(sum_i std[m, i]^2 + 1e-8)   (normaliser on)
    p    = ReLU(einsum('bld,ldn->bn', x_n, encoder.weight) + encoder.bias)
    f    = p * (p * s > theta)   (BatchTopK; s from decoder.weight per code normalisation)
    xhat = (einsum('bn,lnd->bld', f, decoder.weight) + decoder.bias) / (g + 1e-8) + mean

dictionary_learning BatchTopKSAE (nn.Linear: encoder.weight (n, d), decoder.weight (d, n))::

    p = ReLU((x_n - b_dec) @ encoder.weight.T + encoder.bias);  f = p * (p > theta)
    xhat = (f @ decoder.weight.T + b_dec) / (g + 1e-8) + mean

Replication (W_enc (2, d, n), W_dec (n, 2, d)), inputs pre-scaled by c_m::

    f = ReLU(einsum('bmd,mdn->bn', c * x, W_enc) + b_enc);  xhat_n = einsum('bn,nmd->bmd', f, W_dec) + b_dec
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

CODE_IDS = {"CROSSCODER": 1, "SAE": 2, "MIXED": 3, "NONE": 4, "DECOUPLED": 5}
ALPHA_SAE, ALPHA_CC = 1.0, 0.1
EPS = 1e-8


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample_inputs(shape: tuple[int, ...], seed: int = 1, offset: float = 3.0) -> torch.Tensor:
    """Activations with a non-zero mean and a few large dims, like a residual stream."""
    g = _gen(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * 2.0 + offset


# --- dictionary_learning crosscoders -----------------------------------------------------------


def dl_crosscoder_state(
    L: int,
    d: int,
    n: int,
    *,
    batch_topk: bool,
    code: str = "CROSSCODER",
    normaliser: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    sd = {
        "encoder.weight": torch.randn(L, d, n, generator=g) / d**0.5,
        "encoder.bias": torch.randn(n, generator=g) * 0.1,
        "decoder.weight": torch.randn(L, n, d, generator=g)
        * (0.5 + torch.rand(L, n, 1, generator=g))
        / d**0.5,
        "decoder.bias": torch.randn(L, d, generator=g) * 0.1,
        "code_normalization_id": torch.tensor(CODE_IDS[code]),
    }
    if normaliser:
        sd["activation_mean"] = torch.randn(L, d, generator=g) + 3.0
        sd["activation_std"] = 1.5 + torch.rand(L, d, generator=g)
        sd["target_rms"] = torch.tensor(2.0)
    if batch_topk:
        sd["k"] = torch.tensor(3, dtype=torch.int32)
        sd["threshold"] = torch.tensor(-1.0)
        # a realistic theta: the median positive selection score on sample inputs
        x = sample_inputs((64, L, d), seed=seed + 100).float()
        p = ref_dl_crosscoder_pre(sd, x.double())
        v = p * ref_code_scale(sd["decoder.weight"].double(), code)
        sd["threshold"] = torch.tensor(float(v[v > 0].median()))
    return sd


def ref_code_scale(dec: torch.Tensor, code: str) -> torch.Tensor:
    if code == "CROSSCODER":
        return dec.norm(dim=2).sum(0)
    if code == "SAE":
        return dec.norm(dim=(0, 2))
    if code == "MIXED":
        return ALPHA_SAE * dec.norm(dim=(0, 2)) + ALPHA_CC * dec.norm(dim=2).sum(0)
    return torch.ones(dec.shape[1], dtype=dec.dtype)


def _ref_norm(sd: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    if "activation_mean" not in sd or torch.isnan(sd["activation_mean"]).all():
        return None
    std = sd["activation_std"].double()
    scale = sd["target_rms"].double() / torch.sqrt((std**2).sum(-1) + EPS)
    return sd["activation_mean"].double(), scale


def ref_dl_crosscoder_pre(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    norm = _ref_norm(sd)
    if norm is not None:
        x = (x - norm[0]) * norm[1][:, None]
    pre = (
        torch.einsum("bld,ldn->bn", x, sd["encoder.weight"].double()) + sd["encoder.bias"].double()
    )
    return torch.relu(pre)


def ref_dl_crosscoder(
    sd: dict[str, torch.Tensor], x: torch.Tensor, *, batch_topk: bool, code: str = "CROSSCODER"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, reconstruction) of the source crosscoder, in float64."""
    p = ref_dl_crosscoder_pre(sd, x)
    dec = sd["decoder.weight"].double()
    f = p * ((p * ref_code_scale(dec, code)) > float(sd["threshold"])) if batch_topk else p
    xhat = torch.einsum("bn,lnd->bld", f, dec) + sd["decoder.bias"].double()
    norm = _ref_norm(sd)
    if norm is not None:
        xhat = xhat / (norm[1][:, None] + EPS) + norm[0]
    return f, xhat


# --- dictionary_learning BatchTopKSAE ----------------------------------------------------------


def dl_sae_state(
    d: int, n: int, *, normaliser: bool = False, seed: int = 0
) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    dec = torch.randn(d, n, generator=g)
    sd = {
        "encoder.weight": torch.randn(n, d, generator=g) / d**0.5,
        "encoder.bias": torch.randn(n, generator=g) * 0.1,
        "decoder.weight": dec / dec.norm(dim=0, keepdim=True),
        "b_dec": torch.randn(d, generator=g) * 0.1,
        "k": torch.tensor(4, dtype=torch.int32),
        "threshold": torch.tensor(0.0),
    }
    if normaliser:
        sd["activation_mean"] = torch.randn(d, generator=g) + 2.0
        sd["activation_std"] = 1.0 + torch.rand(d, generator=g)
        sd["target_rms"] = torch.tensor(1.0)
        std = sd["activation_std"].double()
        sd["activation_global_scale"] = (
            sd["target_rms"] / torch.sqrt((std**2).sum() + EPS)
        ).float()
    p = ref_dl_sae(sd, sample_inputs((64, d), seed=seed + 100), pre_only=True)[0]
    sd["threshold"] = torch.tensor(float(p[p > 0].median()))
    return sd


def ref_dl_sae(
    sd: dict[str, torch.Tensor], x: torch.Tensor, pre_only: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, reconstruction) of a dictionary_learning BatchTopKSAE, in float64."""
    norm = _ref_norm(sd)
    if norm is not None:
        x = (x - norm[0]) * norm[1]
    p = torch.relu(
        (x - sd["b_dec"].double()) @ sd["encoder.weight"].double().T + sd["encoder.bias"].double()
    )
    if pre_only:
        return p, p
    f = p * (p > float(sd["threshold"]))
    xhat = f @ sd["decoder.weight"].double().T + sd["b_dec"].double()
    if norm is not None:
        xhat = xhat / (norm[1] + EPS) + norm[0]
    return f, xhat


# --- replication ---------------------------------------------------------------------------------


def replication_state(d: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    return {
        "W_enc": torch.randn(2, d, n, generator=g) / d**0.5,
        "W_dec": torch.randn(n, 2, d, generator=g)
        * (0.3 + torch.rand(n, 2, 1, generator=g))
        / d**0.5,
        "b_enc": torch.randn(n, generator=g) * 0.1,
        "b_dec": torch.randn(2, d, generator=g) * 0.1,
    }


def ref_replication(
    sd: dict[str, torch.Tensor], x_scaled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, normalised-space reconstruction) for inputs already multiplied by c_m."""
    f = torch.relu(
        torch.einsum("bmd,mdn->bn", x_scaled, sd["W_enc"].double()) + sd["b_enc"].double()
    )
    return f, torch.einsum("bn,nmd->bmd", f, sd["W_dec"].double()) + sd["b_dec"].double()


# --- writers ------------------------------------------------------------------------------------


def write_dl(
    folder: Path,
    sd: dict[str, torch.Tensor],
    config: dict[str, Any] | None,
    weights: str = "model.safetensors",
    compile_prefix: bool = False,
) -> Path:
    """A dictionary_learning Hub-style folder: config.json + model.safetensors (or a .pt)."""
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    tensors = {("_orig_mod." + k if compile_prefix else k): v.contiguous() for k, v in sd.items()}
    if weights.endswith(".safetensors"):
        save_file(tensors, str(folder / weights))
    else:
        torch.save(tensors, folder / weights)
    return folder


def dl_crosscoder_config(
    L: int, d: int, n: int, *, batch_topk: bool, code: str = "CROSSCODER"
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "activation_dim": d,
        "dict_size": n,
        "num_layers": L,
        "code_normalization": code,
        "code_normalization_alpha_sae": ALPHA_SAE,
        "code_normalization_alpha_cc": ALPHA_CC,
        "dict_class": "BatchTopKCrossCoder" if batch_topk else "CrossCoder",
    }
    if batch_topk:
        cfg["k"] = 3
    return cfg


def dl_sae_config(d: int, n: int) -> dict[str, Any]:
    return {"activation_dim": d, "dict_size": n, "k": 4, "dict_class": "BatchTopKSAE"}


def write_replication(folder: Path, sd: dict[str, torch.Tensor], d: int, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(
        json.dumps(
            {
                "d_in": d,
                "dict_size": n,
                "model_name": "gemma-2-2b",
                "hook_point": "blocks.14.hook_resid_pre",
                "enc_dtype": "fp32",
                "l1_coeff": 2,
            }
        )
    )
    torch.save(sd, folder / "cc_weights.pt")
    return folder
