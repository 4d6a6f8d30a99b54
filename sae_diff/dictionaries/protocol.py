"""``PairedDictionary``: what analysis and evaluation code may rely on in a dictionary.

The "Dictionary interface" of ``docs/architecture.md`` as a typing :class:`~typing.Protocol`:
every sae_diff crosscoder and diff-SAE, and SAELens's own SAEs (the chat-SAE / base-SAE),
satisfy it structurally, training and inference classes alike, so functions that take "a
dictionary" say so in their signature instead of ``Any``:

- ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` (crosscoders: ``W_enc (n_models, d_in, d_sae)``,
  ``W_dec (d_sae, n_models, d_in)``, ``b_dec (n_models, d_in)``; SAEs: SAELens's layout);
- ``cfg`` (``d_sae``, ``metadata``; crosscoders ``n_models``, ``norm_factors``; diff-SAEs
  ``diff_sign``);
- ``encode(x)``, ``decode(f)`` and the call ``sae(x) = decode(encode(x))``.

Anything else (``threshold``, ``normalised_input`` ...) is architecture-specific and is read
with ``getattr`` by the code that needs it. The protocol is ``runtime_checkable`` for
``isinstance`` checks of the attributes' presence (not of their shapes).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class PairedDictionary(Protocol):
    """A dictionary as analysis / evaluation code sees it (module docstring)."""

    @property
    def W_enc(self) -> torch.Tensor: ...  # noqa: N802 (SAELens's names)

    @property
    def b_enc(self) -> torch.Tensor: ...

    @property
    def W_dec(self) -> torch.Tensor: ...  # noqa: N802

    @property
    def b_dec(self) -> torch.Tensor: ...

    @property
    def cfg(self) -> Any: ...

    def encode(self, x: torch.Tensor, /) -> torch.Tensor: ...

    def decode(self, feature_acts: torch.Tensor, /) -> torch.Tensor: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


__all__ = ["PairedDictionary"]
