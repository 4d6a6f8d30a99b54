"""sae_diff: model diffing with crosscoders and diff-SAEs, as a SAELens / TransformerLens plugin.

Importing this package registers its dictionary architectures with SAELens, so that
``SAE.load_from_disk`` and ``SAE.from_pretrained`` can load them.
"""

from sae_diff.dictionaries.registry import ARCHITECTURES, register_architectures

register_architectures()

from sae_diff.interop import convert, load  # noqa: E402  (needs the registry)

__version__ = "0.1.0"
__all__ = ["ARCHITECTURES", "convert", "load", "register_architectures", "__version__"]
