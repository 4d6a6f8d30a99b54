"""Checks of a run's local datasets before any model is loaded.

A dataset file that is empty, unreadable, a folder of files (not a ``save_to_disk`` folder) or
holds only empty texts fails in a second with a message naming the file and the fix, through
the Python API (:meth:`~sae_diff.training.runner.PairedSAETrainingRunner.run`, via
:func:`~sae_diff.training.tokens.check_dataset_column`) and the CLI alike, instead of a bare
``StopIteration`` from ``datasets`` or a later "no held-out activations".
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sae_diff.data.documents import DatasetSpec, load_rows
from sae_diff.training.config import PairedRunnerConfig
from sae_diff.training.errors import TrainingDataError


def check_local_datasets(cfg: PairedRunnerConfig) -> None:
    """Check the run's local datasets before any model is loaded: they exist, are data files
    or saved datasets (not a folder of files), hold rows, and not only empty texts.

    Hub datasets are not checked here (that needs the network); the runner peeks at them.

    Raises:
        TrainingDataError: naming the dataset, what is wrong and the fix.
    """
    specs: list[dict[str, Any]] = list(cfg.dataset_mixture or [])
    if cfg.dataset_path and not specs:
        specs = [
            {"path": cfg.dataset_path, "column": cfg.dataset_column, "split": cfg.dataset_split}
        ]
    for spec in specs:
        path = Path(str(spec.get("path", ""))).expanduser()
        if not path.exists():
            continue  # a Hub id, or missing: the reader's own message names it
        if path.is_dir():
            if (
                (path / "dataset_info.json").exists()
                or (path / "state.json").exists()
                or (path / "dataset_dict.json").exists()
            ):
                _check_rows(path, spec, saved=True)
                continue
            files = sorted(
                p.name
                for p in path.iterdir()
                if p.suffix in (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")
            )
            raise TrainingDataError(
                f"dataset {str(path)!r} is a folder of data files ({', '.join(files[:4])}"
                f"{', ...' if len(files) > 4 else ''}), not a saved dataset (no dataset_info.json). "
                "Pass one file as dataset_path, or list each file in dataset_mixture "
                "(- {path: FILE, weight: 1}); a folder is read only when written by Dataset.save_to_disk."
                if files
                else f"dataset {str(path)!r} is an empty folder or holds no data files; give a .jsonl/.json/"
                ".parquet/.csv/.txt file or a folder written by Dataset.save_to_disk."
            )
        if path.stat().st_size == 0 or not path.read_bytes()[: 1 << 16].strip():
            raise TrainingDataError(
                f"dataset file {str(path)!r} is empty (no rows). Point dataset_path at a file with data."
            )
        _check_rows(path, spec, saved=False)


def _check_rows(path: Path, spec: dict[str, Any], saved: bool) -> None:
    """At least one row, and at least one non-empty text in the text column (read until the
    first one: cheap when the data is fine)."""
    keys = ("path", "column", "split", "name", "revision", "start", "stop")
    ds_spec = DatasetSpec(**{k: v for k, v in spec.items() if k in keys and v is not None})
    try:
        rows = iter(load_rows(ds_spec))
        first = next(rows, None)
    except Exception as e:  # datasets raises StopIteration/IndexError/ArrowInvalid on bad files
        if saved and _saved_rows(path) == 0:  # datasets cannot even open an empty saved dataset
            first = None
        else:
            raise TrainingDataError(
                f"dataset {str(path)!r} cannot be read ({type(e).__name__}: {e}"
                f"{f'; {type(e.__cause__).__name__}: {e.__cause__}' if e.__cause__ else ''}). Check that it is a valid "
                f"{'saved dataset' if saved else path.suffix + ' file'} with one record per row."
            ) from e
    if first is None:
        raise TrainingDataError(
            f"{'saved dataset' if saved else 'dataset file'} {str(path)!r} (split {ds_spec.split!r}) has no "
            "rows. Point dataset_path at data."
        )
    column = ds_spec.column or next(
        (c for c in ("text", "content", "document") if c in first), None
    )
    if column is None or not isinstance(first.get(column), str):
        return  # tokens or chat data: nothing more to check cheaply
    n = 0
    for row in _chain(first, rows):
        n += 1
        if str(row.get(column) or "").strip():
            return
    raise TrainingDataError(
        f"dataset {str(path)!r}: all {n} texts in column {column!r} are empty, so there is nothing to "
        "tokenize. Check the column (dataset_column) or the file."
    )


def _saved_rows(path: Path) -> int | None:
    """Rows in the Arrow files of a ``save_to_disk`` folder (None if they cannot be read)."""
    try:
        import pyarrow as pa

        return sum(pa.ipc.open_stream(str(f)).read_all().num_rows for f in path.rglob("*.arrow"))
    except Exception:
        return None


def _chain(first: dict[str, Any], rest: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield first
    yield from rest


__all__ = ["check_local_datasets"]
