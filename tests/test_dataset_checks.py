"""Bad local datasets fail with the CLI's clear message through the Python API too, before any
model loads (they used to surface as a bare ``StopIteration`` from ``datasets`` or as a later
"no held-out activations")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sae_diff.training.config import config_from_dict
from sae_diff.training.errors import TrainingDataError
from sae_diff.training.runner import PairedSAETrainingRunner


@pytest.fixture
def no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("a model was loaded before the bad dataset was reported")

    import sae_diff.training.data as data
    import sae_diff.training.runner as runner
    from sae_diff.pairing.model import PairedModel

    monkeypatch.setattr(data, "load_pair", boom)
    monkeypatch.setattr(runner, "load_pair", boom)
    monkeypatch.setattr(PairedModel, "from_pretrained", classmethod(boom))


def _config(tmp_path: Path, dataset: Path) -> Any:
    return config_from_dict(
        {
            "model_name": str(tmp_path / "ft"),
            "base_model_name": str(tmp_path / "base"),
            "hook_name": "blocks.0.hook_resid_post",
            "dataset_path": str(dataset),
            "context_size": 16,
            "training_tokens": 2048,
            "train_batch_size_tokens": 256,
            "checkpoint_path": str(tmp_path / "ck"),
            "sae": {"architecture": "batchtopk_crosscoder", "d_in": 16, "d_sae": 32, "k": 2},
        }
    )


def _empty_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    return path


def _folder_of_files(tmp_path: Path) -> Path:
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "hello world"}\n')
    return folder


def _empty_texts(tmp_path: Path) -> Path:
    path = tmp_path / "blank.jsonl"
    path.write_text('{"text": ""}\n{"text": "   "}\n')
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (_empty_file, r"dataset file '.*empty\.jsonl' is empty \(no rows\)"),
        (_folder_of_files, r"is a folder of data files \(a\.jsonl\), not a saved dataset"),
        (_empty_texts, r"all 2 texts in column 'text' are empty"),
    ],
)
def test_runner_reports_a_bad_local_dataset_before_loading_models(
    tmp_path: Path, no_models: None, make: Any, message: str
) -> None:
    cfg = _config(tmp_path, make(tmp_path))
    with pytest.raises(TrainingDataError, match=message):
        PairedSAETrainingRunner(cfg).run()
    assert not (tmp_path / "ck").exists()  # nothing written either


def test_unreachable_hub_dataset_names_the_fix(
    tmp_path: Path, no_models: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = _config(tmp_path, Path("someorg/not-downloaded-dataset"))
    with pytest.raises(TrainingDataError, match=r"cannot be reached .*Download it while online"):
        PairedSAETrainingRunner(cfg).run()
