"""PairedModel: a base model and its fine-tune, run in lock-step on the same tokens.

This is the ONLY place in ``sae_diff`` that runs the two language models. It wraps two
TransformerLens ``HookedTransformer`` s (or two TL 3 ``TransformerBridge`` s, for
architectures HookedTransformer lacks) and offers:

- construction checks (same layer count, width, vocabulary and special tokens);
- :meth:`PairedModel.paired_activations`: one forward per model per batch returning every
  requested hook as ``(batch, seq, 2, d_model)`` with index 0 = base, 1 = ft, stopping at the
  last layer needed (``stop_at_layer``);
- stitching primitives (:meth:`residual_at`, :meth:`continue_from`, :meth:`stitched_logits`).

Stitching convention (METHODS.md §4). "Layer L" is the residual stream *before* block L
(``blocks.L.hook_resid_pre``; for ``L == n_layers`` the final residual before ``ln_final``).
The embedding travels with block 0 and the final LayerNorm + unembedding travel with the
last block. ``stitched_logits(tokens, L, first=A)`` therefore computes

    h = A.embed + A.blocks[:L]      (for L = 0: the *other* model's embedding)
    h = edit(h)                      (optional)
    logits = B.blocks[L:] + B.ln_final + B.unembed     (for L = n_layers: A's ln_final/unembed)

so ``L = 0`` is exactly the pure second model and ``L = n_layers`` exactly the pure first
model (both tested bit-for-bit). :meth:`continue_from` is the lower-level primitive
("run model `which` from layer L on residual h", the ``patched(h)`` of METHODS §4); it always
uses model ``which`` 's final LayerNorm and unembedding.

Why this is one module (~420 lines): it is one class, the pair's runtime, whose forwards,
activations and stitching share the same per-model token checks, devices and
hooked/bridge dispatch; everything else is elsewhere (loading in
:mod:`~sae_diff.pairing.loading`, backends in :mod:`~sae_diff.pairing.backends`, checks in
:mod:`~sae_diff.pairing.checks`, hook names in :mod:`~sae_diff.pairing.hooks`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from sae_diff.pairing.backends import LanguageModel, is_bridge
from sae_diff.pairing.checks import (
    chat_template_hash,
    check_dims,
    check_hooks,
    check_token_ids,
    check_tokenizers,
    prepended_bos_id,
    stop_layer_for_hook,
    tokenizer_hash,
    valid_hook_names,
)
from sae_diff.pairing.errors import PairingError
from sae_diff.pairing.hooks import earliest_alias, resid_hook
from sae_diff.pairing.loading import Backend, load_hooked, load_pair

Which = Literal["base", "ft"]


def _model_name(model: LanguageModel, default: str) -> str:
    cfg = getattr(model, "cfg", None)
    for attr in ("model_name", "tokenizer_name"):
        name = getattr(cfg, attr, None)
        if isinstance(name, str) and name and name != "custom":
            return name
    return default


class PairedModel:
    """A base model and its fine-tune, checked to be comparable, run on the same tokens.

    Args:
        base, ft: ``HookedTransformer`` s or TL 3 ``TransformerBridge`` s with the same
            architecture (both of the same kind).
        tokenizer: the shared tokenizer; defaults to ft's (its chat template renders chat
            data), else base's.
        base_name, ft_name: names recorded in caches and configs (default: ``cfg.model_name``).
        check: run the construction checks (dimensions, vocabulary, special tokens).

    Raises:
        PairingError: the models or tokenizers differ (the message names the first difference).
    """

    def __init__(
        self,
        base: LanguageModel,
        ft: LanguageModel,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        base_name: str | None = None,
        ft_name: str | None = None,
        check: bool = True,
    ) -> None:
        if is_bridge(base) != is_bridge(ft):
            raise PairingError(
                f"base is a {type(base).__name__} but ft is a {type(ft).__name__}; load both "
                "the same way (both HookedTransformer or both TransformerBridge)."
            )
        self.base = base
        self.ft = ft
        tok_b = getattr(base, "tokenizer", None)
        tok_f = getattr(ft, "tokenizer", None)
        #: configuration differences between the two tokenizers (resolved: ft's are used)
        self.tokenizer_differences: list[str] = []
        if check:
            check_dims(base, ft)
            self.tokenizer_differences = check_tokenizers(tok_b, tok_f)
            if tokenizer is not None:
                check_tokenizers(tokenizer, tok_f if tok_f is not None else tok_b, warn=False)
        #: the pair's tokenizer (None only for a pair of tokenizer-less models fed token ids).
        #: Typed ``Any`` like the two below: transformers types ``decode`` / ``__call__``
        #: results as unions (``str | list[str]``, ...), so a precise type here would force a
        #: cast at every caller that decodes one sequence.
        self.tokenizer: Any = (
            tokenizer if tokenizer is not None else (tok_f if tok_f is not None else tok_b)
        )
        #: the two tokenizers as given (``from_pretrained``: as loaded from the folders /
        #: Hub ids, never TransformerLens's modified copies)
        self.base_tokenizer: Any = tok_b if tok_b is not None else self.tokenizer
        self.ft_tokenizer: Any = tok_f if tok_f is not None else self.tokenizer
        self.n_layers: int = int(base.cfg.n_layers)
        self.d_model: int = int(base.cfg.d_model)
        self.d_vocab: int = int(base.cfg.d_vocab)
        self.base_name: str = base_name or _model_name(base, "base")
        self.ft_name: str = ft_name or _model_name(ft, "ft")
        self.base_revision: str | None = None
        self.ft_revision: str | None = None
        self.is_bridge: bool = is_bridge(base)
        self.backend: str = "bridge" if self.is_bridge else "hooked"

    # ------------------------------------------------------------------ properties
    @property
    def bos_token_id(self) -> int | None:
        """The BOS id the pair's tokenizer declares, or None when the family has no BOS
        (Qwen2.5 / Qwen3). Data sources must not invent a BOS when this is None."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return int(bos) if bos is not None else None

    @property
    def prepends_bos(self) -> bool:
        """Whether the pair's tokenizer itself puts BOS before encoded text (Llama-3,
        Gemma, Mistral: yes; Qwen: no BOS at all; a tokenizer may declare a BOS and not
        prepend it). Read from the tokenizer's behaviour, see
        :func:`~sae_diff.pairing.checks.prepended_bos_id`."""
        return prepended_bos_id(self.tokenizer) is not None

    @property
    def device(self) -> torch.device:
        """Device of the base model's parameters (inputs are moved there)."""
        try:
            return next(self.base.parameters()).device
        except StopIteration:  # pragma: no cover
            return torch.device(getattr(self.base.cfg, "device", "cpu") or "cpu")

    @property
    def ft_device(self) -> torch.device:
        """Device of the ft model's parameters."""
        try:
            return next(self.ft.parameters()).device
        except StopIteration:  # pragma: no cover
            return self.device

    @property
    def hook_names(self) -> list[str]:
        """Hook names valid in both models (sorted)."""
        return sorted(valid_hook_names(self.base) & valid_hook_names(self.ft))

    def model(self, which: str) -> LanguageModel:
        """The model called ``which`` ("base" or "ft")."""
        if which == "base":
            return self.base
        if which == "ft":
            return self.ft
        raise ValueError(f"which must be 'base' or 'ft', got {which!r}")

    @staticmethod
    def other(which: str) -> str:
        """ "ft" for "base" and vice versa."""
        if which not in ("base", "ft"):
            raise ValueError(f"which must be 'base' or 'ft', got {which!r}")
        return "ft" if which == "base" else "base"

    def describe(self) -> dict[str, Any]:
        """What a cache manifest / saved config records about the pair."""
        return {
            "base": {"name": self.base_name, "revision": self.base_revision},
            "ft": {"name": self.ft_name, "revision": self.ft_revision},
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_vocab": self.d_vocab,
            "backend": "bridge" if self.is_bridge else "hooked",
            "tokenizer_hash": tokenizer_hash(self.tokenizer),
            "chat_template_hash": chat_template_hash(self.tokenizer),
        }

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        base_name: str,
        ft_name: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        hf_model_path_or_local_dir: str | os.PathLike[str] | None = None,
        backend: Backend = "auto",
        base_revision: str | None = None,
        ft_revision: str | None = None,
        trust_remote_code: bool = False,
        **model_kwargs: Any,
    ) -> PairedModel:
        """Load a pair with the real TransformerLens / transformers loading code: both
        ``config.json`` first, then both tokenizers, then the weights (cheap checks first).

        The order of the checks and every argument are documented at
        :func:`~sae_diff.pairing.loading.load_pair` (this is that function).

        Raises:
            PairingError: configs, dimensions or tokenizers cannot be paired, or no backend
                supports the architecture (the message names the fix).
        """
        return load_pair(
            cls,
            base_name,
            ft_name,
            device=device,
            dtype=dtype,
            hf_model_path_or_local_dir=hf_model_path_or_local_dir,
            backend=backend,
            base_revision=base_revision,
            ft_revision=ft_revision,
            trust_remote_code=trust_remote_code,
            **model_kwargs,
        )

    # ------------------------------------------------------------------ hooks
    def validate_hooks(self, hook_names: list[str]) -> None:
        """Raise :class:`HookNameError` (listing the valid names) for unknown hooks."""
        check_hooks(hook_names, self.base, self.ft)

    def _stop_layer(self, hook_names: list[str]) -> int | None:
        stops = [stop_layer_for_hook(h, self.n_layers) for h in hook_names]
        if any(s is None for s in stops):
            return None
        return max(s for s in stops if s is not None)

    def _tokens_to(self, tokens: torch.Tensor, model: LanguageModel) -> torch.Tensor:
        n_ctx = getattr(model.cfg, "n_ctx", None)
        check_token_ids(tokens, self.d_vocab, n_ctx if isinstance(n_ctx, int) else None)
        return tokens.to(next(model.parameters()).device, dtype=torch.long)

    def _run_with_cache(
        self,
        model: LanguageModel,
        tokens: torch.Tensor,
        hook_names: list[str],
        stop: int | None,
        attention_mask: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        kwargs: dict[str, Any] = {"names_filter": list(hook_names), "return_cache_object": False}
        if stop is not None:
            kwargs["stop_at_layer"] = stop
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(tokens.device)
        _, cache = model.run_with_cache(tokens, **kwargs)
        return {h: cache[h] for h in hook_names}

    @torch.no_grad()
    def paired_activations(
        self,
        tokens: torch.Tensor,
        hook_names: list[str] | str,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every requested hook of both models on the same tokens, one forward per model.

        Returns ``{hook: (batch, seq, 2, d) tensor}`` with index 0 = base, 1 = ft, on the base
        model's device. Each forward stops after the last layer any requested hook needs.
        """
        if isinstance(hook_names, str):
            hook_names = [hook_names]
        self.validate_hooks(hook_names)
        # blocks.L.hook_resid_pre holds the same tensor as blocks.{L-1}.hook_resid_post: reading
        # the latter lets the forward stop one block earlier.
        fetch = {
            h: h if is_bridge(self.base) or is_bridge(self.ft) else earliest_alias(h)
            for h in hook_names
        }
        names = list(dict.fromkeys(fetch.values()))
        stop = self._stop_layer(names)
        tb = self._tokens_to(tokens, self.base)
        acts_b = self._run_with_cache(self.base, tb, names, stop, attention_mask)
        tf = self._tokens_to(tokens, self.ft)
        acts_f = self._run_with_cache(self.ft, tf, names, stop, attention_mask)
        out: dict[str, torch.Tensor] = {}
        for h in hook_names:
            a, b = acts_b[fetch[h]], acts_f[fetch[h]].to(acts_b[fetch[h]].device)
            if a.shape != b.shape or a.shape[:2] != tokens.shape:
                raise PairingError(
                    f"hook {h}: base gave {tuple(a.shape)}, ft gave {tuple(b.shape)} for tokens "
                    f"{tuple(tokens.shape)}; both models must see the same (batch, seq)."
                )
            if a.dim() > 3:  # e.g. per-head hooks (batch, seq, heads, d_head): flatten
                a, b = a.flatten(2), b.flatten(2)
            out[h] = torch.stack([a, b], dim=2)
        return out

    # ------------------------------------------------------------------ logits / stitching
    @torch.no_grad()
    def logits(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(base_logits, ft_logits), each ``(batch, seq, d_vocab)``."""
        kw = {} if attention_mask is None else {"attention_mask": attention_mask}
        lb = self.base(self._tokens_to(tokens, self.base), **kw)
        lf = self.ft(self._tokens_to(tokens, self.ft), **kw)
        return lb, lf

    def _check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or not 0 <= layer <= self.n_layers:
            raise ValueError(
                f"layer must be an int in [0, n_layers={self.n_layers}] (the residual before "
                f"block `layer`; n_layers = before ln_final), got {layer!r}"
            )

    def _resid_hook(self, layer: int) -> str:
        # the bridge's final residual is substituted at ln_final's input hook
        return resid_hook(layer, self.n_layers) if layer < self.n_layers else "ln_final.hook_in"

    def residual_at(
        self,
        which: str,
        tokens: torch.Tensor,
        layer: int,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Residual stream of model ``which`` before block ``layer`` (``resid_pre``);
        ``layer == n_layers`` gives the final residual before ``ln_final``.
        Gradients flow (wrap in ``torch.no_grad()`` when not needed)."""
        self._check_layer(layer)
        model = self.model(which)
        toks = self._tokens_to(tokens, model)
        kw = {} if attention_mask is None else {"attention_mask": attention_mask.to(toks.device)}
        if not is_bridge(model):
            return model(toks, stop_at_layer=layer, **kw)
        if layer == self.n_layers:  # the bridge's last hook before ln_final
            name = f"blocks.{layer - 1}.hook_resid_post"
            stop = None
        else:
            # the bridge stops by raising at ``blocks.{stop}.hook_in``, before the cache
            # hook of that same point fires: stop one block later
            name, stop = self._resid_hook(layer), layer + 1
        return self._run_with_cache(model, toks, [name], stop, attention_mask)[name]

    def continue_from(
        self,
        which: str,
        resid: torch.Tensor,
        layer: int,
        tokens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run model ``which`` from the residual ``resid`` before block ``layer`` to logits
        (its own blocks ``layer..``, final LayerNorm and unembedding).

        ``tokens`` are required for TransformerBridge models (which cannot start mid-way:
        the residual is substituted at ``blocks.L.hook_resid_pre`` during a full forward).
        """
        self._check_layer(layer)
        model = self.model(which)
        dev = next(model.parameters()).device
        resid = resid.to(dev)
        if not is_bridge(model):
            kw: dict[str, Any] = {}
            if attention_mask is not None:
                kw["attention_mask"] = attention_mask.to(dev)
            return model(resid, start_at_layer=layer, **kw)
        if tokens is None:
            raise ValueError(
                "continue_from on a TransformerBridge needs `tokens` (the bridge cannot start "
                "mid-model; the residual is substituted during a forward on these tokens)."
            )
        toks = self._tokens_to(tokens, model)
        if tuple(toks.shape) != tuple(resid.shape[:2]):
            raise ValueError(f"tokens {tuple(toks.shape)} do not match resid {tuple(resid.shape)}")

        def _replace(act: torch.Tensor, hook: Any) -> torch.Tensor:
            return resid.to(act.dtype)

        kw2: dict[str, Any] = (
            {} if attention_mask is None else {"attention_mask": attention_mask.to(dev)}
        )
        return model.run_with_hooks(toks, fwd_hooks=[(self._resid_hook(layer), _replace)], **kw2)

    def stitched_logits(
        self,
        tokens: torch.Tensor,
        layer: int,
        first: str = "base",
        edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``first`` up to layer ``layer``, optionally ``edit`` the residual, continue with
        the other model. ``layer = 0`` is the pure second model, ``layer = n_layers`` the pure
        first model (see the module docstring for who owns the embedding / unembedding)."""
        self._check_layer(layer)
        second = self.other(first)
        owner_in = second if layer == 0 else first
        owner_out = first if layer == self.n_layers else second
        resid = self.residual_at(owner_in, tokens, layer, attention_mask=attention_mask)
        if edit is not None:
            edited = edit(resid)
            if not isinstance(edited, torch.Tensor) or edited.shape != resid.shape:
                raise ValueError(
                    f"edit must return a tensor of the residual's shape {tuple(resid.shape)}"
                )
            resid = edited
        return self.continue_from(
            owner_out, resid, layer, tokens=tokens, attention_mask=attention_mask
        )


__all__ = ["Backend", "PairedModel", "Which", "is_bridge", "load_hooked"]
