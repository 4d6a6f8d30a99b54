"""Finding, loading and checking training checkpoints (``sae-diff train --resume``): the
newest complete checkpoint of a run, ``torch.load(weights_only=True)`` of its state files, and
the check that a resumed run learns what its checkpoint learnt. The runner writes them
(:mod:`sae_diff.training.runner`, which re-exports these names).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from sae_lens.constants import (
    RUNNER_CFG_FILENAME,
    TRAINER_STATE_FILENAME,
)

from sae_diff.errors import CheckpointError
from sae_diff.training.config import PairedRunnerConfig

#: sae_diff's own state file in a checkpoint (data position, RNG)
SAE_DIFF_STATE_FILENAME = "sae_diff_state.pt"


def _run_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(sample count, folder) of every complete checkpoint directly inside ``run``."""
    found: list[tuple[int, Path]] = []
    for child in run.iterdir():
        if child.name.startswith(".") or not (child / TRAINER_STATE_FILENAME).is_file():
            continue  # hidden: an atomic write in progress; no trainer state: not a checkpoint
        digits = "".join(c for c in child.name if c.isdigit())
        found.append((int(digits) if digits else -1, child))
    return found


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder to resume from.

    ``path`` may be a checkpoint itself, a run's folder (``<checkpoint_path>/<run id>``: its
    newest checkpoint, the largest sample count) or the configured ``checkpoint_path`` that
    holds one folder per run (the most recently written run, then its newest checkpoint).

    Raises:
        CheckpointError: nothing resumable at ``path`` (the message says what was expected).
    """
    path = Path(path)
    if (path / TRAINER_STATE_FILENAME).is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(
            f"No checkpoint at {path}: the folder does not exist. Pass the run's checkpoint_path "
            "(or one run or checkpoint folder inside it)."
        )
    found = _run_checkpoints(path)
    if found:
        return max(found)[1]
    runs = [
        (max(p.stat().st_mtime_ns for _, p in ck), max(ck)[1])
        for child in path.iterdir()
        if child.is_dir() and not child.name.startswith(".") and (ck := _run_checkpoints(child))
    ]
    if runs:
        return max(runs)[1]
    raise CheckpointError(
        f"No checkpoint in {path}: expected a folder holding {TRAINER_STATE_FILENAME}, a run's "
        "folder of them, or the checkpoint_path holding run folders. Was checkpoint_path null, "
        "or did the run stop before its first checkpoint?"
    )


def load_state_file(path: Path, map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` (explicit, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
    cannot turn it off) with a clear :class:`~sae_diff.errors.CheckpointError` when the file is
    missing, truncated or holds pickled objects other than tensors and plain containers
    (which are never run)."""
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: the checkpoint is incomplete. Resume from another "
            "checkpoint of the run (pass its folder to --resume)."
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"{path} cannot be loaded safely ({type(e).__name__}: {' '.join(str(e).split())[:300]}). "
            "sae_diff loads trainer state with weights_only=True and never runs pickled code; the file "
            "is corrupt or was not written by sae_diff. Resume from another checkpoint of the run."
        ) from e


#: config fields a resumed run may change (where and how it runs, not what it learns)
RESUME_MAY_CHANGE = frozenset(
    {
        "device",
        "llm_device",
        "act_store_device",
        "output_path",
        "checkpoint_path",
        "resume_from_checkpoint",
        "logger",
        "verbose",
        "n_checkpoints",
        "eval_at_end",
        "eval_loss_recovered",
        "n_eval_batches",
        "eval_batch_size_prompts",
        "cache_path",
        "training_tokens",
        "save_final_checkpoint",
        "autocast",
        "autocast_lm",
        "compile_llm",
        "compile_sae",
        "llm_compilation_mode",
        "sae_compilation_mode",
    }
)


def check_resume_config(checkpoint: str | Path, cfg: PairedRunnerConfig) -> None:
    """A resumed run must learn what its checkpoint learnt: raise one
    :class:`~sae_diff.errors.CheckpointError` listing every field (models, hook, data, the
    dictionary's shape, optimiser settings, ...) where ``cfg`` differs from the checkpoint's
    saved config. Fields in :data:`RESUME_MAY_CHANGE` may differ."""
    saved = json.loads((Path(checkpoint) / RUNNER_CFG_FILENAME).read_text())
    now = json.loads(json.dumps(cfg.to_dict(), default=str))
    diffs: list[str] = []
    # a field the checkpoint does not record at all is newer than the run (it gets its default)
    for key in sorted(set(saved)):
        if key in RESUME_MAY_CHANGE:
            continue
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [
                f"{key}.{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}"  # metadata: filled in by the run
                for k in sorted(a)
                if a.get(k) != b.get(k) and k != "metadata"
            ]
        elif a != b:
            diffs.append(f"{key}: checkpoint {a!r}, now {b!r}")
    if diffs:
        raise CheckpointError(
            f"Cannot resume {checkpoint} with a different setup ({len(diffs)} difference"
            f"{'s' if len(diffs) > 1 else ''}: {'; '.join(diffs)}). Drop those flags to resume "
            "exactly, or start a new run with --config."
        )


__all__ = [
    "RESUME_MAY_CHANGE",
    "SAE_DIFF_STATE_FILENAME",
    "check_resume_config",
    "find_checkpoint",
    "load_state_file",
]
