"""The one table of architectures: every name, kind and data mode sae_diff knows, in one place.

**The one-table rule.** Everything that depends on *which* architectures exist derives from
:data:`ARCHITECTURES` (SAELens registration in ``registry.py``, the training config's
crosscoder / diff-SAE sets and default store modes, the Hub's metadata checks, the report's
methods, the kind check in ``kinds.py``). Adding an architecture means one module with its
classes (``dictionaries/<name>.py``) and one :class:`ArchitectureSpec` row here; nothing else
lists architecture names.

This module imports no architecture class (the rows name them as ``"module:Class"`` strings,
resolved by :meth:`ArchitectureSpec.classes`), so anything may import it without pulling in
the dictionaries, and the architecture modules may import it without an import cycle.

The vocabulary is typed: :data:`StoreMode` (which activations a dictionary reads; the
activation store's modes), :data:`DiffSign` (which difference a diff-SAE reads) and
:data:`DictionaryKind` (what a dictionary is for diffing); the tuples :data:`STORE_MODES`,
:data:`DIFF_SIGNS` and :data:`KINDS` are those literals' values.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from sae_lens.saes.sae import SAE, SAEConfig

#: which activations a dictionary reads: both models (crosscoders), ft - base (diff-SAEs), or
#: one model (single-model SAEs)
StoreMode = Literal["paired", "diff", "base", "ft"]
#: which difference a diff-SAE reads
DiffSign = Literal["ft_minus_base", "base_minus_ft"]
#: what a dictionary is for diffing
DictionaryKind = Literal["crosscoder", "diff_sae", "ft_sae", "base_sae"]

STORE_MODES: tuple[StoreMode, ...] = get_args(StoreMode)
DIFF_SIGNS: tuple[DiffSign, ...] = get_args(DiffSign)
KINDS: tuple[DictionaryKind, ...] = get_args(DictionaryKind)

_PKG = "sae_diff.dictionaries"


@dataclass(frozen=True)
class ArchitectureSpec:
    """One architecture.

    Attributes:
        training: the SAELens training-registry name (``sae.architecture`` in configs).
        inference: the name of the saved (inference) form, ``cfg.json``'s ``architecture``.
        kind: what the dictionary is for diffing (a one-model SAE: the default, ``ft_sae``).
        store_mode: the activations it trains on (``auto`` in a config resolves to this).
        trained: how it is trained, in a few words (docs, ``--help``).
        training_class, training_config, inference_class, inference_config:
            ``"module:Class"`` (module relative to ``sae_diff.dictionaries``, or absolute).
        registered_by: ``"sae_diff"`` (registered with SAELens on ``import sae_diff``) or
            ``"sae_lens"`` (SAELens's own architecture, listed so the vocabulary is complete).
    """

    training: str
    inference: str
    kind: DictionaryKind
    store_mode: StoreMode
    trained: str
    training_class: str
    training_config: str
    inference_class: str
    inference_config: str
    registered_by: Literal["sae_diff", "sae_lens"] = "sae_diff"

    @property
    def is_crosscoder(self) -> bool:
        return self.kind == "crosscoder"

    @staticmethod
    def _resolve(ref: str) -> Any:
        module, name = ref.split(":")
        if not module.startswith(("sae_diff.", "sae_lens.")):
            module = f"{_PKG}.{module}"
        return getattr(importlib.import_module(module), name)

    def training_classes(self) -> tuple[type, type]:
        """(training class, its config class), imported on demand."""
        return self._resolve(self.training_class), self._resolve(self.training_config)

    def inference_classes(self) -> tuple[type, type]:
        """(inference class, its config class), imported on demand."""
        return self._resolve(self.inference_class), self._resolve(self.inference_config)


def _cc(
    training: str,
    inference: str,
    trained: str,
    module: str,
    tr: str,
    inf: str,
    inf_module: str | None = None,
) -> ArchitectureSpec:
    im = inf_module or module
    return ArchitectureSpec(
        training,
        inference,
        "crosscoder",
        "paired",
        trained,
        f"{module}:{tr}",
        f"{module}:{tr}Config",
        f"{im}:{inf}",
        f"{im}:{inf}Config",
    )


#: Every architecture (the one table; see the module docstring).
ARCHITECTURES: tuple[ArchitectureSpec, ...] = (
    _cc(
        "crosscoder",
        "crosscoder",
        "L1 (ReLU) crosscoder",
        "crosscoder",
        "L1CrosscoderTraining",
        "Crosscoder",
    ),
    _cc(
        "batchtopk_crosscoder",
        "jumprelu_crosscoder",
        "BatchTopK crosscoder (JumpReLU at inference)",
        "batchtopk_crosscoder",
        "BatchTopKCrosscoderTraining",
        "JumpReLUCrosscoder",
    ),
    _cc(
        "jumprelu_crosscoder",
        "jumprelu_crosscoder",
        "JumpReLU crosscoder trained directly (STE threshold)",
        "jumprelu_crosscoder_training",
        "JumpReLUCrosscoderTraining",
        "JumpReLUCrosscoder",
        inf_module="batchtopk_crosscoder",
    ),
    _cc(
        "shared_crosscoder",
        "shared_crosscoder",
        "L1 crosscoder with tied shared latents",
        "shared_crosscoder",
        "SharedCrosscoderTraining",
        "SharedCrosscoder",
    ),
    _cc(
        "shared_batchtopk_crosscoder",
        "shared_jumprelu_crosscoder",
        "BatchTopK crosscoder with tied shared latents",
        "shared_crosscoder",
        "SharedBatchTopKCrosscoderTraining",
        "SharedJumpReLUCrosscoder",
    ),
    _cc(
        "dedicated_batchtopk_crosscoder",
        "dedicated_crosscoder",
        "BatchTopK crosscoder with dedicated latents",
        "dedicated_crosscoder",
        "DedicatedBatchTopKCrosscoderTraining",
        "DedicatedCrosscoder",
    ),
    _cc(
        "cross_architecture_crosscoder",
        "cross_architecture_jumprelu_crosscoder",
        "BatchTopK crosscoder across different d_model (zero-padded)",
        "cross_architecture_crosscoder",
        "CrossArchitectureCrosscoderTraining",
        "CrossArchitectureCrosscoder",
    ),
    ArchitectureSpec(
        "batchtopk_diff_sae",
        "diff_sae",
        "diff_sae",
        "diff",
        "BatchTopK SAE on ft - base (or base - ft)",
        "diff_sae:BatchTopKDiffSAETraining",
        "diff_sae:BatchTopKDiffSAETrainingConfig",
        "diff_sae:DiffSAE",
        "diff_sae:DiffSAEConfig",
    ),
    ArchitectureSpec(
        "batchtopk",
        "jumprelu",
        "ft_sae",
        "ft",
        "SAELens's BatchTopK SAE on one model (chat-SAE)",
        "sae_lens.saes.batchtopk_sae:BatchTopKTrainingSAE",
        "sae_lens.saes.batchtopk_sae:BatchTopKTrainingSAEConfig",
        "sae_lens.saes.jumprelu_sae:JumpReLUSAE",
        "sae_lens.saes.jumprelu_sae:JumpReLUSAEConfig",
        registered_by="sae_lens",
    ),
)

_BY_TRAINING = {s.training: s for s in ARCHITECTURES}


def spec(training_name: str) -> ArchitectureSpec | None:
    """The row of a training architecture name (None: not one of the table's)."""
    return _BY_TRAINING.get(training_name)


def training_names(kind: DictionaryKind | None = None) -> frozenset[str]:
    """Training names (of one kind)."""
    return frozenset(s.training for s in ARCHITECTURES if kind is None or s.kind == kind)


def inference_names(kind: DictionaryKind | None = None) -> frozenset[str]:
    """Saved (inference) names (of one kind)."""
    return frozenset(s.inference for s in ARCHITECTURES if kind is None or s.kind == kind)


def default_store_mode(architecture: str) -> StoreMode:
    """The activations an architecture reads: the table's store mode; ``ft`` (a chat-SAE) for
    any other single-model SAE of SAELens's."""
    row = spec(architecture)
    return row.store_mode if row is not None else "ft"


# ---------------------------------------------------------------------- SAELens registry lookups
def _unknown(name: str, table: dict[str, Any]) -> ValueError:
    return ValueError(
        f"Unknown architecture {name!r}. Registered names: {sorted(table)}. "
        "Did you `import sae_diff` before loading?"
    )


def inference_class(name: str) -> tuple[type[SAE[Any]], type[SAEConfig]]:
    """Inference (class, config class) for an architecture name, from SAELens's registry."""
    from sae_lens import registry as sl_registry

    if name not in sl_registry.SAE_CLASS_REGISTRY:
        raise _unknown(name, sl_registry.SAE_CLASS_REGISTRY)
    return sl_registry.SAE_CLASS_REGISTRY[name]


__all__ = [
    "ARCHITECTURES",
    "DIFF_SIGNS",
    "KINDS",
    "STORE_MODES",
    "ArchitectureSpec",
    "DictionaryKind",
    "DiffSign",
    "StoreMode",
    "default_store_mode",
    "inference_class",
    "inference_names",
    "spec",
    "training_names",
]
