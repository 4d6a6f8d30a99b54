"""Loaders for dictionaries published with other code, converted to sae_diff / SAELens form.

Formats: dictionary_learning (science-of-finetuning fork) ``CrossCoder``,
``BatchTopKCrossCoder`` and ``BatchTopKSAE``; the first open crosscoder replication
(``cfg.json`` + ``cc_weights.pt``); and SAELens folders. See docs/interop.md.
"""

from sae_diff.interop.api import (
    FORMATS,
    convert,
    disk_converter,
    hf_converter,
    load,
    published_disk_loader,
    published_hf_loader,
    read,
)
from sae_diff.interop.common import ConversionOptions
from sae_diff.interop.errors import (
    InteropError,
    InteropFileNotFoundError,
    MissingKeysError,
    ShapeMismatchError,
    UnknownDictClassError,
    UnsupportedDictionaryError,
)

__all__ = [
    "FORMATS",
    "ConversionOptions",
    "InteropError",
    "InteropFileNotFoundError",
    "MissingKeysError",
    "ShapeMismatchError",
    "UnknownDictClassError",
    "UnsupportedDictionaryError",
    "convert",
    "disk_converter",
    "hf_converter",
    "load",
    "published_disk_loader",
    "published_hf_loader",
    "read",
]
