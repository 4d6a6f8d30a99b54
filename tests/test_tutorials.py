"""The tutorials run end to end, exactly as written, and are valid notebooks.

Percent-format tutorials are ordinary Python, so the suite executes each file as ``__main__``
(``runpy.run_path``, the same code path as ``python tutorials/NN_name.py``); each ends with a
``tutorial complete: ...`` line carrying a figure that is checked here. 01 and 03 use the
bundled organism, 04 a random tiny pair; 02 is a GPU recipe (Markdown, not executed).

Why in this process and not a subprocess each: a fresh interpreter spends ~5 s of CPU importing
torch, transformers, TransformerLens and SAELens before the first line of a tutorial runs (12 of
the 12.6 s of tutorial 04, about half of 01 and 03, by ``cProfile``); the test worker has them
imported already. What a subprocess isolated is reproduced here: a fresh ``__main__`` namespace
(a missing import in the tutorial still fails), the working directory and ``tempfile``'s folder
set to the test's ``tmp_path``, one torch thread (conftest.py), warnings ignored (``-W ignore``),
the torch RNG state restored afterwards so that later tests are unaffected.
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import signal
import tempfile
import threading
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
TIMEOUT_S = 300  # each tutorial takes well under a minute of CPU on an idle 2-core box


@contextlib.contextmanager
def time_limit(seconds: int, name: str) -> Iterator[None]:
    """Raise ``TimeoutError`` in the tutorial after ``seconds`` (what the subprocess's
    ``timeout=`` did), so that a hung tutorial fails its test instead of hanging the suite.
    SIGALRM exists only in the main thread on POSIX; elsewhere there is no limit."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"{name} ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_tutorial(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run ``tutorials/<name>`` as ``__main__`` in ``tmp_path``; return what it printed.

    A tutorial that raises fails the test with its traceback and the tail of its output.
    """
    for key, value in {
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TMPDIR": str(tmp_path),
        "MPLBACKEND": "Agg",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # mkdtemp() reads the cached folder
    monkeypatch.chdir(tmp_path)
    # ``python tutorials/x.py`` puts the script's folder first on sys.path
    monkeypatch.syspath_prepend(str(TUTORIALS))
    out = io.StringIO()
    rng = torch.get_rng_state()
    try:
        with (
            time_limit(TIMEOUT_S, name),
            contextlib.redirect_stdout(out),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            runpy.run_path(str(TUTORIALS / name), run_name="__main__")
    except (Exception, SystemExit) as e:  # a tutorial must not call sys.exit() either
        pytest.fail(
            f"{name} failed: {e!r}\n{''.join(traceback.format_exception(e))[-3000:]}\n"
            f"output:\n{out.getvalue()[-3000:]}",
            pytrace=False,
        )
    finally:
        torch.set_rng_state(rng)
    return out.getvalue()


def sentinel(stdout: str, name: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith(f"tutorial complete: {name}")]
    assert lines, f"no 'tutorial complete: {name}' line in the output:\n{stdout[-2000:]}"
    return lines[-1]


def figure(line: str, key: str) -> float:
    m = re.search(rf"{key}=(-?[0-9.]+)", line)
    assert m, f"{key}= not in {line!r}"
    return float(m.group(1))


def test_01_quickstart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    line = sentinel(run_tutorial("01_quickstart.py", tmp_path, monkeypatch), "01_quickstart")
    # some ft-leaning crosscoder latent tracks a planted behaviour well above chance
    assert figure(line, "best_auroc") > 0.75, line


def test_03_diff_sae_kl_dashboards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = run_tutorial("03_diff_sae_kl_dashboards.py", tmp_path, monkeypatch)
    line = sentinel(out, "03_diff_sae_kl_dashboards")
    assert figure(line, "kl_all") > 0.0, line
    # the diff-SAE reconstruction closes most of the stitched KL gap (METHODS.md §4)
    assert figure(line, "closed_reconstruction") > 0.5, line


def test_04_transformerlens_hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = run_tutorial("04_transformerlens_hooks.py", tmp_path, monkeypatch)
    assert "KL stitched" in out and "scale 2.0:" in out, out[-2000:]


@pytest.mark.parametrize(
    "path", sorted(TUTORIALS.glob("0*.py")) + sorted(TUTORIALS.glob("0*.md")), ids=lambda p: p.name
)
def test_tutorials_are_valid_notebooks(path: Path, tmp_path: Path) -> None:
    jupytext = pytest.importorskip("jupytext")
    nbformat = pytest.importorskip("nbformat")
    nb = jupytext.read(path)
    nbformat.validate(nb)
    kinds = {cell.cell_type for cell in nb.cells}
    assert "markdown" in kinds, f"{path.name}: no markdown cells"
    if path.suffix == ".py":
        assert "code" in kinds and nb.cells[0].cell_type == "markdown", (
            f"{path.name}: should open with a title cell"
        )
    out = tmp_path / f"{path.stem}.ipynb"
    jupytext.write(nb, out)
    nbformat.validate(nbformat.read(out, as_version=4))


def test_recipe_names_existing_configs() -> None:
    recipes = sorted(TUTORIALS.glob("02_*"))
    assert recipes, "tutorials/02_* (the Gemma-2-2B recipe) is missing"
    text = recipes[0].read_text()
    configs = set(re.findall(r"configs/[\w.-]+\.yaml", text))
    assert configs, "the recipe should use the shipped configs"
    for c in configs:
        assert (ROOT / c).is_file(), f"{recipes[0].name} names {c}, which does not exist"


def test_readme_lists_every_tutorial() -> None:
    readme = (TUTORIALS / "README.md").read_text()
    for p in TUTORIALS.glob("0*"):
        assert p.name in readme, f"tutorials/README.md does not mention {p.name}"
