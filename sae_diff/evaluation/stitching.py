"""Split layers, dictionary checks, and the layer-stitching sweep (METHODS.md §4).

"Layer L" is the residual stream before block ``L`` (``blocks.L.hook_resid_pre``);
``L = n_layers`` is the final residual before ``ln_final``. A dictionary trained at
``blocks.L.hook_resid_post`` reads the same tensor as ``resid_pre`` of layer ``L + 1``, so
its split layer is ``L + 1`` (:func:`layer_from_hook`).

The sweep: for every ``L`` in ``0..n_layers``, run base blocks ``< L`` and ft blocks ``>= L``
(``first="base"``) and the reverse (``first="ft"``), and report KL to each model and NLL.
``L = 0`` with ``first="base"`` is exactly the ft model, ``L = n_layers`` exactly the base.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
import torch

from sae_diff.dictionaries.kinds import dictionary_kind
from sae_diff.dictionaries.protocol import PairedDictionary
from sae_diff.errors import SaeDiffError
from sae_diff.evaluation.kl import (
    FIRST_N,
    as_token_mask,
    split_first_n,
    token_kl,
    token_nll,
)
from sae_diff.pairing.errors import HookNameError
from sae_diff.pairing.hooks import resid_hook, split_layer
from sae_diff.pairing.model import PairedModel

if TYPE_CHECKING:
    import plotly.graph_objects as go


class LayerError(SaeDiffError, ValueError):
    """A split layer, hook name or dictionary does not fit the model pair; the message says why
    and how to fix it."""


# ---------------------------------------------------------------------------- layers and hooks
def layer_from_hook(hook_name: str, n_layers: int) -> int:
    """Split layer of a residual-stream hook: ``blocks.L.hook_resid_pre`` -> ``L``,
    ``blocks.L.hook_resid_post`` -> ``L + 1``, ``ln_final.hook_in`` -> ``n_layers``
    (:func:`sae_diff.pairing.hooks.split_layer`).

    Raises:
        LayerError: not a residual-stream hook between blocks (e.g. ``hook_resid_mid``, an
            MLP or attention output), or a block index out of range.
    """
    try:
        return split_layer(hook_name, n_layers)
    except HookNameError as e:
        raise LayerError(str(e)) from e


def hook_for_layer(layer: int, n_layers: int) -> str:
    """The TransformerLens hook that carries the residual before block ``layer``
    (``blocks.{layer}.hook_resid_pre``; for ``layer == n_layers``
    ``blocks.{n_layers-1}.hook_resid_post``): :func:`sae_diff.pairing.hooks.resid_hook`."""
    check_layer(layer, n_layers)
    try:
        return resid_hook(layer, n_layers)
    except HookNameError as e:  # pragma: no cover - models always have blocks
        raise LayerError(str(e)) from e


def check_layer(layer: object, n_layers: int) -> int:
    """Return ``layer`` if it is an int in ``[0, n_layers]``, else raise :class:`LayerError`."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n_layers:
        raise LayerError(
            f"layer must be an int in [0, n_layers={n_layers}] (the residual before block "
            f"`layer`; {n_layers} = before ln_final), got {layer!r}."
        )
    return layer


def dictionary_hook(sae: object) -> str | None:
    """The hook a dictionary was trained at (``cfg.metadata.hook_name``), or None if unknown."""
    meta = getattr(getattr(sae, "cfg", None), "metadata", None)
    name = None if meta is None else getattr(meta, "hook_name", None)
    return name if isinstance(name, str) and name else None


def patchable_kind(sae: PairedDictionary) -> str:
    """``"crosscoder"`` (two-model) or ``"diff_sae"``: the dictionaries KL patching can use
    (the kind from :func:`sae_diff.dictionaries.kinds.dictionary_kind`, restricted)."""
    if getattr(sae, "W_dec", None) is None:
        raise LayerError(f"{type(sae).__name__} has no W_dec; expected a sae_diff dictionary.")
    try:
        kind: str | None = dictionary_kind(sae)
    except ValueError:  # a plain SAE: its weights do not say which model it reads
        kind = None
    if kind == "crosscoder":
        n_models = getattr(sae.cfg, "n_models", sae.W_dec.shape[1])
        if n_models != 2:
            raise LayerError(
                f"crosscoder has n_models={n_models}; KL patching needs a two-model "
                "(base, ft) crosscoder."
            )
        return "crosscoder"
    if kind == "diff_sae":
        return "diff_sae"
    raise LayerError(
        f"{type(sae).__name__} is a single-model SAE; the KL patches of METHODS.md §4 need a "
        "crosscoder (decoder per model) or a diff-SAE (cfg.diff_sign)."
    )


def resolve_layer(
    paired: PairedModel,
    layer: int | str | None = None,
    dictionaries: dict[str, PairedDictionary] | PairedDictionary | None = None,
) -> int:
    """The split layer from an int, a hook name, or (``None``) the dictionaries' hook, and a
    check that every dictionary fits it.

    Args:
        paired: the model pair (gives ``n_layers`` and ``d_model``).
        layer: an int split layer, a residual hook name, or None.
        dictionaries: one dictionary, a mapping name -> dictionary, or None.

    Raises:
        LayerError: layer out of range, a non-residual hook, dictionaries trained at another
            hook than ``layer`` or at different layers, or a width that is not ``d_model``.
    """
    n = paired.n_layers
    if isinstance(dictionaries, dict):
        dicts = dict(dictionaries)
    elif dictionaries is None:
        dicts = {}
    else:
        dicts = {"dictionary": dictionaries}
    if isinstance(layer, str):
        layer = layer_from_hook(layer, n)
    elif layer is not None:
        check_layer(layer, n)
    for name, sae in dicts.items():
        d_in = int(sae.cfg.d_in)
        if d_in != paired.d_model:
            raise LayerError(
                f"dictionary {name!r} has d_in={d_in} but the models' residual width is "
                f"d_model={paired.d_model}: it was trained on another model."
            )
        patchable_kind(sae)
        hook = dictionary_hook(sae)
        if hook is None:
            continue
        h_layer = layer_from_hook(hook, n)
        if layer is None:
            layer = h_layer
        elif h_layer != layer:
            raise LayerError(
                f"dictionary {name!r} was trained at {hook!r} (split layer {h_layer}) but the "
                f"patching layer is {layer}; pass layer={h_layer} (or the hook name), or use a "
                "dictionary trained at this layer."
            )
    if layer is None:
        raise LayerError(
            "no layer given and no dictionary records cfg.metadata.hook_name; pass layer= "
            "(an int split layer or a residual hook name)."
        )
    return int(layer)


# ---------------------------------------------------------------------------- sweep
@torch.no_grad()
def stitching_sweep(
    paired: PairedModel,
    tokens: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    *,
    layers: list[int] | None = None,
    directions: tuple[str, ...] = ("base", "ft"),
    first_n: int = FIRST_N,
    batch_size: int = 8,
    attention_mask: torch.Tensor | None = None,
) -> pd.DataFrame:
    """Layer-stitching sweep: KL to each model and NLL for every split layer.

    For ``first="base"`` rows the model is base blocks ``< layer`` then ft blocks ``>= layer``
    (``layer = 0``: ft; ``layer = n_layers``: base); ``first="ft"`` is the reverse.

    Returns:
        One row per ``(first, layer)``: ``kl_to_ft`` = KL(p_ft || p_stitched),
        ``kl_to_base`` = KL(p_base || p_stitched), each also ``_first`` / ``_rest``
        (first ``first_n`` masked positions / the rest), ``nll`` and ``n_tokens``.
    """
    mask = as_token_mask(token_mask, tokens)
    layers = list(range(paired.n_layers + 1)) if layers is None else list(layers)
    for L in layers:
        check_layer(L, paired.n_layers)
    for d in directions:
        if d not in ("base", "ft"):
            raise ValueError(f"directions must name 'base' and/or 'ft', got {d!r}")
    first_m, rest_m = split_first_n(mask, first_n)
    keys = [(d, L) for d in directions for L in layers]
    sums = {k: torch.zeros(7, dtype=torch.float64) for k in keys}
    counts = torch.zeros(4, dtype=torch.float64)
    for start in range(0, tokens.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        tb = tokens[sl]
        am = None if attention_mask is None else attention_mask[sl]
        lb, lf = paired.logits(tb, attention_mask=am)
        ms = [m[sl].to(lf.device) for m in (mask, first_m, rest_m)]
        nll_ok = ms[0].clone()
        nll_ok[:, -1] = False
        counts += torch.tensor([float(m.sum()) for m in (*ms, nll_ok)], dtype=torch.float64)
        for d, L in keys:
            ls = paired.stitched_logits(tb, L, first=d, attention_mask=am).to(lf.device)
            k_ft, k_b = token_kl(lf, ls), token_kl(lb.to(lf.device), ls)
            nll = token_nll(ls, tb)
            vals = [float(k_ft[m].sum()) for m in ms] + [float(k_b[m].sum()) for m in ms]
            vals.append(float(nll[nll_ok].sum()))
            sums[(d, L)] += torch.tensor(vals, dtype=torch.float64)
    rows = []
    for d, L in keys:
        s = sums[(d, L)]
        c = counts
        rows.append(
            {
                "first": d,
                "layer": L,
                "kl_to_ft": float(s[0] / c[0]),
                "kl_to_ft_first": float(s[1] / c[1]),
                "kl_to_ft_rest": float(s[2] / c[2]),
                "kl_to_base": float(s[3] / c[0]),
                "kl_to_base_first": float(s[4] / c[1]),
                "kl_to_base_rest": float(s[5] / c[2]),
                "nll": float(s[6] / c[3]),
                "n_tokens": int(c[0]),
            }
        )
    df = pd.DataFrame(rows)
    df.attrs["first_n"] = first_n
    return df


def plot_stitching_sweep(df: pd.DataFrame, title: str = "Layer stitching") -> go.Figure:
    """A plotly figure of KL against the split layer (one line per direction and target)."""
    import plotly.graph_objects as go  # plotly loads only when plotting (evaluation imports light)

    fig = go.Figure()
    for d, part in df.groupby("first", sort=False):
        part = part.sort_values("layer")
        other = "ft" if d == "base" else "base"
        label = f"{d} < L, {other} >= L"
        fig.add_scatter(
            x=part["layer"],
            y=part["kl_to_ft"],
            mode="lines+markers",
            name=f"KL(p_ft || ·) [{label}]",
        )
        fig.add_scatter(
            x=part["layer"],
            y=part["kl_to_base"],
            mode="lines+markers",
            name=f"KL(p_base || ·) [{label}]",
            line={"dash": "dash"},
        )
    fig.update_layout(title=title, xaxis_title="split layer L", yaxis_title="mean KL (nats)")
    return fig


__all__ = [
    "LayerError",
    "check_layer",
    "dictionary_hook",
    "patchable_kind",
    "hook_for_layer",
    "layer_from_hook",
    "plot_stitching_sweep",
    "resolve_layer",
    "stitching_sweep",
]
