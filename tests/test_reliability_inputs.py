"""Bad inputs a new user gives the ``sae-diff`` CLI and the readers: each gets ONE clear line
(what, why, the fix) on stderr and exit status 2, before any model is loaded where the input
allows it, and no file that existed before is lost or changed.

Every case has an id (``I01`` ...) listed in ``docs/reliability.md``; a test checks that the
document and these tables agree. Faults injected into caches and checkpoints are in
``test_reliability_faults.py``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sae_diff.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke_test_crosscoder.yaml"
#: a tiny smoke run: 2048 tokens of 16, 64 latents
TINY = [
    "--training_tokens",
    "2048",
    "--context_size",
    "16",
    "--d_sae",
    "64",
    "--n_eval_batches",
    "1",
    "--n_norm_batches",
    "2",
    "--train_batch_size_tokens",
    "256",
]


# ---------------------------------------------------------------------- helpers
def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_nothing_lost(before: dict[str, str], after: dict[str, str]) -> None:
    """Every file of ``before`` still exists with the same bytes (new files are allowed)."""
    lost = sorted(set(before) - set(after))
    changed = sorted(k for k in before if k in after and before[k] != after[k])
    assert not lost and not changed, f"lost {lost}, changed {changed}"


def error_line(err: str, command: str) -> str:
    """The CLI's error line: the last non-empty stderr line, which must start with
    ``sae-diff <command>: error:``; there must be no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "nothing on stderr"
    line = lines[-1]
    assert line.startswith(f"sae-diff {command}: error: "), line
    return line


@pytest.fixture
def no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any model is loaded (the error must come before)."""

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("a model was loaded before the bad input was reported")

    import sae_diff.training.data as data
    import sae_diff.training.runner as runner
    from sae_diff.pairing.model import PairedModel

    monkeypatch.setattr(data, "load_pair", boom)
    monkeypatch.setattr(runner, "load_pair", boom, raising=False)
    monkeypatch.setattr(data, "build_smoke_test_pair", boom)
    monkeypatch.setattr(PairedModel, "from_pretrained", classmethod(boom))


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------- shared artefacts
@pytest.fixture(scope="module")
def smoke_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished smoke-test cache at blocks.1.hook_resid_pre (harvested by the CLI)."""
    root = tmp_path_factory.mktemp("cache")
    assert (
        main(["harvest", "--config", str(SMOKE), "--cache-path", str(root / "cache"), *TINY]) == 0
    )
    return root / "cache"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny training run: ``ck/`` (checkpoint_path, one run id inside) and ``out/``."""
    root = tmp_path_factory.mktemp("run")
    rc = main(
        [
            "train",
            "--config",
            str(SMOKE),
            *TINY,
            "--n_checkpoints",
            "1",
            "--checkpoint_path",
            str(root / "ck"),
            "--output_path",
            str(root / "out"),
            "--eval_at_end",
            "false",
        ]
    )
    assert rc == 0
    return root


# ---------------------------------------------------------------------- the cases
@dataclass
class Case:
    """One bad input: ``setup(tmp)`` writes what it needs and returns the argv."""

    id: str
    title: str
    setup: Callable[[Path, dict[str, Path]], list[str]]
    expect: list[str]
    command: str = "train"
    before_models: bool = True
    needs: list[str] = field(default_factory=list)  # "cache", "run"


def _train(*extra: str) -> Callable[[Path, dict[str, Path]], list[str]]:
    return lambda tmp, art: ["train", "--config", str(SMOKE), *TINY, "--dry-run", *extra]


def _train_data(
    make: Callable[[Path], Path], *extra: str, dry: bool = True
) -> Callable[[Path, dict[str, Path]], list[str]]:
    def setup(tmp: Path, art: dict[str, Path]) -> list[str]:
        path = make(tmp)
        return [
            "train",
            "--config",
            str(SMOKE),
            *TINY,
            "--dataset_path",
            str(path),
            *extra,
            "--output_path",
            str(tmp / "out"),
            "--checkpoint_path",
            str(tmp / "ck"),
            *(["--dry-run"] if dry else []),
        ]

    return setup


def _yaml(text: str) -> Callable[[Path, dict[str, Path]], list[str]]:
    def setup(tmp: Path, art: dict[str, Path]) -> list[str]:
        (tmp / "bad.yaml").write_text(text)
        return ["train", "--config", str(tmp / "bad.yaml"), "--dry-run"]

    return setup


def _empty_saved(tmp: Path) -> Path:
    import datasets

    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp / "saved"))
    return tmp / "saved"


def _jsonl_folder(tmp: Path) -> Path:
    (tmp / "shards").mkdir()
    for i in range(3):
        write_jsonl(tmp / "shards" / f"part{i}.jsonl", [{"text": "hello world"}])
    return tmp / "shards"


def _copy_cache(tmp: Path, art: dict[str, Path]) -> Path:
    shutil.copytree(art["cache"], tmp / "cache")
    return tmp / "cache"


def _cache_train(*extra: str) -> Callable[[Path, dict[str, Path]], list[str]]:
    def setup(tmp: Path, art: dict[str, Path]) -> list[str]:
        cache = _copy_cache(tmp, art)
        return [
            "train",
            "--config",
            str(SMOKE),
            *TINY,
            "--cache_path",
            str(cache),
            *extra,
            "--output_path",
            str(tmp / "out"),
            "--checkpoint_path",
            str(tmp / "ck"),
        ]

    return setup


def _cache_harvest(*extra: str) -> Callable[[Path, dict[str, Path]], list[str]]:
    def setup(tmp: Path, art: dict[str, Path]) -> list[str]:
        cache = _copy_cache(tmp, art)
        return ["harvest", "--config", str(SMOKE), *TINY, "--cache-path", str(cache), *extra]

    return setup


def _resume(*extra: str, target: str = "ck") -> Callable[[Path, dict[str, Path]], list[str]]:
    def setup(tmp: Path, art: dict[str, Path]) -> list[str]:
        shutil.copytree(art["run"] / "ck", tmp / "ck")
        return [
            "train",
            "--resume",
            str(tmp / target),
            "--output_path",
            str(tmp / "out2"),
            *extra,
            "--dry-run",
        ]

    return setup


def _upload_meta_missing(tmp: Path, art: dict[str, Path]) -> list[str]:
    out = shutil.copytree(art["run"] / "out", tmp / "out")
    cfg = json.loads((out / "cfg.json").read_text())
    cfg["metadata"]["base_model_name"] = None
    (out / "cfg.json").write_text(json.dumps(cfg))
    return ["upload", str(out), "--repo-id", "me/x"]


def _not_a_file(tmp: Path) -> Path:
    (tmp / "cache_is_a_file").write_text("not a folder")
    return tmp / "cache_is_a_file"


CASES: list[Case] = [
    # --- the config file and flags
    Case(
        "I01",
        "config file does not exist",
        lambda t, a: ["train", "--config", str(t / "nope.yaml")],
        ["nope.yaml does not exist"],
    ),
    Case(
        "I02",
        "config file is a YAML list, not a mapping",
        _yaml("- a\n- b\n"),
        ["must hold a mapping"],
    ),
    Case(
        "I03",
        "config file is not valid YAML",
        _yaml("sae: [unclosed\n"),
        ["cannot parse", "bad.yaml"],
    ),
    Case(
        "I04",
        "typo in a config field (trainig_tokens)",
        _yaml(SMOKE.read_text().replace("training_tokens:", "trainig_tokens:")),
        ["trainig_tokens", "did you mean training_tokens"],
    ),
    Case(
        "I05",
        "typo in a flag (--trainig_tokens)",
        _train("--trainig_tokens", "5"),
        ["did you mean --training_tokens"],
    ),
    Case(
        "I06",
        "typo in the architecture (batchtopk_crossocder)",
        _train("--architecture", "batchtopk_crossocder"),
        ["Unknown architecture 'batchtopk_crossocder'", "did you mean batchtopk_crosscoder"],
    ),
    Case(
        "I07",
        "typo in an sae field (d_sea)",
        _yaml(SMOKE.read_text().replace("  d_sae: 256", "  d_sea: 256")),
        ["d_sea", "did you mean"],
    ),
    Case("I08", "k = 0", _train("--k", "0"), ["0 < k <= d_sae"]),
    Case("I09", "k > d_sae", _train("--k", "300", "--d_sae", "256"), ["0 < k <= d_sae"]),
    Case(
        "I10",
        "d_in disagrees with the hook's width",
        _train("--d_in", "2000"),
        ["does not match hook"],
    ),
    Case(
        "I11",
        "store_mode diff for a crosscoder",
        _train("--store_mode", "diff"),
        ["is a crosscoder"],
    ),
    Case(
        "I12",
        "training_tokens smaller than one batch",
        _train("--training_tokens", "100"),
        ["must be at least one batch"],
    ),
    Case("I13", "train without --config", lambda t, a: ["train"], ["give --config FILE"]),
    Case(
        "I14",
        "harvest config without cache_path",
        lambda t, a: ["harvest", "--config", str(SMOKE)],
        ["has no cache_path"],
        command="harvest",
    ),
    Case(
        "I15",
        "unknown organism",
        lambda t, a: [
            "train",
            "--config",
            str(ROOT / "configs" / "organism_batchtopk_crosscoder.yaml"),
            "--organism",
            "no_such_organism",
            "--dry-run",
        ],
        ["no_such_organism", "not a bundled organism"],
    ),
    # --- datasets
    Case(
        "I16",
        "empty .jsonl file",
        _train_data(lambda t: write_jsonl(t / "e.jsonl", [])),
        ["is empty"],
    ),
    Case(
        "I17",
        ".jsonl file of blank lines",
        _train_data(lambda t: (t / "b.jsonl").write_text("\n\n  \n") and t / "b.jsonl"),
        ["is empty"],
    ),
    Case(
        "I18",
        "empty saved dataset (save_to_disk of 0 rows)",
        _train_data(_empty_saved),
        ["has no rows"],
    ),
    Case(
        "I19",
        "every text is empty",
        _train_data(lambda t: write_jsonl(t / "x.jsonl", [{"text": ""}] * 3)),
        ["all 3 texts", "are empty"],
    ),
    Case(
        "I20",
        "a folder of .jsonl files",
        _train_data(_jsonl_folder),
        ["folder of data files", "dataset_mixture"],
    ),
    Case(
        "I21",
        "an empty folder as dataset",
        _train_data(lambda t: (t / "emptydir").mkdir() or t / "emptydir"),
        ["empty folder"],
    ),
    Case(
        "I22",
        ".jsonl that is not JSON",
        _train_data(lambda t: (t / "n.jsonl").write_text("not json\n") and t / "n.jsonl"),
        ["cannot be read"],
    ),
    Case(
        "I23",
        "dataset_column that the file lacks",
        _train_data(
            lambda t: write_jsonl(t / "c.jsonl", [{"text": "hi there"}] * 4),
            "--dataset_column",
            "body",
            dry=False,
        ),
        ["no column 'body'"],
    ),
    Case(
        "I24",
        "dataset file that does not exist (absolute path)",
        _train_data(lambda t: t / "missing.jsonl", dry=False),
        ["missing.jsonl"],
    ),
    Case(
        "I25",
        "dataset in a mixture that is empty",
        lambda t, a: ["train", "--config", str(_mixture_yaml(t)), "--dry-run"],
        ["is empty"],
    ),
    # --- caches
    Case(
        "I26",
        "cache harvested at another hook",
        _cache_train("--hook_name", "blocks.0.hook_resid_pre"),
        ["hook_name: cache has 'blocks.1.hook_resid_pre'", "says 'blocks.0.hook_resid_pre'"],
        needs=["cache"],
    ),
    Case(
        "I27",
        "cache of another setup: every mismatch in one message",
        _cache_train(
            "--hook_name", "blocks.0.hook_resid_pre", "--dtype", "bfloat16", "--mask_high_norm", "5"
        ),
        ["3 differences", "hook_name", "dtype", "high_norm_ratio"],
        needs=["cache"],
    ),
    Case(
        "I28",
        "cache of other models",
        _cache_train("--base_model_name", "other-base", "--model_name", "other-ft"),
        ["base_model: cache has 'smoke-base'", "ft_model: cache has 'smoke-ft'"],
        needs=["cache"],
    ),
    Case(
        "I29",
        "cache of another context size",
        _cache_train("--context_size", "8"),
        ["context_size: cache has 16"],
        needs=["cache"],
    ),
    Case(
        "I30",
        "harvest appending to a cache of another hook",
        _cache_harvest("--hook_name", "blocks.0.hook_resid_pre"),
        ["hook_name: cache has"],
        command="harvest",
        needs=["cache"],
    ),
    Case(
        "I31",
        "cache_path is a file",
        lambda t, a: ["train", "--config", str(SMOKE), *TINY, "--cache_path", str(_not_a_file(t))],
        ["is a file, not a cache folder"],
    ),
    Case(
        "I49",
        "a cache dtype a cache cannot store (float64)",
        lambda t, a: [
            "harvest",
            "--config",
            str(SMOKE),
            *TINY,
            "--dtype",
            "float64",
            "--cache-path",
            str(t / "c"),
        ],
        ["unsupported cache dtype 'float64'", "Set cache_dtype"],
        command="harvest",
    ),
    # --- resuming
    Case(
        "I32",
        "--resume of a folder that does not exist",
        lambda t, a: ["train", "--resume", str(t / "none")],
        ["No checkpoint at", "does not exist"],
    ),
    Case(
        "I33",
        "--resume of an empty folder",
        lambda t, a: (t / "empty").mkdir() or ["train", "--resume", str(t / "empty")],
        ["No checkpoint in"],
    ),
    Case(
        "I34",
        "--resume with another hook",
        _resume("--hook_name", "blocks.0.hook_resid_pre"),
        ["Cannot resume", "hook_name: checkpoint 'blocks.1.hook_resid_pre'"],
        needs=["run"],
    ),
    Case(
        "I35",
        "--resume changing the dictionary: every difference listed",
        _resume("--d_sae", "128", "--k", "4"),
        ["2 differences", "sae.d_sae", "sae.k"],
        needs=["run"],
    ),
    # --- upload
    Case(
        "I36",
        "upload --metadata without =",
        lambda t, a: ["upload", str(t), "--repo-id", "me/x", "--metadata", "oops"],
        ["expects KEY=VALUE"],
        command="upload",
    ),
    Case(
        "I37",
        "upload of a folder that is not a dictionary",
        lambda t, a: ["upload", str(t), "--repo-id", "me/x"],
        ["is not a saved dictionary"],
        command="upload",
    ),
    Case(
        "I38",
        "upload with fewer --sae-id than folders",
        lambda t, a: ["upload", str(t), str(t), "--repo-id", "me/x", "--sae-id", "a"],
        ["one --sae-id per folder"],
        command="upload",
    ),
    Case(
        "I39",
        "upload of a dictionary without the pair's metadata",
        _upload_meta_missing,
        ["lacks ['base_model_name']", "--metadata KEY=VALUE"],
        command="upload",
        needs=["run"],
    ),
]


def _mixture_yaml(tmp: Path) -> Path:
    good = write_jsonl(tmp / "good.jsonl", [{"text": "some words"}] * 4)
    empty = write_jsonl(tmp / "empty.jsonl", [])
    text = SMOKE.read_text() + (
        f"dataset_mixture:\n  - {{path: {good}, weight: 1}}\n  - {{path: {empty}, weight: 1}}\n"
    )
    (tmp / "mix.yaml").write_text(text)
    return tmp / "mix.yaml"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line(
    case: Case,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    art = {"cache": request.getfixturevalue("smoke_cache")} if "cache" in case.needs else {}
    if "run" in case.needs:
        art["run"] = request.getfixturevalue("smoke_run")
    argv = case.setup(tmp_path, art)
    before = snapshot(tmp_path)
    if case.before_models:
        request.getfixturevalue("no_models")
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    line = error_line(err, case.command)
    for text in case.expect:
        assert text in line, f"{text!r} not in {line!r}"
    assert_nothing_lost(before, snapshot(tmp_path))


# ---------------------------------------------------------------------- not errors: what now works
def test_resume_accepts_checkpoint_path_and_run_folder(
    smoke_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """I40: ``--resume <checkpoint_path>`` (the configured folder, run ids inside) finds the
    latest run's newest checkpoint, as a run folder and a checkpoint do."""
    from sae_diff.training.runner import find_checkpoint

    ck = smoke_run / "ck"
    (run,) = [p for p in ck.iterdir() if p.is_dir()]
    newest = find_checkpoint(run)
    assert find_checkpoint(ck) == newest == find_checkpoint(newest)
    assert main(["train", "--resume", str(ck), "--dry-run"]) == 0
    assert f"Would resume from {newest}" in capsys.readouterr().out


def test_help_example_for_resume_names_checkpoint_path(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "--resume checkpoints/my_run" in out and "checkpoint_path" in out


def test_expected_identity_from_a_config_loads_nothing(no_models: None) -> None:
    """The identity a config expects of its cache: storage dtype is cache_dtype when set."""
    from sae_diff.data.cache import expected_identity
    from sae_diff.training.config import parse_config

    cfg = parse_config(
        SMOKE, ["--cache_dtype", "float16", "--hook_name", "blocks.0.hook_resid_post"]
    )
    exp = expected_identity(cfg)
    assert (exp["dtype"], exp["hook_name"], exp["d_model"], exp["context_size"]) == (
        "float16",
        "blocks.0.hook_resid_post",
        32,
        32,
    )
    assert exp["base_model"] == "smoke-base" and exp["ft_model"] == "smoke-ft"
    assert (
        exp["datasets"] == [{"tensor": "smoke-test random tokens"}]
        and exp["tokenizer_hash"] is None
    )


def test_traceback_flag_prints_the_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["--traceback", "train", "--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert (
        "Traceback" in err
        and "ConfigError" in err
        and err.strip().splitlines()[-1].startswith("sae-diff train: error:")
    )


def test_every_library_error_class_is_a_saediff_error() -> None:
    """The hierarchy: each deliberate error class subclasses SaeDiffError and keeps its old base."""
    from sae_diff.data.cache import CacheError, CacheIdentityError
    from sae_diff.errors import CheckpointError, SaeDiffError
    from sae_diff.evaluation.stitching import LayerError
    from sae_diff.hub import HubError
    from sae_diff.interop.errors import (
        InteropError,
        InteropFileNotFoundError,
        MissingKeysError,
        ShapeMismatchError,
        UnknownDictClassError,
        UnsupportedDictionaryError,
    )
    from sae_diff.organisms.storage import OrganismIntegrityError
    from sae_diff.pairing.errors import HookNameError, PairingError
    from sae_diff.training.config import ConfigError
    from sae_diff.training.data import TrainingDataError

    old_bases = {
        ConfigError: ValueError,
        TrainingDataError: RuntimeError,
        CacheError: RuntimeError,
        CacheIdentityError: RuntimeError,
        PairingError: ValueError,
        HookNameError: KeyError,
        InteropError: ValueError,
        InteropFileNotFoundError: FileNotFoundError,
        MissingKeysError: ValueError,
        ShapeMismatchError: ValueError,
        UnknownDictClassError: ValueError,
        UnsupportedDictionaryError: NotImplementedError,
        HubError: ValueError,
        LayerError: ValueError,
        OrganismIntegrityError: RuntimeError,
        CheckpointError: FileNotFoundError,
    }
    for cls, base in old_bases.items():
        assert issubclass(cls, SaeDiffError) and issubclass(cls, base), cls
    # and nothing in the package defines an error class outside the hierarchy
    pattern = re.compile(r"^class (\w+(?:Error|Exception))\((.*)\):", re.M)
    for path in (ROOT / "sae_diff").rglob("*.py"):
        for name, bases in pattern.findall(path.read_text()):
            if path.name == "errors.py" and name == "SaeDiffError":
                continue
            assert "SaeDiffError" in bases or any(
                b.strip() in {c.__name__ for c in old_bases} for b in bases.split(",")
            ), f"{path.name}: {name}({bases}) is outside the SaeDiffError hierarchy"


def test_library_error_from_a_delegated_command_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``sae-diff organism`` / ``demo`` errors flow through the same path (exit 2, one line)."""
    import sys
    import types

    from sae_diff.pairing.errors import PairingError

    fake = types.ModuleType("sae_diff.report.demo")

    def failing(argv: list[str]) -> int:
        raise PairingError("the tokenizers differ at id 5; load both models from one family")

    fake.main = failing  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sae_diff.report.demo", fake)
    assert main(["demo"]) == 2
    line = error_line(capsys.readouterr().err, "demo")
    assert "tokenizers differ" in line


def test_cases_are_documented() -> None:
    """docs/reliability.md lists exactly the cases of both reliability test files."""
    from test_reliability_faults import FAULT_IDS

    doc = (ROOT / "docs" / "reliability.md").read_text()
    documented = set(re.findall(r"^\| (I\d\d|F\d\d) \|", doc, re.M))
    interop = set(
        re.findall(r"\b(I4[1-9])\b", (ROOT / "tests" / "test_interop_errors.py").read_text())
    )
    ids = {c.id for c in CASES} | {"I40"} | interop | set(FAULT_IDS)
    assert documented == ids, (
        f"undocumented {sorted(ids - documented)}, stale {sorted(documented - ids)}"
    )
    assert len({c.id for c in CASES} | {"I40"} | interop) >= 40 and len(FAULT_IDS) >= 15
