"""Registration of sae_diff's architectures with SAELens (``sae_lens.registry``).

The architectures are the rows of :data:`sae_diff.dictionaries.specs.ARCHITECTURES` (the one
table; see its module docstring): each row's training and inference classes are registered
under its training and saved names. Nothing here lists architecture names; adding one is a
module with its classes and a row in that table. SAELens's own ``batchtopk`` (the chat-SAE /
base-SAE) is in the table too, registered by SAELens itself.
"""

from __future__ import annotations

from typing import Any

from sae_lens import registry as sl_registry
from sae_lens.saes.sae import SAE, SAEConfig, TrainingSAE, TrainingSAEConfig

from sae_diff.dictionaries import specs
from sae_diff.dictionaries.specs import _unknown, inference_class

_OURS = [row for row in specs.ARCHITECTURES if row.registered_by == "sae_diff"]
#: saved name -> (inference class, config class), derived from the table
INFERENCE_ARCHITECTURES: dict[str, tuple[type[SAE[Any]], type[SAEConfig]]] = {
    row.inference: row.inference_classes()
    for row in _OURS  # type: ignore[misc]
}
#: training name -> (training class, config class), derived from the table
TRAINING_ARCHITECTURES: dict[str, tuple[type[TrainingSAE[Any]], type[TrainingSAEConfig]]] = {
    row.training: row.training_classes()
    for row in _OURS  # type: ignore[misc]
}
ARCHITECTURES: tuple[str, ...] = tuple(
    sorted(set(INFERENCE_ARCHITECTURES) | set(TRAINING_ARCHITECTURES))
)


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
        _register(
            sl_registry.SAE_TRAINING_CLASS_REGISTRY,
            name,
            tr,
            sl_registry.register_sae_training_class,
        )


def training_config(architecture: str, **kwargs: Any) -> TrainingSAEConfig:
    """Build a training config by architecture name, with a clear error for unknown names."""
    table = sl_registry.SAE_TRAINING_CLASS_REGISTRY
    if architecture not in table:
        raise _unknown(architecture, table)
    return table[architecture][1](**kwargs)


def training_sae(cfg: TrainingSAEConfig) -> TrainingSAE[Any]:
    """Instantiate the training class matching ``cfg.architecture()``."""
    return sl_registry.SAE_TRAINING_CLASS_REGISTRY[cfg.architecture()][0](cfg)


__all__ = [
    "ARCHITECTURES",
    "INFERENCE_ARCHITECTURES",
    "TRAINING_ARCHITECTURES",
    "inference_class",
    "register_architectures",
    "training_config",
    "training_sae",
]
