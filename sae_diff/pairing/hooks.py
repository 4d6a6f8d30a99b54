"""TransformerLens hook names: the one place in sae_diff that parses them.

Two numbers are attached to a residual hook, and they are easy to confuse, so both have a
name here and every module uses these functions instead of its own regular expression:

- the **block** of ``blocks.L.<point>`` is ``L`` (:func:`block_of`): the forward must run
  blocks ``0..L`` to fire it (:func:`stop_layer`);
- the **split layer** of a residual-stream hook (:func:`split_layer`) is the residual
  *before* block ``L``: ``blocks.L.hook_resid_pre`` -> ``L``, ``blocks.L.hook_resid_post``
  -> ``L + 1`` (the same tensor as ``resid_pre`` of ``L + 1``), ``ln_final.hook_in`` ->
  ``n_layers``. Stitching, KL patching and ``PairedModel.residual_at`` count in split layers;
  :func:`resid_hook` is the inverse.

Errors: a name that is not the kind of hook asked for raises
:class:`~sae_diff.pairing.errors.HookNameError`; callers with their own error type
(``LayerError`` in evaluation, ``ConfigError`` in training configs) re-raise it as that type
with the same message, so users see one wording wherever a hook is parsed.
"""

from __future__ import annotations

import re

from sae_diff.pairing.errors import HookNameError

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")

#: block hooks as wide as the residual stream (``d_model``)
D_MODEL_POINTS = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
)
#: block hooks as wide as the MLP (``d_mlp``)
D_MLP_POINTS = ("mlp.hook_pre", "mlp.hook_post")
#: hooks outside the blocks that are ``d_model`` wide and fire before block 0
EMBED_HOOKS = ("hook_embed", "hook_pos_embed")
#: names of the final residual (before ``ln_final``): split layer ``n_layers``
FINAL_RESID_HOOKS = ("ln_final.hook_in", "ln_final.hook_normalized_in")

#: TransformerLens hook names inside a block (``blocks.L.<name>``) and outside blocks, for
#: spelling checks before the models load (the models' own ``hook_dict`` decides when they do).
BLOCK_HOOKS = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "hook_attn_in",
    "hook_q_input",
    "hook_k_input",
    "hook_v_input",
    "hook_mlp_in",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_z",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_result",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "mlp.hook_pre",
    "mlp.hook_post",
    "mlp.hook_pre_linear",
)
GLOBAL_HOOKS = ("hook_embed", "hook_pos_embed", "ln_final.hook_scale", "ln_final.hook_normalized")


def split_block_hook(hook_name: str) -> tuple[int, str] | None:
    """``blocks.L.<point>`` -> ``(L, "<point>")``; None for a hook outside the blocks."""
    m = _BLOCK.match(hook_name)
    return None if m is None else (int(m.group(1)), hook_name[m.end() :])


def block_of(hook_name: str) -> int | None:
    """The block index ``L`` of ``blocks.L.*`` (None for a hook outside the blocks)."""
    parts = split_block_hook(hook_name)
    return None if parts is None else parts[0]


def hook_width(hook_name: str) -> str | None:
    """Which model dimension a hook's activation has: ``"d_model"`` (residual, attention and
    MLP outputs, embeddings), ``"d_mlp"`` (MLP pre/post activations), or None (unknown here:
    per-head hooks, LayerNorm scales, non-standard names)."""
    parts = split_block_hook(hook_name)
    if parts is not None:
        point = parts[1]
        if point in D_MODEL_POINTS:
            return "d_model"
        if point in D_MLP_POINTS:
            return "d_mlp"
        return None
    return "d_model" if hook_name in EMBED_HOOKS else None


def split_layer(hook_name: str, n_layers: int) -> int:
    """Split layer of a residual-stream hook (module docstring): ``blocks.L.hook_resid_pre`` ->
    ``L``, ``blocks.L.hook_resid_post`` -> ``L + 1``, ``ln_final.hook_in`` -> ``n_layers``.

    Raises:
        HookNameError: not a residual-stream hook between blocks (``hook_resid_mid``, an MLP
            or attention output), or a block index outside ``0..n_layers - 1``.
    """
    m = _RESID.match(hook_name)
    if m is not None:
        block, kind = int(m.group(1)), m.group(2)
        if not 0 <= block < n_layers:
            raise HookNameError(
                f"hook {hook_name!r} names block {block}, but the models have {n_layers} blocks "
                f"(0..{n_layers - 1})."
            )
        return block + (1 if kind == "post" else 0)
    if hook_name in FINAL_RESID_HOOKS:
        return n_layers
    raise HookNameError(
        f"hook {hook_name!r} is not a residual-stream hook between blocks; stitching and KL "
        "patching split the models on the residual stream. Use a dictionary trained at "
        "'blocks.L.hook_resid_pre' or 'blocks.L.hook_resid_post'."
    )


def resid_hook(layer: int, n_layers: int) -> str:
    """The hook carrying the residual before block ``layer`` (inverse of :func:`split_layer`):
    ``blocks.{layer}.hook_resid_pre``, and ``blocks.{n_layers-1}.hook_resid_post`` for
    ``layer == n_layers`` (a name HookedTransformer and TransformerBridge both have)."""
    if not 0 <= layer <= n_layers or n_layers < 1:
        raise HookNameError(f"layer {layer} has no residual hook in a model of {n_layers} blocks.")
    if layer < n_layers:
        return f"blocks.{layer}.hook_resid_pre"
    return f"blocks.{n_layers - 1}.hook_resid_post"


def earliest_alias(hook_name: str) -> str:
    """``blocks.L.hook_resid_pre`` (L >= 1) -> ``blocks.{L-1}.hook_resid_post``: the same
    tensor, fired one block earlier (a forward can stop sooner); other names unchanged."""
    m = _RESID.match(hook_name)
    if m and m.group(2) == "pre" and int(m.group(1)) > 0:
        return f"blocks.{int(m.group(1)) - 1}.hook_resid_post"
    return hook_name


def stop_layer(hook_name: str, n_layers: int) -> int | None:
    """The ``stop_at_layer`` that still fires ``hook_name`` (None: the full model is needed).

    ``blocks.L.*`` needs blocks ``0..L``, so ``L + 1``; embedding hooks need 0 blocks.
    """
    block = block_of(hook_name)
    if block is not None:
        return None if block + 1 > n_layers else block + 1
    if hook_name in EMBED_HOOKS or hook_name.startswith(("embed.", "pos_embed.")):
        return 0
    return None


__all__ = [
    "BLOCK_HOOKS",
    "D_MLP_POINTS",
    "D_MODEL_POINTS",
    "EMBED_HOOKS",
    "FINAL_RESID_HOOKS",
    "GLOBAL_HOOKS",
    "HookNameError",
    "block_of",
    "earliest_alias",
    "hook_width",
    "resid_hook",
    "split_block_hook",
    "split_layer",
    "stop_layer",
]
