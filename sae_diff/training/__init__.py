"""Training dictionaries on a model pair through SAELens-style configs.

- :class:`~sae_diff.training.config.PairedRunnerConfig`: SAELens's
  ``LanguageModelSAERunnerConfig`` plus the pair (base model or a bundled organism, store
  mode, masks, cache).
- :class:`~sae_diff.training.runner.PairedSAETrainingRunner`: trains on SAELens's
  ``SAETrainer`` with atomic, exactly-resumable checkpoints and a paired evaluator.

See ``docs/training.md``.
"""

from sae_diff.training.config import ConfigError, PairedRunnerConfig, SmokeTestModels
from sae_diff.training.flags import parse_config
from sae_diff.training.plan import make_plan
from sae_diff.training.runner import PairedSAETrainingRunner, resume, train
from sae_diff.training.trainer import TrainingInterrupted

__all__ = [
    "ConfigError",
    "PairedRunnerConfig",
    "PairedSAETrainingRunner",
    "SmokeTestModels",
    "TrainingInterrupted",
    "make_plan",
    "parse_config",
    "resume",
    "train",
]
