"""Errors raised while reading published dictionaries; each names the problem and the fix."""

from __future__ import annotations

from collections.abc import Iterable

from sae_diff.errors import SaeDiffError


class InteropError(SaeDiffError, ValueError):
    """A published checkpoint could not be converted (base class of the errors below)."""


class InteropFileNotFoundError(InteropError, FileNotFoundError):
    """The source is neither an existing local path nor a Hub repo id."""


class UnknownDictClassError(InteropError):
    """``dict_class`` (or the detected layout) is not one this loader converts."""

    def __init__(self, dict_class: str, supported: Iterable[str], where: str = "") -> None:
        names = ", ".join(sorted(supported))
        super().__init__(
            f"Unknown dict_class {dict_class!r}{f' in {where}' if where else ''}. Supported: {names}. "
            "If the checkpoint is one of these under another name, pass dict_class=... to "
            "sae_diff.interop.load; otherwise it needs a new converter."
        )
        self.dict_class = dict_class


class MissingKeysError(InteropError):
    """Required state-dict keys (or config fields) are absent; ``missing`` names them."""

    def __init__(self, missing: Iterable[str], where: str, hint: str = "") -> None:
        self.missing = sorted(missing)
        super().__init__(
            f"{where} is missing required keys {self.missing}."
            + (f" {hint}" if hint else " Check that the file is the checkpoint you meant to load.")
        )


class ShapeMismatchError(InteropError):
    """A tensor's shape disagrees with the config or with the other tensors."""


class UnsupportedDictionaryError(InteropError, NotImplementedError):
    """A valid checkpoint whose behaviour has no exact equivalent in sae_diff's classes.

    Raised instead of loading approximately (e.g. a ``decoupled`` BatchTopK code, per-dimension
    standardisation, a subset of encoder layers).
    """


__all__ = [
    "InteropError",
    "InteropFileNotFoundError",
    "MissingKeysError",
    "ShapeMismatchError",
    "UnknownDictClassError",
    "UnsupportedDictionaryError",
]
