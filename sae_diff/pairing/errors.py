"""Error types raised by the pairing layer (one place so callers can catch them)."""

from __future__ import annotations

from sae_diff.errors import SaeDiffError


class PairingError(SaeDiffError, ValueError):
    """The two models (or their tokenizers) cannot be paired: the message names the first
    difference found and what to do about it."""


class PairingWarning(UserWarning):
    """The pair loads, but something was resolved on the user's behalf (e.g. the base and
    ft tokenizers configure BOS/EOS/PAD or the chat template differently, as published
    base/instruct pairs do); the message says what was used."""


class HookNameError(SaeDiffError, KeyError):
    """A requested hook name does not exist in one of the models; the message lists the
    valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; print it plainly instead
        return str(self.args[0]) if self.args else ""
