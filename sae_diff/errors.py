"""One error hierarchy for sae_diff: every error the library raises on purpose is a
:class:`SaeDiffError`.

Why one base class: callers (the ``sae-diff`` CLI, notebooks, pipelines) can tell "sae_diff
refused this input, and the message says what to do" apart from a bug with a single
``except SaeDiffError``. The CLI prints such errors as one line and exits with status 2; any
other exception is a bug and keeps its traceback.

The historical classes keep their other bases (``ValueError``, ``RuntimeError``,
``KeyError``) so that existing ``except ValueError`` code still works::

    SaeDiffError
    ├── ConfigError            (ValueError)    sae_diff.training.errors
    ├── TrainingDataError      (RuntimeError)  sae_diff.training.errors
    ├── CacheError             (RuntimeError)  sae_diff.data.cache_format
    │   └── CacheIdentityError                 cache holds other data than the config asks for
    ├── PairingError           (ValueError)    sae_diff.pairing.errors
    ├── HookNameError          (KeyError)      sae_diff.pairing.errors
    ├── InteropError           (ValueError)    sae_diff.interop.errors (and its subclasses)
    ├── HubError               (ValueError)    sae_diff.hub
    ├── LayerError             (ValueError)    sae_diff.evaluation.stitching
    ├── OrganismIntegrityError (RuntimeError)  sae_diff.organisms.storage
    └── CheckpointError        (FileNotFoundError) resuming: no / an incompatible checkpoint

A message is written as *what* went wrong, *why* (the value that caused it) and *the fix*,
in one or two sentences; :func:`one_line` flattens it for terminals.
"""

from __future__ import annotations


class SaeDiffError(Exception):
    """Base class of every deliberate sae_diff error (bad input, missing or corrupt data).

    The message names the problem, the offending value and the fix; it is meant to be shown
    to a user as is, without a traceback.
    """


class CheckpointError(SaeDiffError, FileNotFoundError):
    """A run cannot be resumed: no checkpoint at the given path, or one that does not match
    the run (the message lists every difference)."""


def one_line(err: BaseException) -> str:
    """``err``'s message on one line (newlines and runs of spaces collapsed).

    ``KeyError`` subclasses quote their argument in ``str()``; this uses the argument itself.
    """
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(text.split()) or type(err).__name__


__all__ = ["CheckpointError", "SaeDiffError", "one_line"]
