"""Converters for dictionary_learning checkpoints (the science-of-finetuning fork).

Layouts assumed (docs/interop.md states them for users):

``CrossCoder`` / ``BatchTopKCrossCoder`` (L models, d dims, n latents)::

    encoder.weight (L, d, n)   encoder.bias (n)
    decoder.weight (L, n, d)   decoder.bias (L, d)      [older embedding_bag decoders:
                                                          decoder.layers.{i}.weight (n, d)]
    code_normalization_id ()   1 crosscoder, 2 sae, 3 mixed, 4 none, 5 decoupled
    k (), threshold ()         BatchTopK only; theta is on the scores p_j * s_j
    activation_mean (L, d), activation_std (L, d), target_rms (), activation_global_scale (L)
                               optional normaliser; NaN = off

    x_n  = (x - mean) * scale[m],  scale = target_rms / sqrt(sum_i std[m, i]^2 + 1e-8)
    p    = ReLU(sum_m x_n^m @ encoder.weight[m] + encoder.bias)
    f    = p                          (CrossCoder)
         = p * (p * s > theta)        (BatchTopKCrossCoder at inference)
    xhat = (f @ decoder.weight[m] + decoder.bias[m]) / (scale[m] + 1e-8) + mean[m]

``BatchTopKSAE`` (nn.Linear conventions)::

    encoder.weight (n, d)  encoder.bias (n)  decoder.weight (d, n)  b_dec (d)  k ()  threshold ()
    activation_mean (d), activation_std (d), target_rms (), activation_global_scale ()

    x_n  = (x - mean) * scale
    p    = ReLU(encoder.weight @ (x_n - b_dec) + encoder.bias);  f = p * (p > theta)
    xhat = (decoder.weight @ f + b_dec) / (scale + 1e-8) + mean

Everything folds exactly into sae_diff's classes: the scale into the weights (recorded in
``cfg.norm_factors`` for crosscoders), the mean into ``b_enc``/``b_dec``, and the BatchTopK
threshold into per-latent thresholds ``theta / s_j`` on p, with s_j from the source's own
(normalised-space) decoder.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from sae_diff.dictionaries.batchtopk_crosscoder import JumpReLUCrosscoderConfig
from sae_diff.dictionaries.crosscoder import CrosscoderConfig
from sae_diff.dictionaries.diff_sae import DiffSAEConfig
from sae_diff.interop.common import (
    ConversionOptions,
    Normaliser,
    StateDict,
    check_config_sizes,
    check_shape,
    finish,
    inference_threshold,
    metadata,
    orient,
    parse_normaliser,
    require,
    thresholds_on_p,
    to64,
)
from sae_diff.interop.errors import InteropError, UnknownDictClassError, UnsupportedDictionaryError

CROSSCODER_CLASSES = ("CrossCoder", "BatchTopKCrossCoder")
SAE_CLASSES = ("BatchTopKSAE",)
DICT_CLASSES = CROSSCODER_CLASSES + SAE_CLASSES

# dictionary_learning's CodeNormalization enum (auto() values) -> name
CODE_NORMALIZATION_IDS = {1: "CROSSCODER", 2: "SAE", 3: "MIXED", 4: "NONE", 5: "DECOUPLED"}
CODE_NORMALISATION_LABELS = {"CROSSCODER": "crosscoder", "SAE": "sae", "NONE": "none"}
LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.weight$")


def detect_dict_class(state_dict: Mapping[str, torch.Tensor], where: str) -> str:
    """Guess ``dict_class`` from the keys of a checkpoint that came without a config."""
    enc = state_dict.get("encoder.weight")
    if enc is None:
        raise UnknownDictClassError("<no config.json>", DICT_CLASSES, where)
    batch_topk = "k" in state_dict or "threshold" in state_dict
    if enc.ndim == 3:
        return "BatchTopKCrossCoder" if batch_topk else "CrossCoder"
    if enc.ndim == 2 and batch_topk and "b_dec" in state_dict:
        return "BatchTopKSAE"
    raise UnknownDictClassError(
        "<no config.json; keys " + ", ".join(sorted(state_dict)[:8]) + ">", DICT_CLASSES, where
    )


def convert(
    state_dict: StateDict, config: Mapping[str, Any], opts: ConversionOptions, where: str
) -> tuple[dict[str, Any], StateDict]:
    """Convert a dictionary_learning checkpoint to (SAELens cfg dict, state dict).

    ``config`` is the flat constructor-argument dict of a Hub upload (``config.json`` with
    ``dict_class``) or a training config with those fields under ``"trainer"``.
    """
    trainer = config.get("trainer")
    if isinstance(trainer, Mapping):
        config = {**trainer, **{k: v for k, v in config.items() if k != "trainer"}}
    dict_class = opts.dict_class or config.get("dict_class") or detect_dict_class(state_dict, where)
    if dict_class in CROSSCODER_CLASSES:
        return convert_crosscoder(
            state_dict, config, opts, where, batch_topk=dict_class == "BatchTopKCrossCoder"
        )
    if dict_class in SAE_CLASSES:
        return convert_batchtopk_sae(state_dict, config, opts, where)
    raise UnknownDictClassError(str(dict_class), DICT_CLASSES, where)


# --- crosscoders -------------------------------------------------------------------------------


def source_code_normalisation(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], where: str
) -> str:
    """The source's code normalisation name (upper case), from the buffer and/or the config."""
    from_buffer = from_config = None
    if "code_normalization_id" in state_dict:
        cid = int(state_dict["code_normalization_id"].reshape(()))
        if cid not in CODE_NORMALIZATION_IDS:
            raise InteropError(
                f"{where}: code_normalization_id={cid} is not one of {CODE_NORMALIZATION_IDS}."
            )
        from_buffer = CODE_NORMALIZATION_IDS[cid]
    raw = config.get("code_normalization")
    if raw is not None:
        from_config = str(raw).split(".")[-1].upper()
        if from_config not in CODE_NORMALIZATION_IDS.values():
            raise InteropError(
                f"{where}: unknown code_normalization {raw!r} in config; expected one of "
                f"{sorted(CODE_NORMALIZATION_IDS.values())}."
            )
    if from_buffer and from_config and from_buffer != from_config:
        raise InteropError(
            f"{where}: code_normalization_id says {from_buffer} but config.json says {from_config}. "
            "Pass code_normalisation=... only after checking which one the model was trained with."
        )
    if from_buffer is None and from_config is None:
        warnings.warn(
            f"{where}: no code normalisation recorded (older checkpoint); assuming CROSSCODER, "
            "as dictionary_learning does.",
            stacklevel=3,
        )
        return "CROSSCODER"
    return str(from_buffer or from_config)


def source_code_scale(dec: torch.Tensor, mode: str, config: Mapping[str, Any]) -> torch.Tensor:
    """s_j as the source computes it, from its decoder ``(L, n, d)`` (normalised space)."""
    per_model = dec.norm(dim=2)  # (L, n)
    concat = dec.norm(dim=(0, 2))  # (n,)
    if mode == "CROSSCODER":
        return per_model.sum(0)
    if mode == "SAE":
        return concat
    if mode == "MIXED":
        a_sae = float(config.get("code_normalization_alpha_sae", 1.0) or 0.0)
        a_cc = float(config.get("code_normalization_alpha_cc", 0.1) or 0.0)
        return a_sae * concat + a_cc * per_model.sum(0)
    if mode == "NONE":
        return torch.ones_like(concat)
    raise UnsupportedDictionaryError(f"No single-code scale for code normalisation {mode}.")


def crosscoder_decoder(state_dict: StateDict) -> torch.Tensor | None:
    """``decoder.weight``, or the older per-layer embedding_bag weights stacked to ``(L, n, d)``."""
    if "decoder.weight" in state_dict:
        return state_dict["decoder.weight"]
    layers = sorted(
        (int(m.group(1)), v) for k, v in state_dict.items() if (m := LAYER_KEY.match(k))
    )
    if not layers:
        return None
    return torch.stack([v for _, v in layers])


def convert_crosscoder(
    state_dict: StateDict,
    config: Mapping[str, Any],
    opts: ConversionOptions,
    where: str,
    batch_topk: bool,
) -> tuple[dict[str, Any], StateDict]:
    """``CrossCoder`` -> ``crosscoder``; ``BatchTopKCrossCoder`` -> ``jumprelu_crosscoder``."""
    dec_raw = crosscoder_decoder(state_dict)
    required = ["encoder.weight", "encoder.bias", "decoder.bias"] + (
        ["decoder.weight"] if dec_raw is None else []
    )
    require(state_dict, required, where)
    assert dec_raw is not None
    b_enc = to64(state_dict["encoder.bias"])
    dec_b = to64(state_dict["decoder.bias"])
    if b_enc.ndim != 1 or dec_b.ndim != 2:
        raise InteropError(
            f"{where}: encoder.bias should be (n,) and decoder.bias (L, d); got "
            f"{tuple(b_enc.shape)} and {tuple(dec_b.shape)}."
        )
    n, (n_models, d) = b_enc.shape[0], tuple(dec_b.shape)
    check_config_sizes(
        config,
        {("activation_dim",): d, ("dict_size",): n, ("num_layers", "num_encoder_layers"): n_models},
        where,
    )
    enc_layers = config.get("encoder_layers") or config.get("encoder_layers_indices")
    if enc_layers is not None and list(enc_layers) != list(range(n_models)):
        raise UnsupportedDictionaryError(
            f"{where}: the encoder reads layers {list(enc_layers)} only; sae_diff crosscoders encode "
            "every model they decode. Not supported."
        )
    enc = to64(
        orient(state_dict["encoder.weight"], "encoder.weight", (n_models, d, n), (1, 2), where)
    )
    dec = to64(orient(dec_raw, "decoder.weight", (n_models, n, d), (1, 2), where))
    mode = source_code_normalisation(state_dict, config, where)
    if mode == "DECOUPLED" and batch_topk:
        raise UnsupportedDictionaryError(
            f"{where}: a BatchTopKCrossCoder with a 'decoupled' code keeps one code per model "
            "(thresholds and top-k per model); sae_diff's crosscoders have one shared code. "
            "Not supported: loading it as a shared code would change its encodings."
        )
    label = opts.code_normalisation or CODE_NORMALISATION_LABELS.get(mode)
    if label is None:
        raise UnsupportedDictionaryError(
            f"{where}: the source's code normalisation is {mode}, which sae_diff's config cannot "
            "record. Encode/decode still convert exactly (BatchTopK thresholds use the source's own "
            f"{mode.lower()} scale); pass code_normalisation='crosscoder', 'sae' or 'none' to choose "
            "the label sae_diff records (it only affects sae.code_scale())."
        )
    norm = parse_normaliser(state_dict, config, (n_models, d), where)
    threshold = None
    if batch_topk:
        threshold = thresholds_on_p(
            inference_threshold(state_dict, opts, where), source_code_scale(dec, mode, config)
        )
    if opts.base_index == 1:
        if n_models != 2:
            raise InteropError(
                f"{where}: base_index=1 swaps two models, but the checkpoint has {n_models}."
            )
        enc, dec, dec_b = enc.flip(0), dec.flip(0), dec_b.flip(0)
        if norm is not None:
            norm = Normaliser(mean=norm.mean.flip(0), scale=norm.scale.flip(0))
    tensors = fold_crosscoder(enc, b_enc, dec, dec_b, norm)
    common: dict[str, Any] = dict(
        d_in=d,
        d_sae=n,
        n_models=n_models,
        code_normalisation=label,
        norm_factors=None if norm is None else [float(v) for v in norm.scale],
        dtype=opts.dtype,
        device=opts.device,
    )
    source = {
        "format": "dictionary_learning",
        "dict_class": "BatchTopKCrossCoder" if batch_topk else "CrossCoder",
        "where": where,
        "code_normalization": mode,
        "normaliser_folded": norm is not None,
        "base_index": opts.base_index,
    }
    if batch_topk:
        assert threshold is not None
        tensors["threshold"] = threshold
        k = state_dict.get("k")
        k_val = float(k.reshape(())) if k is not None else config.get("k")
        cfg: Any = JumpReLUCrosscoderConfig(
            **common, k=None if k_val is None else float(k_val), metadata=metadata(opts, source)
        )
    else:
        cfg = CrosscoderConfig(**common, metadata=metadata(opts, source))
    return finish(cfg, tensors)


def fold_crosscoder(
    enc: torch.Tensor,
    b_enc: torch.Tensor,
    dec: torch.Tensor,
    dec_b: torch.Tensor,
    norm: Normaliser | None,
) -> StateDict:
    """Source tensors (+ normaliser) -> sae_diff layout working on raw activations.

    With ``x_n = (x - mu) * g``: ``W_enc^m = g_m enc^m``, ``b_enc = b - sum_m (g_m mu^m) @ enc^m``,
    ``W_dec[:, m] = dec^m / (g_m + 1e-8)``, ``b_dec^m = dec_b^m / (g_m + 1e-8) + mu^m``.
    """
    w_enc, w_dec, b_dec = enc.clone(), dec.permute(1, 0, 2).clone(), dec_b.clone()
    b = b_enc.clone()
    if norm is not None:
        g, mu = norm.scale, norm.mean
        w_enc = enc * g[:, None, None]
        b = b_enc - torch.einsum("md,mdn->n", mu * g[:, None], enc)
        w_dec = w_dec / norm.out_scale[None, :, None]
        b_dec = dec_b / norm.out_scale[:, None] + mu
    return {"W_enc": w_enc, "b_enc": b, "W_dec": w_dec, "b_dec": b_dec}


# --- BatchTopK SAEs (chat-SAE, base-SAE, diff-SAE) -------------------------------------------------


def convert_batchtopk_sae(
    state_dict: StateDict, config: Mapping[str, Any], opts: ConversionOptions, where: str
) -> tuple[dict[str, Any], StateDict]:
    """``BatchTopKSAE`` -> SAELens ``jumprelu`` (or sae_diff ``diff_sae`` when ``diff_sign`` is given)."""
    require(state_dict, ["encoder.weight", "encoder.bias", "decoder.weight", "b_dec"], where)
    b_enc, b_dec = to64(state_dict["encoder.bias"]), to64(state_dict["b_dec"])
    if b_enc.ndim != 1 or b_dec.ndim != 1:
        raise InteropError(
            f"{where}: encoder.bias and b_dec should be vectors; got "
            f"{tuple(b_enc.shape)} and {tuple(b_dec.shape)}."
        )
    n, d = b_enc.shape[0], b_dec.shape[0]
    check_config_sizes(config, {("activation_dim",): d, ("dict_size",): n}, where)
    enc = to64(orient(state_dict["encoder.weight"], "encoder.weight", (n, d), (0, 1), where))
    embedding_bag = config.get("decoder_type") == "embedding_bag"
    dec = to64(
        orient(
            state_dict["decoder.weight"],
            "decoder.weight",
            (d, n),
            (0, 1),
            where,
            prefer_transposed=embedding_bag,
        )
    )
    norm = parse_normaliser(state_dict, config, (d,), where)
    theta = inference_threshold(state_dict, opts, where)
    if norm is None:
        apply_b_dec = True
        tensors = {"W_enc": enc.T.clone(), "b_enc": b_enc, "W_dec": dec.T.clone(), "b_dec": b_dec}
    else:  # fold: pre = (g W) x + b - W (g mu + b_dec); out = (W_d f + b_dec) / (g + eps) + mu
        apply_b_dec = False
        g, mu = norm.scale.reshape(()), norm.mean
        tensors = {
            "W_enc": g * enc.T,
            "b_enc": b_enc - enc @ (g * mu + b_dec),
            "W_dec": dec.T / norm.out_scale.reshape(()),
            "b_dec": b_dec / norm.out_scale.reshape(()) + mu,
        }
    tensors["threshold"] = torch.full((n,), theta, dtype=torch.float64)
    k = state_dict.get("k")
    k_val = float(k.reshape(())) if k is not None else config.get("k")
    source = {
        "format": "dictionary_learning",
        "dict_class": "BatchTopKSAE",
        "where": where,
        "normaliser_folded": norm is not None,
        "normaliser_scale": None if norm is None else float(norm.scale.reshape(())),
        "k": None if k_val is None else float(k_val),
    }
    common: dict[str, Any] = dict(
        d_in=d,
        d_sae=n,
        dtype=opts.dtype,
        device=opts.device,
        apply_b_dec_to_input=apply_b_dec,
        metadata=metadata(opts, source),
    )
    if opts.diff_sign is not None:
        cfg: Any = DiffSAEConfig(
            **common, diff_sign=opts.diff_sign, k=None if k_val is None else float(k_val)
        )
    else:
        from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig

        cfg = JumpReLUSAEConfig(**common)
    check_shape(tensors["threshold"], "threshold", (n,), where)
    return finish(cfg, tensors)
