"""Shared builders for the evaluation tests (no tests here): a planted model pair, hand-built
perfect dictionaries and planted dictionaries.

- ``planted_pair``: ft = base except block ``layer - 1``'s MLP output bias, so at the residual
  before block ``layer`` x^c - x^b = v at every position and the two second halves coincide.
- ``perfect_crosscoder``: d_sae = 4d, latents ±e_k per model: decode(encode(x)) == x exactly.
- ``perfect_diff_sae``: d_sae = 2d, latents ±e_k on the difference: SAE(D) == D exactly.
- ``planted_crosscoder`` / ``planted_diff_sae``: latent 0 always on and carries exactly v;
  the other latents are shared (crosscoder) or dead (diff-SAE).
"""

from __future__ import annotations

import copy

import torch
from helpers_models import make_tokenizer, tiny_cfg
from transformer_lens import HookedTransformer

import sae_diff  # noqa: F401  (registers the architectures)
from sae_diff.dictionaries.crosscoder import Crosscoder, CrosscoderConfig
from sae_diff.dictionaries.diff_sae import DiffSAE, DiffSAEConfig
from sae_diff.pairing.model import PairedModel


def planted_pair(
    n_layers: int = 2, d_model: int = 16, layer: int = 1, scale: float = 4.0
) -> tuple[PairedModel, torch.Tensor]:
    """(pair, v): ft differs from base only by ``v`` added to block ``layer-1``'s MLP output."""
    tok = make_tokenizer()
    cfg = tiny_cfg(n_layers=n_layers, d_model=d_model)
    torch.manual_seed(0)
    base = HookedTransformer(cfg, tokenizer=tok, default_padding_side="right")
    ft = HookedTransformer(copy.deepcopy(cfg), tokenizer=tok, default_padding_side="right")
    ft.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(3)
    v = torch.randn(d_model, generator=g)
    v = scale * v / v.norm()
    with torch.no_grad():
        ft.blocks[layer - 1].mlp.b_out.add_(v)
    base.eval()
    ft.eval()
    return PairedModel(base, ft), v


def _meta(sae, hook_name: str | None) -> None:
    if hook_name is not None:
        sae.cfg.metadata.hook_name = hook_name


def perfect_crosscoder(
    d: int, hook_name: str | None = None, bias: torch.Tensor | None = None
) -> Crosscoder:
    """decode(encode(x)) == x for any paired x (4d latents, ±e_k per model).
    ``bias`` (2, d) sets b_dec and shifts b_enc so that reconstruction stays exact."""
    cc = Crosscoder(CrosscoderConfig(d_in=d, d_sae=4 * d))
    with torch.no_grad():
        for p in (cc.W_enc, cc.W_dec, cc.b_enc, cc.b_dec):
            p.zero_()
        j = 0
        for m in range(2):
            for k in range(d):
                for s in (1.0, -1.0):
                    cc.W_enc[m, k, j] = s
                    cc.W_dec[j, m, k] = s
                    if bias is not None:
                        cc.b_enc[j] = -s * float(bias[m, k])
                    j += 1
        if bias is not None:
            cc.b_dec.copy_(bias)
    _meta(cc, hook_name)
    return cc


def perfect_diff_sae(d: int, hook_name: str | None = None, sign: str = "ft_minus_base") -> DiffSAE:
    """SAE(D) == D for any difference D (2d latents, ±e_k)."""
    ds = DiffSAE(DiffSAEConfig(d_in=d, d_sae=2 * d, diff_sign=sign))
    eye = torch.eye(d)
    with torch.no_grad():
        ds.W_enc.copy_(torch.cat([eye, -eye], 1))
        ds.W_dec.copy_(torch.cat([eye, -eye], 0))
        ds.b_enc.zero_()
        ds.b_dec.zero_()
        ds.threshold.zero_()
    _meta(ds, hook_name)
    return ds


def planted_crosscoder(v: torch.Tensor, n: int = 32, hook_name: str | None = None) -> Crosscoder:
    """Latent 0: always 1, d^c = v, d^b = 0 (ft-only). Others: random encoders, shared
    decoders (d^b = d^c), so they add nothing to xhat^c - xhat^b."""
    d = v.numel()
    cc = Crosscoder(CrosscoderConfig(d_in=d, d_sae=n))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        cc.W_enc.copy_(torch.randn(2, d, n, generator=g) / d**0.5)
        cc.W_enc[:, :, 0] = 0
        cc.b_enc.zero_()
        cc.b_enc[0] = 1.0
        shared = 0.3 * torch.randn(n, d, generator=g)
        cc.W_dec.copy_(torch.stack([shared, shared], dim=1))
        cc.W_dec[0, 0] = 0
        cc.W_dec[0, 1] = v
        cc.b_dec.zero_()
    _meta(cc, hook_name)
    return cc


def planted_diff_sae(
    v: torch.Tensor, n: int = 32, hook_name: str | None = None, sign: str = "ft_minus_base"
) -> DiffSAE:
    """Latent 0 always on (f = 1) decoding to ±v per ``sign``; every other latent dead."""
    d = v.numel()
    ds = DiffSAE(DiffSAEConfig(d_in=d, d_sae=n, diff_sign=sign))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        ds.W_enc.zero_()
        ds.b_enc.fill_(-1.0)
        ds.b_enc[0] = 1.0
        ds.W_dec.copy_(torch.randn(n, d, generator=g))
        ds.W_dec[0] = v if sign == "ft_minus_base" else -v
        ds.b_dec.zero_()
        ds.threshold.zero_()
    _meta(ds, hook_name)
    return ds
