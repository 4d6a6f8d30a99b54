"""pairing: the only place that runs the two models (PairedModel) and the token masks."""

from sae_diff.pairing.errors import HookNameError, PairingError
from sae_diff.pairing.masks import MaskConfig, TokenMasks, compute_masks
from sae_diff.pairing.model import PairedModel

__all__ = [
    "HookNameError",
    "MaskConfig",
    "PairedModel",
    "PairingError",
    "TokenMasks",
    "compute_masks",
]
