"""Converter for the first open crosscoder replication (ckkissane's ``crosscoder-model-diff-replication``).

Files: ``cfg.json`` (its training config: ``d_in``, ``dict_size``, ``model_name``,
``hook_point``, ...) and ``cc_weights.pt``, a state dict with::

    W_enc (2, d, n)   b_enc (n)   W_dec (n, 2, d)   b_dec (2, d)

    f    = ReLU(sum_m x_n^m @ W_enc[m] + b_enc)      x_n^m = c_m x^m
    xhat_n^m = f @ W_dec[:, m] + b_dec[m]

No normalisation is stored: its README asks users to multiply each model's activations by a
per-model factor c_m before encoding. Pass those factors as ``norm_factors=[c_0, c_1]`` (in
the checkpoint's model order; with ``base_index=1`` they are swapped along with the weights):
they are folded (``W_enc^m *= c_m``; ``W_dec[:, m], b_dec^m /= c_m``) and recorded in
``cfg.norm_factors``, so the converted crosscoder reads and writes raw activations. Without
them the weights are kept as they are and expect pre-scaled inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from sae_diff.dictionaries.crosscoder import CrosscoderConfig
from sae_diff.interop.common import (
    ConversionOptions,
    StateDict,
    check_config_sizes,
    check_shape,
    finish,
    metadata,
    require,
    to64,
)
from sae_diff.interop.errors import InteropError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "cc_weights.pt"
KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")


def convert(
    state_dict: StateDict, config: Mapping[str, Any], opts: ConversionOptions, where: str
) -> tuple[dict[str, Any], StateDict]:
    """Replication checkpoint -> sae_diff ``crosscoder`` (ReLU), scalars folded if given."""
    require(state_dict, KEYS, where)
    b_enc, b_dec = to64(state_dict["b_enc"]), to64(state_dict["b_dec"])
    if b_enc.ndim != 1 or b_dec.ndim != 2:
        raise InteropError(
            f"{where}: b_enc should be (n,) and b_dec (2, d); got "
            f"{tuple(b_enc.shape)} and {tuple(b_dec.shape)}."
        )
    n, (n_models, d) = b_enc.shape[0], tuple(b_dec.shape)
    check_config_sizes(config, {("d_in",): d, ("dict_size",): n}, where)
    w_enc = to64(check_shape(state_dict["W_enc"], "W_enc", (n_models, d, n), where))
    w_dec = to64(check_shape(state_dict["W_dec"], "W_dec", (n, n_models, d), where))
    if opts.base_index == 1:
        w_enc, w_dec, b_dec = w_enc.flip(0), w_dec.flip(1), b_dec.flip(0)
    factors = None
    tensors = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}
    if opts.norm_factors is not None:
        c = torch.as_tensor(list(opts.norm_factors), dtype=torch.float64).reshape(-1)
        if c.numel() != n_models or not torch.isfinite(c).all() or (c <= 0).any():
            raise InteropError(
                f"norm_factors must be {n_models} positive finite scalars (one per model, "
                f"in the checkpoint's model order), got {c.tolist()}."
            )
        if opts.base_index == 1:
            c = c.flip(0)  # the factors follow the source's model order, like the weights
        tensors["W_enc"] = w_enc * c[:, None, None]
        tensors["W_dec"] = w_dec / c[None, :, None]
        tensors["b_dec"] = b_dec / c[:, None]
        factors = [float(v) for v in c]
    else:
        warnings.warn(
            f"{where}: no norm_factors given. The replication's crosscoder expects each model's "
            "activations multiplied by its scaling factor; the converted dictionary keeps that "
            "expectation. Pass norm_factors=[c_0, c_1] to fold them and work on raw activations.",
            stacklevel=3,
        )
    if opts.hook_name is None and config.get("hook_point"):
        opts = replace(opts, hook_name=str(config["hook_point"]))
    source = {
        "format": "crosscoder_replication",
        "where": where,
        "norm_factors_folded": factors is not None,
        "source_model_name": config.get("model_name"),
        "base_index": opts.base_index,
    }
    cfg = CrosscoderConfig(
        d_in=d,
        d_sae=n,
        n_models=n_models,
        code_normalisation=opts.code_normalisation or "crosscoder",
        norm_factors=factors,
        dtype=opts.dtype,
        device=opts.device,
        metadata=metadata(opts, source),
    )
    return finish(cfg, tensors)
