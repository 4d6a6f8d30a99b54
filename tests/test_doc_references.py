"""Prose never sends a reader to a module, name or file that is gone or only an old home.

Issue 15 split long modules. The names that moved keep working from their old modules for one
release (``tests/test_moved_names.py``), so a stale reference in the docs still *imports* and
nobody notices that it points at the old home. This test reads the prose (docs, README,
tutorials, configs' comments, the benchmarks' and the package's docstrings, comments and
messages), extracts every module reference and checks each one:

- ``sae_diff.room.module.Name`` (also ``module:Name``, ``from sae_diff.x import a, b`` and
  ``room.module.Name`` without the package prefix, e.g. ``training.errors.ConfigError``)
  imports and resolves with ``getattr`` *without* a ``DeprecationWarning``;
- and names the module that defines ``Name``: a class or function whose ``__module__`` is
  another ``sae_diff`` module, or a name the record lists as re-exported from an old module
  (``REEXPORTED``), is stale, unless the module named is a package (its ``__init__`` is the
  room's API) or a module whose job is to re-export (``FACADES``);
- a file path (``sae_diff/data/documents.py``, ``data/documents.py``, ``tests/test_x.py``)
  exists, and a bare file name (``behaviours.py``) is the name of a file in the repository.

Python files are read with :mod:`tokenize` (comments and strings only, so code is left to the
import-cycle and moved-name tests). Resolving imports each module named once (about a second
after ``import sae_diff``).
"""

from __future__ import annotations

import importlib
import inspect
import io
import re
import subprocess
import tokenize
import warnings
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest
from test_moved_names import REEXPORTED

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sae_diff"
ROOMS = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())

#: modules whose job is to re-export names defined next to them (their docstrings say so): a
#: reference through one is current although the name is defined elsewhere.
FACADES = {
    "sae_diff.pairing.masks",  # "the one import point of every mask"
    "sae_diff.dictionaries.kernels",  # the sparse training step's public API
}

#: dotted names that identify something other than a module
NOT_REFERENCES = {"sae_diff.activation_cache"}  # the cache's format tag (data/cache_format.py)


_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_ROOMS = "|".join(ROOMS)
#: sae_diff.a.b.Name, sae_diff.a.b:Name
DOTTED = re.compile(rf"(?<![\w./-])sae_diff(?:\.{_IDENT})+(?::{_IDENT}(?:\.{_IDENT})*)?")
#: training.errors.ConfigError (a room's module without the package prefix)
ROOM_DOTTED = re.compile(rf"(?<![\w./-])(?:{_ROOMS})(?:\.{_IDENT})+")
#: from sae_diff.a.b import x, y
FROM_IMPORT = re.compile(rf"from (sae_diff(?:\.{_IDENT})*) import \(?((?:{_IDENT}(?:, *)?)+)")
#: sae_diff/a/b.py, data/b.py, tests/test_x.py, benchmarks/x.py, tutorials/x.py
PATH = re.compile(
    rf"(?<![\w./-])(?:sae_diff|tests|benchmarks|tutorials|{_ROOMS})(?:/{_IDENT})*/{_IDENT}\.py\b"
)
#: behaviours.py
BARE_FILE = re.compile(rf"(?<![\w./-]){_IDENT}\.py\b")
#: what a file name that ends in these is (not a module attribute)
_FILE_SUFFIXES = (".py", ".md", ".json", ".jsonl", ".yaml", ".safetensors", ".html", ".csv")


def prose_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted((ROOT / "tutorials").glob("*.md")) + sorted((ROOT / "tutorials").glob("*.py"))
    files += sorted((ROOT / "configs").rglob("*.yaml"))
    files += sorted((ROOT / "benchmarks").glob("*.py")) + sorted(PACKAGE.rglob("*.py"))
    return files


def _prose(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of the prose in ``path``: a Python file's comments and strings, a
    YAML file's comments, every line of a Markdown file."""
    text = path.read_text()
    if path.suffix == ".py":
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in (tokenize.COMMENT, tokenize.STRING):
                for offset, line in enumerate(tok.string.splitlines()):
                    yield tok.start[0] + offset, line
    elif path.suffix == ".yaml":
        for number, line in enumerate(text.splitlines(), 1):
            if "#" in line:
                yield number, line[line.index("#") :]
    else:
        yield from enumerate(text.splitlines(), 1)


def references(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line number, kind, reference) for each module or file reference in ``path``'s prose;
    kind is ``name``, ``room`` (no package prefix), ``path`` or ``file`` (a bare file name)."""
    for number, text in _prose(path):
        for match in DOTTED.finditer(text):
            if not match.group().endswith(_FILE_SUFFIXES):
                yield number, "name", match.group().replace(":", ".")
        for match in ROOM_DOTTED.finditer(text):
            if not match.group().endswith(_FILE_SUFFIXES):
                yield number, "room", f"sae_diff.{match.group()}"
        for match in FROM_IMPORT.finditer(text):
            for name in re.split(r", *", match.group(2).strip(", ")):
                yield number, "name", f"{match.group(1)}.{name}"
        for match in PATH.finditer(text):
            yield number, "path", match.group()
        for match in BARE_FILE.finditer(text):
            yield number, "file", match.group()


@cache
def _file_names() -> frozenset[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return frozenset(Path(p).name for p in listed)


def _longest_module(parts: list[str]) -> tuple[ModuleType | None, int]:
    """The module named by the longest importable prefix of ``parts``, and that length."""
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            return importlib.import_module(name), i
        except ModuleNotFoundError as error:
            if error.name is None or not name.startswith(error.name):
                raise  # the module exists but one of its own imports failed: say so
    return None, 0


_REEXPORTS = {(old, name): new for (old, new), names in REEXPORTED.items() for name in names}


@cache
def problem(kind: str, ref: str) -> str | None:
    """Why ``ref`` sends a reader to the wrong place, or ``None`` when it is current."""
    if kind == "path":
        return None if any((base / ref).is_file() for base in (ROOT, PACKAGE)) else "no such file"
    if kind == "file":
        return None if ref in _file_names() else "no file of that name in the repository"
    if ref in NOT_REFERENCES:
        return None
    parts = ref.split(".")
    module, i = _longest_module(parts)
    if module is None:
        return "no such module"
    if kind == "room" and i <= 2:
        return None  # "report.get", "data.batches": a word that happens to be a room's name
    obj: object = module
    owner = module.__name__
    for depth, name in enumerate(parts[i:]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                found = getattr(obj, name)
            except AttributeError:
                if name in getattr(obj, "__dataclass_fields__", {}):
                    return None  # a dataclass field without a default
                return f"{owner} has no attribute {name!r}"
        for warning in caught:
            if issubclass(warning.category, DeprecationWarning):
                return f"a deprecation alias ({warning.message})"
        if depth == 0 and owner not in FACADES and not hasattr(module, "__path__"):
            home = _REEXPORTS.get((owner, name))
            if home is None and (inspect.isclass(found) or inspect.isfunction(found)):
                defined_in = found.__module__
                if defined_in != owner and defined_in.split(".")[0] == "sae_diff":
                    home = defined_in
            if home is not None:
                return f"defined in {home}: write {home}.{name}"
        obj, owner = found, f"{owner}.{name}"
    return None


def stale_references(files: list[Path]) -> list[tuple[str, int, str, str]]:
    """(path, line, reference, why) for each stale reference in ``files``."""
    out = []
    for path in files:
        shown = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
        for number, kind, ref in references(path):
            why = problem(kind, ref)
            if why is not None:
                out.append((shown, number, ref, why))
    return out


@cache
def _repository_stale() -> tuple[tuple[str, int, str, str], ...]:
    return tuple(stale_references(prose_files()))


def test_prose_references_are_current() -> None:
    stale = _repository_stale()
    assert not stale, "stale references:\n" + "\n".join(
        f"{path}:{line}: {ref}: {why}" for path, line, ref, why in stale
    )


def _page(tmp_path: Path, text: str) -> Path:
    page = tmp_path / "page.md"
    page.write_text(f"# A page\n\nSome prose; {text}. More prose.\n")
    return page


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("see ``sae_diff.data.sources.iter_documents``", "a deprecation alias"),
        ("the spec `sae_diff.data.sources:DatasetSpec`", "defined in sae_diff.data.documents"),
        ("raises training.data.TrainingDataError", "defined in sae_diff.training.errors"),
        (
            "the store's sae_diff.data.store.DEFAULT_ROWS_PER_SHARD",
            "defined in sae_diff.data.shards",
        ),
        ("sae_diff.data.cache.ActivationCache reads it", "defined in sae_diff.data.cache_reader"),
        ("sae_diff.data.no_such_module is gone", "sae_diff.data has no attribute 'no_such_module'"),
        ("sae_diff.data.documents.no_such_name", "has no attribute 'no_such_name'"),
        ("from sae_diff.data.sources import TokenSource, TokenBatch", "defined in"),
        ("the loop in sae_diff/training/no_such_file.py", "no such file"),
        ("the loop in report/no_such_file.py", "no such file"),
        ("the loop in no_such_file.py", "no file of that name"),
    ],
)
def test_a_planted_stale_reference_is_found(tmp_path: Path, text: str, expected: str) -> None:
    found = stale_references([_page(tmp_path, text)])
    assert len(found) == 1 and expected in found[0][3], found


@pytest.mark.parametrize(
    "text",
    [
        "``sae_diff.data.documents.DatasetSpec``, `sae_diff.pairing.masks.assistant_mask`",
        "``sae_diff.training.config.PairedRunnerConfig.context_size``",
        "sae_diff/data/documents.py, tests/test_moved_names.py and behaviours.py",
        "training.errors.ConfigError in data/documents.py; the data.x of it; report.get(key)",
        "from sae_diff.data.documents import DatasetSpec, iter_documents",
        "``sae_diff.data.PairedActivationsStore`` (a room's API), the sae_diff.activation_cache tag",
    ],
)
def test_current_references_pass(tmp_path: Path, text: str) -> None:
    assert stale_references([_page(tmp_path, text)]) == []


def test_python_prose_is_read_and_python_code_is_not(tmp_path: Path) -> None:
    module = tmp_path / "module.py"
    module.write_text(
        '"""Reads rows (see :class:`sae_diff.data.sources.TokenBatch`)."""\n\n'
        "from sae_diff.data.sources import TokenBatch  # a code import: not prose\n\n"
        "x = 1  # the old sae_diff.cli.DESCRIPTION\n"
    )
    found = [(line, ref) for _, line, ref, _ in stale_references([module])]
    assert found == [(1, "sae_diff.data.sources.TokenBatch"), (5, "sae_diff.cli.DESCRIPTION")]
