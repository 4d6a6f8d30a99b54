"""Interop: bad sources get an ``InteropError`` naming the file (never a network retry loop
for a local path), and the two trainer-side layouts load without ``weights_file=``.

Ids I41-I48 are listed in docs/reliability.md.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from interop_fixtures import (
    dl_crosscoder_config,
    dl_crosscoder_state,
    ref_replication,
    replication_state,
    sample_inputs,
    write_dl,
)
from test_interop import D, L, N, _check_crosscoder, _close

import sae_diff  # noqa: F401  (registers the architectures)
from sae_diff import interop
from sae_diff.errors import SaeDiffError


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if anything tries the Hub (a local path must never be treated as a repo id)."""
    import huggingface_hub

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("the Hub was contacted for a local path")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", boom)


@pytest.mark.parametrize(
    "make",
    [
        lambda t: str(
            t / "does" / "not" / "exist"
        ),  # absolute: "/" was stripped before is_absolute()
        lambda t: str(t / "missing_dir") + "/",
        lambda t: "./no/such/folder",
        lambda t: "owner/repo/model.safetensors",  # a file name, not a repo id
    ],
    ids=["I41-absolute", "I41-trailing-slash", "I42-relative", "I42-filename"],
)
def test_missing_local_path_is_not_a_hub_repo(make: Any, tmp_path: Path, no_network: None) -> None:
    """I41-I42: a path that does not exist gets one clear error, not five network retries."""
    source = make(tmp_path)
    with pytest.raises(
        interop.InteropFileNotFoundError, match="neither an existing local path"
    ) as e:
        interop.load(source)
    assert isinstance(e.value, SaeDiffError) and isinstance(e.value, FileNotFoundError)


def test_truncated_safetensors_names_the_file(tmp_path: Path, no_network: None) -> None:
    """I43: a truncated model.safetensors raises InteropError naming the file (not a bare
    SafetensorError)."""
    folder = write_dl(
        tmp_path / "cc",
        dl_crosscoder_state(L, D, N, batch_topk=False),
        dl_crosscoder_config(L, D, N, batch_topk=False),
    )
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    with pytest.raises(
        interop.InteropError, match=r"model\.safetensors as safetensors .*truncated or corrupt"
    ):
        interop.load(folder)


def test_config_that_is_not_json_is_named(tmp_path: Path) -> None:
    """I44: config.json that is not JSON."""
    folder = write_dl(tmp_path / "cc", dl_crosscoder_state(L, D, N, batch_topk=False), None)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(interop.InteropError, match=r"config\.json is not valid JSON"):
        interop.load(folder)


def test_pickled_payload_in_a_pt_checkpoint_never_runs(tmp_path: Path) -> None:
    """I45: a .pt whose pickle would run a command: refused (weights_only=True), never run."""
    import subprocess
    import sys

    marker = tmp_path / "PWNED"
    code = textwrap.dedent("""
        import os, sys, torch
        class Boom:
            def __reduce__(self):
                return (os.system, ("touch " + sys.argv[2],))
        torch.save({"encoder.weight": torch.zeros(2, 3, 4), "x": Boom()}, sys.argv[1])
    """)
    (tmp_path / "evil").mkdir()
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "evil" / "model.pt"), str(marker)], check=True
    )
    with pytest.raises(interop.InteropError, match="weights_only=True"):
        interop.load(tmp_path / "evil")
    assert not marker.exists()


def test_crosscoder_learning_trainer_folder_loads_without_weights_file(tmp_path: Path) -> None:
    """I46: trainSAE's output folder (config.json with a trainer section, model_final.pt and
    checkpoint_<step>.pt files) loads the final model; without model_final.pt, the newest
    checkpoint."""
    final = dl_crosscoder_state(L, D, N, batch_topk=False, seed=1)
    folder = tmp_path / "run"
    write_dl(
        folder,
        final,
        {"trainer": dl_crosscoder_config(L, D, N, batch_topk=False), "buffer": {}},
        weights="model_final.pt",
    )
    for step, seed in ((100, 2), (200, 3)):
        torch.save(
            dl_crosscoder_state(L, D, N, batch_topk=False, seed=seed),
            folder / f"checkpoint_{step}.pt",
        )
    x = sample_inputs((32, L, D))
    _check_crosscoder(
        interop.load(folder, dtype="float64"), final, x, batch_topk=False, code="CROSSCODER"
    )
    (folder / "model_final.pt").unlink()
    newest = dl_crosscoder_state(L, D, N, batch_topk=False, seed=3)
    _check_crosscoder(
        interop.load(folder, dtype="float64"), newest, x, batch_topk=False, code="CROSSCODER"
    )


def test_replication_save_layout_is_detected(tmp_path: Path) -> None:
    """I47: the replication's own save() (<v>.pt + <v>_cfg.json) is read as the replication
    format (newest version by default, or the one weights_file names), not dictionary_learning."""
    folder = tmp_path / "version_0"
    folder.mkdir()
    states = {v: replication_state(D, N, seed=v) for v in (0, 1)}
    for v, sd in states.items():
        torch.save(sd, folder / f"{v}.pt")
        (folder / f"{v}_cfg.json").write_text(
            json.dumps({"d_in": D, "dict_size": N, "hook_point": f"blocks.{v}.hook_resid_pre"})
        )
    c = [0.5, 2.0]
    x = sample_inputs((16, 2, D))
    for weights_file, v in ((None, 1), ("0.pt", 0)):
        sae = interop.load(folder, weights_file=weights_file, norm_factors=c, dtype="float64")
        assert sae.cfg.metadata.hook_name == f"blocks.{v}.hook_resid_pre"
        f_ref, _ = ref_replication(states[v], x * torch.tensor(c, dtype=torch.float64)[:, None])
        with torch.no_grad():
            _close(sae.encode(x), f_ref)


def test_folder_without_any_checkpoint_is_named(tmp_path: Path) -> None:
    """I48: an existing folder with no checkpoint files."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(interop.InteropError, match="found none of config.json"):
        interop.load(tmp_path / "empty")
