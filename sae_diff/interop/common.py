"""Pieces every converter shares: options, key/shape checks, the activation normaliser, output.

All folding is done in float64 and cast to the requested dtype at the end, so that a
converted dictionary reproduces the source's forward pass to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from sae_lens.saes.sae import SAEConfig, SAEMetadata
from sae_lens.util import str_to_dtype

from sae_diff.interop.errors import MissingKeysError, ShapeMismatchError, UnsupportedDictionaryError

NORMALISER_EPS = 1e-8  # the source adds 1e-8 inside the sqrt and to the scale when un-normalising
NORMALISER_KEYS = ("activation_mean", "activation_std", "target_rms", "activation_global_scale")

StateDict = dict[str, torch.Tensor]


@dataclass
class ConversionOptions:
    """What the checkpoint does not say, supplied by the caller (see ``sae_diff.interop.load``)."""

    dict_class: str | None = None
    diff_sign: str | None = None
    norm_factors: Sequence[float] | None = None
    base_index: int = 0
    code_normalisation: str | None = None
    threshold: float | None = None
    model_name: str | None = None
    base_model_name: str | None = None
    hook_name: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    extra_metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.base_index not in (0, 1):
            raise ValueError(
                f"base_index must be 0 or 1 (which source model is the base), got {self.base_index}."
            )


def require(state_dict: Mapping[str, Any], keys: Sequence[str], where: str, hint: str = "") -> None:
    """Raise :class:`MissingKeysError` naming every key of ``keys`` absent from ``state_dict``."""
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise MissingKeysError(missing, where, hint)


def check_shape(t: torch.Tensor, name: str, expected: tuple[int, ...], where: str) -> torch.Tensor:
    """Return ``t`` if shaped ``expected``, else raise naming the tensor and both shapes."""
    if tuple(t.shape) != expected:
        raise ShapeMismatchError(
            f"{where}: {name} has shape {tuple(t.shape)}, expected {expected}. The checkpoint's "
            "tensors disagree with each other or with its config; it may be truncated or of "
            "another format."
        )
    return t


def orient(
    t: torch.Tensor,
    name: str,
    expected: tuple[int, ...],
    dims: tuple[int, int],
    where: str,
    prefer_transposed: bool = False,
) -> torch.Tensor:
    """Return ``t`` shaped ``expected``, transposing ``dims`` if it arrives the other way round.

    Transposition is detected by shape, so it is only unambiguous when the two swapped sizes
    differ; when they are equal the documented layout is assumed (``prefer_transposed`` flips
    that assumption, e.g. for an ``embedding_bag`` decoder declared in the config).
    """
    swapped = list(expected)
    swapped[dims[0]], swapped[dims[1]] = expected[dims[1]], expected[dims[0]]
    if tuple(t.shape) == expected and not (prefer_transposed and tuple(swapped) == expected):
        return t
    if tuple(t.shape) == tuple(swapped):
        return t.transpose(*dims)
    return check_shape(t, name, expected, where)


def to64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def config_int(config: Mapping[str, Any], names: Sequence[str]) -> int | None:
    """The first of ``names`` present in ``config`` as an int (None if none is)."""
    for name in names:
        value = config.get(name)
        if value is not None:
            return int(value)
    return None


def check_config_sizes(
    config: Mapping[str, Any], sizes: Mapping[tuple[str, ...], int], where: str
) -> None:
    """Config fields (any alias) that are present must equal the sizes read off the tensors."""
    for names, actual in sizes.items():
        declared = config_int(config, names)
        if declared is not None and declared != actual:
            raise ShapeMismatchError(
                f"{where}: config says {names[0]}={declared} but the weights give {actual}. "
                "The config and the weights do not belong together."
            )


@dataclass
class Normaliser:
    """The source's activation normaliser: ``x_n = (x - mean) * scale`` and back.

    ``mean`` is ``(*lead, d)``; ``scale`` is ``lead`` (one scalar per model for a crosscoder,
    a 0-d tensor for an SAE). Decoding un-normalises with ``x = x_n / (scale + 1e-8) + mean``,
    exactly as the source does.
    """

    mean: torch.Tensor
    scale: torch.Tensor

    @property
    def out_scale(self) -> torch.Tensor:
        return self.scale + NORMALISER_EPS


def parse_normaliser(
    state_dict: StateDict, config: Mapping[str, Any], shape: tuple[int, ...], where: str
) -> Normaliser | None:
    """Read the normaliser buffers; None when absent or unset (NaN, as the source stores "off").

    The scale is the ``activation_global_scale`` buffer when present (what the source's forward
    uses), else ``target_rms / sqrt(sum(activation_std**2, -1) + 1e-8)``.
    """
    present = [k for k in NORMALISER_KEYS if k in state_dict]
    if not present:
        return None
    require(
        state_dict,
        ["activation_mean", "activation_std"],
        where,
        hint="The normaliser needs activation_mean and activation_std (and target_rms or "
        "activation_global_scale); the checkpoint has only some of them.",
    )
    mean, std = to64(state_dict["activation_mean"]), to64(state_dict["activation_std"])
    if torch.isnan(mean).all() and torch.isnan(std).all():
        return None  # the source's marker for "no normaliser"
    if torch.isnan(mean).any() or torch.isnan(std).any():
        raise UnsupportedDictionaryError(
            f"{where}: activation_mean/activation_std are partly NaN; the source would treat the "
            "normaliser as off while its statistics are half set. Fix or drop these buffers."
        )
    if config.get("keep_relative_variance", True) is False:
        raise UnsupportedDictionaryError(
            f"{where}: keep_relative_variance=False standardises each dimension separately; "
            "sae_diff records one scalar per model (cfg.norm_factors), so the fold would change "
            "the decoder geometry. Not supported."
        )
    check_shape(mean, "activation_mean", shape, where)
    check_shape(std, "activation_std", shape, where)
    lead = shape[:-1]
    scale_buf = state_dict.get("activation_global_scale")
    if scale_buf is not None and torch.isfinite(scale_buf).all():
        scale = to64(scale_buf)
        if scale.numel() != _prod(lead):
            check_shape(scale, "activation_global_scale", lead, where)
        scale = scale.reshape(lead)
    else:
        require(
            state_dict,
            ["target_rms"],
            where,
            hint="Without activation_global_scale the scale is target_rms / sqrt(sum std^2).",
        )
        target = to64(state_dict["target_rms"])
        scale = target / torch.sqrt((std**2).sum(-1) + NORMALISER_EPS)
    if not torch.isfinite(scale).all() or (scale <= 0).any():
        raise UnsupportedDictionaryError(
            f"{where}: normaliser scale {scale.tolist()} is not positive and finite."
        )
    return Normaliser(mean=mean, scale=scale)


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def scalar(state_dict: StateDict, key: str) -> float:
    return float(state_dict[key].reshape(-1)[0])


def inference_threshold(state_dict: StateDict, opts: ConversionOptions, where: str) -> float:
    """The source's scalar inference threshold theta (``opts.threshold`` overrides the buffer)."""
    if opts.threshold is not None:
        return float(opts.threshold)
    require(
        state_dict,
        ["threshold"],
        where,
        hint="A BatchTopK checkpoint stores its inference threshold in the 'threshold' buffer; "
        "pass threshold=<value> if you know it.",
    )
    t = state_dict["threshold"]
    if t.numel() != 1:
        raise UnsupportedDictionaryError(
            f"{where}: threshold has shape {tuple(t.shape)}; a per-model threshold belongs to a "
            "'decoupled' code (one code per model), which sae_diff's single-code classes cannot "
            "represent."
        )
    theta = float(t.reshape(()))
    if theta < 0:
        raise UnsupportedDictionaryError(
            f"{where}: the inference threshold was never set (threshold={theta}). The source then "
            "encodes with batch top-k (older versions; it depends on the whole batch, so has no "
            "per-token equivalent) or plain ReLU (newer ones). Pass threshold=<value> (e.g. the "
            "smallest kept score you measured; 0 for ReLU) to convert it as a threshold model."
        )
    return theta


def thresholds_on_p(theta: float, code_scale: torch.Tensor) -> torch.Tensor:
    """Per-latent thresholds on p equivalent to ``p * s_j > theta``: ``theta / s_j``.

    A latent with ``s_j = 0`` never passes (``+inf``), as ``0 > theta >= 0`` is false.
    """
    s = code_scale.to(torch.float64)
    out = torch.full_like(s, float("inf"))
    pos = s > 0
    out[pos] = theta / s[pos]
    return out


def metadata(opts: ConversionOptions, source: dict[str, Any]) -> SAEMetadata:
    """SAELens metadata: model and hook names (from the caller), plus where the weights came from."""
    meta: dict[str, Any] = {"interop_source": source, **opts.extra_metadata}
    if opts.model_name is not None:
        meta["model_name"] = opts.model_name
    if opts.base_model_name is not None:
        meta["base_model_name"] = opts.base_model_name
    if opts.hook_name is not None:
        meta["hook_name"] = opts.hook_name
    return SAEMetadata(**meta)


def finish(cfg: SAEConfig, tensors: StateDict) -> tuple[dict[str, Any], StateDict]:
    """Config dict plus tensors cast to the config's dtype, contiguous, on its device."""
    dtype = str_to_dtype(cfg.dtype)
    out = {k: v.to(device=cfg.device, dtype=dtype).contiguous() for k, v in tensors.items()}
    return cfg.to_dict(), out
