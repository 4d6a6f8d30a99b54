"""The sizes of the diffing study (:class:`DemoConfig`) and the stage timer its report carries.

``DemoConfig()`` is the full study of ``make demo``; ``DemoConfig.quick_config()`` the CI size
(the same pipeline with smaller numbers).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_diff.report.methods import ANALYSIS_METHODS, DEFAULT_METHODS, METHODS


@dataclass
class DemoConfig:
    """Sizes of the study. ``quick()`` is the CI size (same pipeline, smaller numbers).

    ``seed`` seeds the data (harvest, evaluation folds of seed 0); ``seeds`` are the training
    seeds: every method is trained once per seed and every figure is reported over them."""

    out: Path = Path("demo_output")
    organism: str = "default"
    hook: str | None = None
    context_size: int = 64
    n_pretrain_docs: int = 1500
    n_chat_docs: int = 1500
    chat_share: float = 0.5
    max_rows: int = 1600
    expansion: int = 8
    k: int = 16
    l1_coefficient: float = 2.0
    # 3 seeds x 4 methods must fit in 10 minutes on 2 busy cores (docs/evaluation.md): 800 steps
    # per seed instead of the single-seed run's 1200.
    train_steps: int = 800
    batch_size: int = 512
    lr: float = 2e-3
    threshold_ema_decay: float = 0.99
    eval_per_behaviour: int = 16
    n_controls: int | None = None  # control conversations (default: as many as triggered ones)
    n_text: int = (
        16  # plain-text rows (the negatives of chat_format), when the organism has a world
    )
    random_seeds: int = 5
    top_n: int = 50
    # the bar: some method finds each behaviour at the conversation level with
    # AUROC >= 0.95 among its top 20 candidates, on every seed (a finding in the report)
    game_top: int = 20
    game_threshold: float = 0.95
    nu_eps_max: float = 0.3
    nu_r_max: float = 0.6
    n_example_latents: int = 5
    n_pca: int = 10
    n_kl_types: int = 10
    seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = DEFAULT_METHODS
    # base-SAE methods (ANALYSIS_METHODS): the base-SAE's steps, the
    # stage-wise model stage's steps, and the causal filter's candidates / random latents
    # issue 17's crosscoder variants train for variant_steps (not train_steps): 4 more methods
    # x 3 seeds at 800 steps would take the default run past its budget (docs/evaluation.md)
    variant_steps: int = 300
    base_sae_steps: int = 300
    stage_steps: int = 150
    causal_candidates: int = 20
    causal_random: int = 20
    causal_quantile: float = 0.95
    causal_mode: str = "ablate"
    causal_scale: float = 10.0
    quick: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = [*METHODS, *ANALYSIS_METHODS]
        unknown = [m for m in self.methods if m not in known]
        if unknown:
            raise ValueError(f"Unknown method(s) {unknown}; choose from {known}.")
        if not self.methods:
            raise ValueError(f"No methods selected; choose from {known}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds}.")
        self.seeds = tuple(int(s) for s in self.seeds)
        self.methods = tuple(self.methods)

    @classmethod
    def quick_config(cls, **kw: Any) -> DemoConfig:
        base: dict[str, Any] = {
            "n_pretrain_docs": 300,
            "n_chat_docs": 300,
            "max_rows": 320,
            "train_steps": 200,
            "batch_size": 256,
            "eval_per_behaviour": 6,
            "n_text": 6,
            "random_seeds": 2,
            "quick": True,
            "variant_steps": 150,
            "base_sae_steps": 150,
            "stage_steps": 100,
        }
        base.update(kw)
        return cls(**base)


def timed(cfg: DemoConfig, name: str, t0: float) -> float:
    """Add the time since ``t0`` to ``cfg.timings[name]`` (report.json's ``timings_s``); returns now."""
    now = time.perf_counter()
    cfg.timings[name] = round(cfg.timings.get(name, 0.0) + now - t0, 2)
    return now


__all__ = ["DemoConfig", "timed"]
