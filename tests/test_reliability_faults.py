"""Faults injected into caches, harvests, training runs and checkpoints: each is survived
(the data are recovered or the run resumes) or refused with a message naming the file and
the fix, and no file that was committed before the fault is lost or changed.

Case ids (``F01`` ...) are listed in ``docs/reliability.md``. Bad inputs are in
``test_reliability_inputs.py`` (whose helpers this file reuses).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers_models import random_tokens
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from test_reliability_inputs import (  # noqa: F401  (smoke_cache, smoke_run: shared fixtures)
    SMOKE,
    TINY,
    assert_nothing_lost,
    error_line,
    smoke_cache,
    smoke_run,
    snapshot,
)

from sae_diff.cli import main
from sae_diff.data.cache import (
    MANIFEST,
    ActivationCache,
    ActivationCacheWriter,
    CacheError,
    CacheIdentityError,
    rebuild_manifest,
)
from sae_diff.data.harvest import harvest_cache
from sae_diff.data.sources import TensorTokenSource
from sae_diff.pairing.model import PairedModel

HOOK = "blocks.1.hook_resid_pre"
FAULT_IDS = [f"F{i:02d}" for i in range(1, 22)]


TINY_PAIR = {
    "n_layers": 2,
    "base_name": "tiny-base",
    "ft_name": "tiny-ft",
}  # the `pair` fixture of conftest.py


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return random_tokens(21, 10, seed=3)


def _harvest(pair: PairedModel, tokens: torch.Tensor, out: Path, **kw: Any) -> Any:
    kw.setdefault("rows_per_shard", 4)
    kw.setdefault("batch_size", 2)
    return harvest_cache(
        pair, TensorTokenSource(tokens), out, HOOK, progress=False, verbose=False, **kw
    )


@pytest.fixture(scope="module")
def reference(
    pair: PairedModel, tokens: torch.Tensor, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """An uninterrupted harvest (6 shards) every fault's outcome is compared with."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    _harvest(pair, tokens, out)
    return out


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard_*.safetensors"))}


def _same_cache(a: Path, b: Path) -> None:
    """Byte-identical shards and identical manifests (statistics included)."""
    assert _shards(a) == _shards(b)
    ma, mb = (json.loads((x / MANIFEST).read_text()) for x in (a, b))
    for m in (ma, mb):
        m.pop("rebuilt_from_shards", None)
    assert ma == mb


# ---------------------------------------------------------------------- lost / corrupt manifest
def test_F01_lost_manifest_is_rebuilt_exactly(
    reference: Path, pair: PairedModel, tokens: torch.Tensor, tmp_path: Path
) -> None:
    """F01: manifest.json deleted: harvesting again rebuilds it from the self-describing shards
    (identical statistics and checksums) and deletes nothing."""
    cache = shutil.copytree(reference, tmp_path / "c")
    (cache / MANIFEST).unlink()
    before = snapshot(cache)
    with pytest.raises(CacheError, match="holds shards but no manifest.json"):
        ActivationCache(cache)
    s = _harvest(pair, tokens, cache)
    assert s.resumed_from_rows == 21  # nothing re-harvested
    assert_nothing_lost(before, snapshot(cache))
    _same_cache(cache, reference)
    ActivationCache(cache).verify()


def test_F02_lost_manifest_then_train_keeps_every_shard(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """F02: manifest deleted, then `sae-diff train` on the cache: the manifest is rebuilt, the
    run trains, and the shards are untouched (the issue's data-loss case)."""
    cache = shutil.copytree(request.getfixturevalue("smoke_cache"), tmp_path / "cache")
    manifest = json.loads((cache / MANIFEST).read_text())
    (cache / MANIFEST).unlink()
    before = snapshot(cache)
    rc = main(
        [
            "train",
            "--config",
            str(SMOKE),
            *TINY,
            "--cache_path",
            str(cache),
            "--eval_at_end",
            "false",
            "--output_path",
            str(tmp_path / "out"),
            "--checkpoint_path",
            str(tmp_path / "ck"),
        ]
    )
    assert rc == 0
    assert_nothing_lost(before, snapshot(cache))
    rebuilt = json.loads((cache / MANIFEST).read_text())
    assert rebuilt["shards"] == manifest["shards"] and rebuilt["stats"] == manifest["stats"]


def test_F03_lost_manifest_and_another_hook_is_refused(
    tmp_path: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    """F03: manifest deleted and the config names another hook: refused before anything runs
    (the shards still say what they hold), nothing deleted."""
    cache = shutil.copytree(request.getfixturevalue("smoke_cache"), tmp_path / "cache")
    (cache / MANIFEST).unlink()
    before = snapshot(tmp_path)
    for cmd in (
        ["train", "--config", str(SMOKE), *TINY, "--cache_path", str(cache)],
        ["harvest", "--config", str(SMOKE), *TINY, "--cache-path", str(cache)],
    ):
        assert main([*cmd, "--hook_name", "blocks.0.hook_resid_pre"]) == 2
        line = error_line(capsys.readouterr().err, cmd[0])
        assert "hook_name: cache has 'blocks.1.hook_resid_pre'" in line
    assert_nothing_lost(before, snapshot(tmp_path))
    assert not (cache / MANIFEST).exists()


def test_F04_lost_manifest_with_old_shards_is_refused(
    reference: Path, pair: PairedModel, tokens: torch.Tensor, tmp_path: Path
) -> None:
    """F04: manifest deleted and the shards carry no self-description (older sae_diff):
    refused with the fix, nothing deleted."""
    cache = shutil.copytree(reference, tmp_path / "c")
    (cache / MANIFEST).unlink()
    for p in cache.glob("shard_*.safetensors"):
        p.write_bytes(
            st_save(st_load(p.read_bytes()), metadata={"format": "sae_diff.activation_cache/1"})
        )
    before = snapshot(cache)
    with pytest.raises(CacheError, match="carries no self-description.*--overwrite"):
        _harvest(pair, tokens, cache)
    assert_nothing_lost(before, snapshot(cache))


def test_F05_corrupt_manifest_is_named_and_recoverable(
    reference: Path, pair: PairedModel, tokens: torch.Tensor, tmp_path: Path
) -> None:
    """F05: manifest.json truncated: reading names it and the fix; moving it aside rebuilds."""
    cache = shutil.copytree(reference, tmp_path / "c")
    text = (cache / MANIFEST).read_text()
    (cache / MANIFEST).write_text(text[: len(text) // 2])
    before = snapshot(cache)
    with pytest.raises(CacheError, match="manifest is corrupt.*rebuild"):
        ActivationCache(cache)
    with pytest.raises(CacheError, match="manifest is corrupt"):
        _harvest(pair, tokens, cache)
    assert_nothing_lost(before, snapshot(cache))
    (cache / MANIFEST).rename(tmp_path / "manifest.broken")
    rebuild_manifest(cache)
    _same_cache(cache, reference)


# ---------------------------------------------------------------------- interrupted writes
def test_F06_crash_between_shard_and_manifest_adopts_the_shard(
    reference: Path,
    pair: PairedModel,
    tokens: torch.Tensor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """F06: the harvest dies after renaming shard 2 but before listing it in the manifest: the
    next harvest adopts the shard (it describes itself) and ends byte-identical."""
    real = ActivationCacheWriter._write_manifest

    def dying(self: ActivationCacheWriter, stats: Any = None) -> None:
        if len(self.shards) == 3:
            raise OSError("power cut")
        real(self, stats)

    monkeypatch.setattr(ActivationCacheWriter, "_write_manifest", dying)
    cache = tmp_path / "c"
    with pytest.raises(OSError, match="power cut"):
        _harvest(pair, tokens, cache)
    monkeypatch.setattr(ActivationCacheWriter, "_write_manifest", real)
    assert (
        len(json.loads((cache / MANIFEST).read_text())["shards"]) == 2
        and (cache / "shard_00002.safetensors").exists()
    )
    before = snapshot(cache)
    s = _harvest(pair, tokens, cache)
    assert s.resumed_from_rows == 12  # shard 2 adopted, not re-harvested
    assert_nothing_lost({k: v for k, v in before.items() if k != MANIFEST}, snapshot(cache))
    _same_cache(cache, reference)


def test_F07_foreign_unlisted_shard_is_refused_not_deleted(
    reference: Path, pair: PairedModel, tokens: torch.Tensor, tmp_path: Path
) -> None:
    """F07: a shard that the manifest does not list and that does not continue the cache (here
    shard 0 copied in as shard 6) is refused by name and left alone."""
    cache = shutil.copytree(reference, tmp_path / "c")
    m = json.loads((cache / MANIFEST).read_text())
    m["shards"], m["complete"] = m["shards"][:5], False
    (cache / MANIFEST).write_text(json.dumps(m))
    shutil.copy(cache / "shard_00000.safetensors", cache / "shard_00005.safetensors")
    before = snapshot(cache)
    with pytest.raises(
        CacheError, match="shard_00005.safetensors is not listed.*Nothing was deleted"
    ):
        _harvest(pair, tokens, cache)
    assert_nothing_lost(before, snapshot(cache))


def test_F08_temp_files_of_an_interrupted_write_are_cleared(
    reference: Path, pair: PairedModel, tokens: torch.Tensor, tmp_path: Path
) -> None:
    """F08: half-written ``*.tmp`` files (killed mid-write) are dropped; committed shards stay."""
    cache = shutil.copytree(reference, tmp_path / "c")
    (cache / "shard_00006.safetensors.tmp").write_bytes(b"\0" * 100)
    (cache / "manifest.json.tmp").write_text("{")
    before = {k: v for k, v in snapshot(cache).items() if not k.endswith(".tmp")}
    _harvest(pair, tokens, cache)
    assert not list(cache.glob("*.tmp"))
    assert_nothing_lost(before, snapshot(cache))


def test_F09_disk_error_while_writing_keeps_committed_shards(
    reference: Path,
    pair: PairedModel,
    tokens: torch.Tensor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """F09: the disk fails while writing shard 3: a CacheError names the file and the fix, the
    three committed shards stay valid, and a rerun resumes to the identical cache."""
    import sae_diff.data.cache as cache_mod

    real = cache_mod._atomic_write

    def full(path: Path, data: bytes) -> None:
        if path.name == "shard_00003.safetensors":
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(cache_mod, "_atomic_write", full)
    cache = tmp_path / "c"
    with pytest.raises(
        CacheError, match="shard_00003.safetensors failed.*keeps its 3 committed shards"
    ):
        _harvest(pair, tokens, cache)
    monkeypatch.setattr(cache_mod, "_atomic_write", real)
    before = snapshot(cache)
    ActivationCache(cache, allow_incomplete=True).verify()
    _harvest(pair, tokens, cache)
    assert_nothing_lost({k: v for k, v in before.items() if k != MANIFEST}, snapshot(cache))
    _same_cache(cache, reference)


# ---------------------------------------------------------------------- damaged shards
def _damage(cache: Path, how: str) -> Path:
    p = cache / "shard_00001.safetensors"
    data = p.read_bytes()
    if how == "truncate":
        p.write_bytes(data[: len(data) - 17])
    elif how == "flip":
        b = bytearray(data)
        b[-5] ^= 0xFF
        p.write_bytes(bytes(b))
    elif how == "delete":
        p.unlink()
    return p


@pytest.mark.parametrize(
    ("fid", "how", "match"),
    [
        ("F10", "truncate", "shard_00001.safetensors has .* bytes but the manifest says"),
        ("F11", "flip", "shard_00001.safetensors fails its sha256 checksum"),
        ("F12", "delete", "shard_00001.safetensors is missing"),
    ],
)
def test_damaged_shard_is_named(
    fid: str, how: str, match: str, reference: Path, tmp_path: Path
) -> None:
    """F10-F12: a truncated, bit-flipped or missing shard is named when the cache is opened or
    verified; nothing else is touched."""
    cache = shutil.copytree(reference, tmp_path / "c")
    _damage(cache, how)
    before = snapshot(cache)
    with pytest.raises(CacheError, match=match):
        ActivationCache(cache).verify()
    assert_nothing_lost(before, snapshot(cache))


@pytest.mark.parametrize(
    ("fid", "edit", "match"),
    [
        (
            "F13",
            lambda t: {**t, "acts": t["acts"][:, :, :1].contiguous()},
            r"acts has shape \(4, 10, 1, \d+\), expected \(4, seq, 2, \d+\)",
        ),
        (
            "F14",
            lambda t: {k: v for k, v in t.items() if k != "tokens"},
            r"lacks tensors \['tokens'\]",
        ),
    ],
)
def test_malformed_shard_with_valid_checksum_is_named(
    fid: str, edit: Any, match: str, reference: Path, tmp_path: Path
) -> None:
    """F13-F14: a well-formed safetensors file whose manifest entry (size, sha256) was updated to
    match, but which holds only the base model (or no tokens), is rejected by the reader
    naming the shard, before any ``torch.cat`` downstream."""
    cache = shutil.copytree(reference, tmp_path / "c")
    p = cache / "shard_00001.safetensors"
    data = st_save(edit(st_load(p.read_bytes())))
    p.write_bytes(data)
    m = json.loads((cache / MANIFEST).read_text())
    import hashlib

    m["shards"][1].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (cache / MANIFEST).write_text(json.dumps(m))
    before = snapshot(cache)
    c = ActivationCache(cache)
    with pytest.raises(CacheError, match=f"shard .*shard_00001.safetensors .*{match}"):
        list(c.iter_blocks())
    assert_nothing_lost(before, snapshot(cache))


# ---------------------------------------------------------------------- Ctrl-C and explicit replacement
def test_F15_ctrl_c_in_harvest_resumes_byte_identically(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """F15: Ctrl-C in `sae-diff harvest` after two shards: exit 130 with one line saying how to
    resume; the shards are kept; rerunning the same command gives the uninterrupted cache."""
    args = ["harvest", "--config", str(SMOKE), "--training_tokens", "16384", "--context_size", "16"]
    assert main([*args, "--cache-path", str(tmp_path / "ref")]) == 0
    real = ActivationCacheWriter.add

    def interrupted(self: ActivationCacheWriter, *a: Any, **k: Any) -> None:
        if self.rows_seen >= 512:
            raise KeyboardInterrupt
        real(self, *a, **k)

    monkeypatch.setattr(ActivationCacheWriter, "add", interrupted)
    capsys.readouterr()
    assert main([*args, "--cache-path", str(tmp_path / "c")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1].startswith("sae-diff harvest: interrupted;")
        and "resume with: sae-diff harvest --config" in err[-1]
    )
    assert "Traceback" not in "\n".join(err)
    assert len(list((tmp_path / "c").glob("shard_*.safetensors"))) == 2
    before = snapshot(tmp_path / "c")
    monkeypatch.setattr(ActivationCacheWriter, "add", real)
    assert main([*args, "--cache-path", str(tmp_path / "c")]) == 0
    assert_nothing_lost(
        {k: v for k, v in before.items() if k != MANIFEST}, snapshot(tmp_path / "c")
    )
    _same_cache(tmp_path / "c", tmp_path / "ref")


def test_F16_ctrl_c_in_train_checkpoints_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """F16: a real SIGINT during `sae-diff train`: the step finishes, a checkpoint is written,
    exit 130 with "interrupted; ... resume with: sae-diff train --resume <checkpoint>", and
    that command finishes the run."""
    from sae_diff.training.runner import ResumableSAETrainer

    real = ResumableSAETrainer.step if hasattr(ResumableSAETrainer, "step") else None
    assert real is not None
    calls = {"n": 0}

    def step(self: Any, *a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)
        return real(self, *a, **k)

    monkeypatch.setattr(ResumableSAETrainer, "step", step)
    flags = [
        *TINY,
        "--checkpoint_path",
        str(tmp_path / "ck"),
        "--output_path",
        str(tmp_path / "out"),
        "--eval_at_end",
        "false",
        "--n_checkpoints",
        "0",
    ]
    assert main(["train", "--config", str(SMOKE), *flags]) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        line.startswith("sae-diff train: interrupted;")
        and "resume with: sae-diff train --resume" in line
    )
    ckpt = line.split("--resume ")[1].strip()
    before = snapshot(tmp_path / "ck")
    monkeypatch.setattr(ResumableSAETrainer, "step", real)
    assert main(["train", "--resume", ckpt]) == 0
    assert (tmp_path / "out" / "cfg.json").is_file()
    assert_nothing_lost(before, snapshot(tmp_path / "ck"))


def test_F17_ctrl_c_before_the_first_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """F17: Ctrl-C while the models load (nothing to checkpoint yet): one line, exit 130."""
    import sae_diff.training.data as data
    import sae_diff.training.runner as runner

    def interrupted(*a: Any, **k: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "load_pair", interrupted)
    monkeypatch.setattr(runner, "load_pair", interrupted, raising=False)
    monkeypatch.setattr(data, "build_smoke_test_pair", interrupted)
    assert (
        main(["train", "--config", str(SMOKE), *TINY, "--checkpoint_path", str(tmp_path / "ck")])
        == 130
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(
            "sae-diff train: interrupted before the first checkpoint; "
            "resume with: sae-diff train --config"
        )
    )


def test_F18_overwrite_is_the_only_way_to_replace(
    reference: Path, pair: PairedModel, tokens: torch.Tensor, tmp_path: Path
) -> None:
    """F18: harvesting again into a finished cache changes no byte; another configuration is
    refused listing every difference; only overwrite=True (``--overwrite``) replaces it."""
    cache = shutil.copytree(reference, tmp_path / "c")
    before = snapshot(cache)
    _harvest(pair, tokens, cache)
    assert snapshot(cache) == before
    with pytest.raises(
        CacheIdentityError, match="dtype: cached .*hook_name: cached .*Nothing was changed"
    ) as e:
        harvest_cache(
            pair,
            TensorTokenSource(tokens),
            cache,
            "blocks.0.hook_resid_pre",
            rows_per_shard=4,
            batch_size=2,
            dtype="bfloat16",
            progress=False,
            verbose=False,
        )
    assert len(e.value.mismatches) == 2
    assert snapshot(cache) == before
    harvest_cache(
        pair,
        TensorTokenSource(tokens),
        cache,
        "blocks.0.hook_resid_pre",
        rows_per_shard=4,
        batch_size=2,
        progress=False,
        verbose=False,
        overwrite=True,
    )
    assert ActivationCache(cache).hook_name == "blocks.0.hook_resid_pre"


# ---------------------------------------------------------------------- checkpoints
class Boom:
    """Pickles as a call to ``os.system(command)``: unpickling it without ``weights_only``
    runs the command. Saving it runs nothing (``__reduce__`` only describes the call)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


@pytest.mark.parametrize("fid,file", [("F19", "trainer_state.pt"), ("F20", "sae_diff_state.pt")])
def test_pickled_payload_in_checkpoint_never_runs(
    fid: str,
    file: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """F19-F20: a checkpoint whose trainer state holds a pickled payload: resuming refuses it
    with a one-line error naming the file, and the payload does NOT run, even with
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (weights_only=True is passed explicitly).

    In this process, not a fresh interpreter per case: ``torch.load`` reads the variable at
    each call (torch 2.13's serialization.py), so setting it here has the same effect; the control at the end
    proves that it is live and that the payload is real (it does run when ``torch.load`` is
    left to the variable). That saves ~5 s of imports per case."""
    run = request.getfixturevalue("smoke_run")
    ck = shutil.copytree(run / "ck", tmp_path / "ck")
    from sae_diff.training.runner import find_checkpoint

    target = find_checkpoint(ck)
    marker = tmp_path / "PWNED"
    torch.save({"optimizer": Boom(f"touch {marker}")}, target / file)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    before = snapshot(tmp_path)
    capsys.readouterr()
    rc = main(["train", "--resume", str(target)])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    line = error_line(err, "train")
    assert file in line and "weights_only=True" in line
    assert not marker.exists(), "the pickled payload ran"
    assert_nothing_lost(before, snapshot(tmp_path))
    # control: the variable is live in this process and the payload runs when torch.load
    # is not told weights_only=True (so "the marker is absent" above means something)
    with pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        torch.load(target / file)
    assert marker.exists(), "control: the payload should run under a plain torch.load"


def test_F21_unfinished_checkpoint_is_skipped(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """F21: a checkpoint write killed midway (its hidden temp folder, or a folder without
    trainer state) is never picked to resume from: the newest complete one is."""
    from sae_diff.training.runner import find_checkpoint

    run = request.getfixturevalue("smoke_run")
    ck = shutil.copytree(run / "ck", tmp_path / "ck")
    good = find_checkpoint(ck)
    half = good.parent / ".99999999.abc.tmp"
    shutil.copytree(good, half)
    (good.parent / "99999998").mkdir()
    (good.parent / "99999998" / "sae_weights.safetensors").write_bytes(b"partial")
    assert find_checkpoint(ck) == good == find_checkpoint(good.parent)


def test_fault_ids_are_all_tested() -> None:
    text = Path(__file__).read_text()
    for fid in FAULT_IDS:
        assert f'"{fid}"' in text or f"test_{fid}_" in text, fid
