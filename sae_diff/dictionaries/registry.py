"""Registration of sae_diff's architectures with SAELens (``sae_lens.registry``).

Names are user-facing config values and stay stable:

=====================  =====================================  ==========================
name                   training class                         saved (inference) form
=====================  =====================================  ==========================
``crosscoder``         L1 (ReLU) crosscoder                    ``crosscoder``
``batchtopk_crosscoder`` BatchTopK crosscoder                  ``jumprelu_crosscoder``
``batchtopk_diff_sae`` BatchTopK SAE on ft−base / base−ft      ``diff_sae``
``jumprelu_crosscoder`` JumpReLU crosscoder trained directly   ``jumprelu_crosscoder``
``shared_crosscoder``  L1 crosscoder, tied shared latents      ``shared_crosscoder``
``shared_batchtopk_crosscoder`` BatchTopK, tied shared latents ``shared_jumprelu_crosscoder``
``dedicated_batchtopk_crosscoder`` BatchTopK, dedicated latents ``dedicated_crosscoder``
``cross_architecture_crosscoder`` different d_model, padded  ``cross_architecture_jumprelu_crosscoder``
=====================  =====================================  ==========================

The chat-SAE / base-SAE need nothing new: SAELens's own ``batchtopk`` serves.
"""

from __future__ import annotations

from typing import Any

from sae_lens import registry as sl_registry
from sae_lens.saes.sae import SAE, SAEConfig, TrainingSAE, TrainingSAEConfig

from sae_diff.dictionaries.batchtopk_crosscoder import (
    BatchTopKCrosscoderTraining,
    BatchTopKCrosscoderTrainingConfig,
    JumpReLUCrosscoder,
    JumpReLUCrosscoderConfig,
)
from sae_diff.dictionaries.cross_architecture_crosscoder import (
    CrossArchitectureCrosscoder,
    CrossArchitectureCrosscoderConfig,
    CrossArchitectureCrosscoderTraining,
    CrossArchitectureCrosscoderTrainingConfig,
)
from sae_diff.dictionaries.crosscoder import (
    Crosscoder,
    CrosscoderConfig,
    L1CrosscoderTraining,
    L1CrosscoderTrainingConfig,
)
from sae_diff.dictionaries.dedicated_crosscoder import (
    DedicatedBatchTopKCrosscoderTraining,
    DedicatedBatchTopKCrosscoderTrainingConfig,
    DedicatedCrosscoder,
    DedicatedCrosscoderConfig,
)
from sae_diff.dictionaries.diff_sae import (
    BatchTopKDiffSAETraining,
    BatchTopKDiffSAETrainingConfig,
    DiffSAE,
    DiffSAEConfig,
)
from sae_diff.dictionaries.jumprelu_crosscoder_training import (
    JumpReLUCrosscoderTraining,
    JumpReLUCrosscoderTrainingConfig,
)
from sae_diff.dictionaries.shared_crosscoder import (
    SharedBatchTopKCrosscoderTraining,
    SharedBatchTopKCrosscoderTrainingConfig,
    SharedCrosscoder,
    SharedCrosscoderConfig,
    SharedCrosscoderTraining,
    SharedCrosscoderTrainingConfig,
    SharedJumpReLUCrosscoder,
    SharedJumpReLUCrosscoderConfig,
)

INFERENCE_ARCHITECTURES: dict[str, tuple[type[SAE[Any]], type[SAEConfig]]] = {
    "crosscoder": (Crosscoder, CrosscoderConfig),
    "jumprelu_crosscoder": (JumpReLUCrosscoder, JumpReLUCrosscoderConfig),
    "diff_sae": (DiffSAE, DiffSAEConfig),
    "shared_crosscoder": (SharedCrosscoder, SharedCrosscoderConfig),
    "shared_jumprelu_crosscoder": (SharedJumpReLUCrosscoder, SharedJumpReLUCrosscoderConfig),
    "dedicated_crosscoder": (DedicatedCrosscoder, DedicatedCrosscoderConfig),
    "cross_architecture_jumprelu_crosscoder": (CrossArchitectureCrosscoder, CrossArchitectureCrosscoderConfig),
}
TRAINING_ARCHITECTURES: dict[str, tuple[type[TrainingSAE[Any]], type[TrainingSAEConfig]]] = {
    "crosscoder": (L1CrosscoderTraining, L1CrosscoderTrainingConfig),
    "batchtopk_crosscoder": (BatchTopKCrosscoderTraining, BatchTopKCrosscoderTrainingConfig),
    "batchtopk_diff_sae": (BatchTopKDiffSAETraining, BatchTopKDiffSAETrainingConfig),
    "jumprelu_crosscoder": (JumpReLUCrosscoderTraining, JumpReLUCrosscoderTrainingConfig),
    "shared_crosscoder": (SharedCrosscoderTraining, SharedCrosscoderTrainingConfig),
    "shared_batchtopk_crosscoder": (SharedBatchTopKCrosscoderTraining, SharedBatchTopKCrosscoderTrainingConfig),
    "dedicated_batchtopk_crosscoder": (DedicatedBatchTopKCrosscoderTraining,
                                       DedicatedBatchTopKCrosscoderTrainingConfig),
    "cross_architecture_crosscoder": (CrossArchitectureCrosscoderTraining,
                                      CrossArchitectureCrosscoderTrainingConfig),
}
ARCHITECTURES: tuple[str, ...] = tuple(sorted(set(INFERENCE_ARCHITECTURES) | set(TRAINING_ARCHITECTURES)))


def _same(a: type, b: type) -> bool:
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def _register(table: dict[str, Any], name: str, classes: tuple[type, type], register: Any) -> None:
    existing = table.get(name)
    if existing is None:
        register(name, *classes)
    elif not _same(existing[0], classes[0]):
        raise ValueError(
            f"SAELens already has a different class registered as {name!r} ({existing[0].__qualname__}); "
            "sae_diff cannot register its own under that name. Remove the conflicting registration."
        )
    else:  # same class re-imported (e.g. importlib.reload): point the registry at it
        table[name] = classes


def register_architectures() -> None:
    """Register all sae_diff architectures; safe to call any number of times."""
    for name, inf in INFERENCE_ARCHITECTURES.items():
        _register(sl_registry.SAE_CLASS_REGISTRY, name, inf, sl_registry.register_sae_class)
    for name, tr in TRAINING_ARCHITECTURES.items():
        _register(sl_registry.SAE_TRAINING_CLASS_REGISTRY, name, tr, sl_registry.register_sae_training_class)


def _unknown(name: str, table: dict[str, Any]) -> ValueError:
    return ValueError(f"Unknown architecture {name!r}. Registered names: {sorted(table)}. "
                      "Did you `import sae_diff` before loading?")


def inference_class(name: str) -> tuple[type[SAE[Any]], type[SAEConfig]]:
    """Inference (class, config class) for an architecture name, from SAELens's registry."""
    if name not in sl_registry.SAE_CLASS_REGISTRY:
        raise _unknown(name, sl_registry.SAE_CLASS_REGISTRY)
    return sl_registry.SAE_CLASS_REGISTRY[name]


def training_config(architecture: str, **kwargs: Any) -> TrainingSAEConfig:
    """Build a training config by architecture name, with a clear error for unknown names."""
    table = sl_registry.SAE_TRAINING_CLASS_REGISTRY
    if architecture not in table:
        raise _unknown(architecture, table)
    return table[architecture][1](**kwargs)


def training_sae(cfg: TrainingSAEConfig) -> TrainingSAE[Any]:
    """Instantiate the training class matching ``cfg.architecture()``."""
    return sl_registry.SAE_TRAINING_CLASS_REGISTRY[cfg.architecture()][0](cfg)
