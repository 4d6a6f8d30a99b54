"""TransformerLens hook functions that splice a dictionary's patch into a forward pass.

Every hook here has the TransformerLens signature ``hook_fn(activation, hook) -> activation``
and goes at the dictionary's residual hook (:func:`hook_point`), so it composes with
``model.run_with_hooks``, ``model.run_with_cache``, ``model.hooks(...)`` and your own hooks.

A crosscoder or diff-SAE reads *both* models' residuals, but a forward runs only one model.
The other model's residual is computed beforehand (``PairedModel.residual_at``) and handed to
the hook; the running model supplies its own. Running the ft model with
``patch_hook(sae, base_acts=x_b, mode=...)`` at layer ``L`` is exactly the KL-patching run of
:mod:`sae_diff.evaluation.patching` (the hook returns the ``h`` of METHODS.md §4)::

    pair = PairedModel(base, ft)
    name, fns = paired_hooks(pair, sae, tokens, mode="reconstruction")
    logits = pair.ft.run_with_hooks(tokens, fwd_hooks=[(name, fns)])

Modes: ``"reconstruction"``, ``"error"``, ``"subset"`` (with ``latents``), ``"steering"``
(``x^b + scale * sum_S f_j d_j^c``, with ``latents``), ``"stitch"`` (``h = x^b``), ``"ft"``
(``h = x^c``). :func:`steering_hook` adds a fixed vector and needs no other model;
:func:`amplification_hook` applies ``x^c + alpha (x^c - x^b)``; :func:`record_codes_hook`
stores the dictionary's codes without changing the forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sae_diff.analysis.selection import LatentSpec, latent_indices
from sae_diff.dictionaries.protocol import PairedDictionary
from sae_diff.evaluation.interventions import DictionaryPatcher
from sae_diff.evaluation.stitching import (
    LayerError,
    dictionary_hook,
    hook_for_layer,
    layer_from_hook,
    resolve_layer,
)
from sae_diff.pairing.model import PairedModel

HookFn = Callable[[torch.Tensor, Any], torch.Tensor]
MODES = ("reconstruction", "error", "subset", "steering", "stitch", "ft")


def hook_point(
    sae: PairedDictionary | None = None, n_layers: int | None = None, layer: int | None = None
) -> str:
    """Where to attach a patch hook: the dictionary's own residual hook
    (``cfg.metadata.hook_name``) or, given ``layer``, ``blocks.{layer}.hook_resid_pre``
    (``blocks.{n-1}.hook_resid_post`` for ``layer == n_layers``)."""
    if layer is not None:
        if n_layers is None:
            raise ValueError("hook_point(layer=...) needs n_layers")
        return hook_for_layer(layer, n_layers)
    name = dictionary_hook(sae) if sae is not None else None
    if name is None:
        raise LayerError("the dictionary records no cfg.metadata.hook_name; pass layer=")
    if n_layers is not None:
        layer_from_hook(name, n_layers)  # validates it is a residual hook in range
    return name


def _patcher(sae: PairedDictionary | DictionaryPatcher, include_bias: bool) -> DictionaryPatcher:
    return sae if isinstance(sae, DictionaryPatcher) else DictionaryPatcher(sae, include_bias)


def _check_other(other: torch.Tensor, act: torch.Tensor, name: str) -> torch.Tensor:
    if tuple(other.shape) != tuple(act.shape):
        raise ValueError(
            f"{name} has shape {tuple(other.shape)} but the activation at this hook is "
            f"{tuple(act.shape)}: compute it on the same tokens at the same layer "
            "(PairedModel.residual_at)."
        )
    return other.to(act.device, act.dtype)


def patch_hook(
    sae: PairedDictionary,
    *,
    base_acts: torch.Tensor | None = None,
    ft_acts: torch.Tensor | None = None,
    mode: str = "reconstruction",
    latents: LatentSpec | None = None,
    scale: float = 1.0,
    positions: torch.Tensor | None = None,
    include_bias: bool = False,
) -> HookFn:
    """A hook that replaces the residual with a METHODS.md §4 patch ``h``.

    Give exactly one of ``base_acts`` (hook runs on the ft model, which supplies ``x^c``) or
    ``ft_acts`` (hook runs on the base model, which supplies ``x^b``); both ``(B, S, d)`` at
    the hook's layer on the same tokens.

    Args:
        sae: a crosscoder or diff-SAE (or a :class:`DictionaryPatcher`); None for modes
            ``"stitch"`` / ``"ft"``.
        mode: one of ``reconstruction``, ``error``, ``subset``, ``steering``, ``stitch``, ``ft``.
        latents: latent ids / bool mask for ``subset`` and ``steering``.
        scale: steering scale.
        positions: optional ``(B, S)`` bool mask; the patch applies only there.
        include_bias: crosscoders: include the decoder-bias difference in the reconstruction.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if (base_acts is None) == (ft_acts is None):
        raise ValueError(
            "give exactly one of base_acts (the hook runs on the ft model) or ft_acts (the "
            "hook runs on the base model)"
        )
    p = None if sae is None else _patcher(sae, include_bias)
    if p is None and mode not in ("stitch", "ft"):
        raise ValueError(f"mode {mode!r} needs a dictionary")
    idx = None
    if mode in ("subset", "steering"):
        if latents is None:
            raise ValueError(f"mode {mode!r} needs latents=")
        assert p is not None
        idx = latent_indices(latents, p.d_sae)

    def fn(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        if base_acts is not None:
            xb, xc = _check_other(base_acts, act, "base_acts"), act
        else:
            assert ft_acts is not None
            xb, xc = act, _check_other(ft_acts, act, "ft_acts")
        if mode == "stitch":
            h = xb
        elif mode == "ft":
            h = xc
        else:
            assert p is not None
            f = p.encode(xb, xc)
            if mode == "steering":
                assert idx is not None
                h = xb + scale * p.steering_vector(f, idx).to(act.dtype)
            else:
                dhat = p.delta(f, idx if mode == "subset" else None).to(act.dtype)
                h = xc - dhat if mode == "error" else xb + dhat
        if positions is not None:
            m = positions.to(act.device).bool()
            if tuple(m.shape) != tuple(act.shape[:2]):
                raise ValueError(f"positions {tuple(m.shape)} do not match {tuple(act.shape[:2])}")
            h = torch.where(m[..., None], h, act)
        return h

    return fn


def paired_hooks(
    paired: PairedModel,
    sae: PairedDictionary,
    tokens: torch.Tensor,
    *,
    run_on: str = "ft",
    layer: int | str | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[str, HookFn]:
    """``(hook_name, hook_fn)`` for ``paired.<run_on>.run_with_hooks(tokens, fwd_hooks=[...])``:
    computes the other model's residual at the dictionary's layer on ``tokens`` and returns
    :func:`patch_hook` (``kwargs``: ``mode``, ``latents``, ``scale``, ``positions``, ...).

    For a dictionary from another hook or width, or a bad layer, raises ``LayerError``.
    """
    L = resolve_layer(paired, layer, None if sae is None else {"dictionary": sae})
    other = paired.other(run_on)
    with torch.no_grad():
        acts = paired.residual_at(other, tokens, L, attention_mask=attention_mask)
    name = hook_for_layer(L, paired.n_layers)
    if other == "base":
        return name, patch_hook(sae, base_acts=acts, **kwargs)
    return name, patch_hook(sae, ft_acts=acts, **kwargs)


def steering_hook(
    vector: torch.Tensor, scale: float = 1.0, positions: torch.Tensor | None = None
) -> HookFn:
    """Add ``scale * vector`` (``(d,)`` or ``(B, S, d)``) to the residual (at ``positions``)."""

    def fn(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        v = vector.to(act.device, act.dtype)
        out = act + scale * v
        if positions is not None:
            out = torch.where(positions.to(act.device).bool()[..., None], out, act)
        return out

    return fn


def latent_direction(sae: PairedDictionary, latents: LatentSpec, model: str = "ft") -> torch.Tensor:
    """Sum of the latents' decoder rows ``(d,)``: for a crosscoder model ``"ft"`` / ``"base"``'s
    row, or ``"diff"`` (``d^c - d^b``); for a diff-SAE its (signed) decoder row."""
    p = _patcher(sae, False)
    idx = latent_indices(latents, p.d_sae)
    w = p.sae.W_dec.detach()
    if p.kind == "crosscoder":
        if model not in ("ft", "base", "diff"):
            raise ValueError(f"model must be 'ft', 'base' or 'diff', got {model!r}")
        rows = w[:, 1] if model == "ft" else w[:, 0] if model == "base" else w[:, 1] - w[:, 0]
    else:
        rows = p.sign * w
    return rows[idx].sum(0)


def amplification_hook(
    alpha: float, *, base_acts: torch.Tensor, positions: torch.Tensor | None = None
) -> HookFn:
    """On the ft model: ``x^c + alpha (x^c - x^b)`` (activation-space diff amplification)."""

    def fn(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        xb = _check_other(base_acts, act, "base_acts")
        out = act + alpha * (act - xb)
        if positions is not None:
            out = torch.where(positions.to(act.device).bool()[..., None], out, act)
        return out

    return fn


def record_codes_hook(
    sae: PairedDictionary,
    store: dict[str, torch.Tensor],
    *,
    base_acts: torch.Tensor | None = None,
    ft_acts: torch.Tensor | None = None,
    key: str = "codes",
) -> HookFn:
    """Store the dictionary's codes ``(B, S, d_sae)`` in ``store[key]``; activation unchanged."""
    if (base_acts is None) == (ft_acts is None):
        raise ValueError("give exactly one of base_acts or ft_acts")
    p = _patcher(sae, False)

    def fn(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        if base_acts is not None:
            xb, xc = _check_other(base_acts, act, "base_acts"), act
        else:
            assert ft_acts is not None
            xb, xc = act, _check_other(ft_acts, act, "ft_acts")
        store[key] = p.encode(xb, xc).detach()
        return act

    return fn


__all__ = [
    "MODES",
    "HookFn",
    "amplification_hook",
    "hook_point",
    "latent_direction",
    "paired_hooks",
    "patch_hook",
    "record_codes_hook",
    "steering_hook",
]
