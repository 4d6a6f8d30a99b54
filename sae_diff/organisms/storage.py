"""On-disk format of an organism directory, with a sha256 manifest.

Files::

    config.json            model architecture, build settings, behaviours, hook advice
    base.safetensors       base model parameters (TransformerLens names)
    ft.safetensors         fine-tuned model parameters
    tokenizer.json, tokenizer_config.json, chat_template.jinja   the HF fast tokenizer
    world.json             the synthetic world (shipped organisms; optional for custom ones)
    report.json            the behavioural checks measured at build time
    manifest.json          {"files": {name: {"sha256", "bytes"}}, ...}
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer

from sae_diff.errors import SaeDiffError

MANIFEST = "manifest.json"


class OrganismIntegrityError(SaeDiffError, RuntimeError):
    """An organism file is missing or does not match the sha256 in its manifest."""


class OrganismOutputError(SaeDiffError, ValueError):
    """An organism build was pointed somewhere it must not write: inside the installed
    package (where the shipped organisms live), or over a directory it would destroy."""


#: The installed ``sae_diff`` package. Builds never write below it: the shipped organisms are
#: read-only data, verified against their manifests (a build there would rewrite the manifest
#: too, so a corrupted shipped organism would pass its own integrity check).
PACKAGE_DIR = Path(__file__).resolve().parents[1]
SHIPPED_DIR = PACKAGE_DIR / "organisms" / "data"


def default_output_dir(name: str) -> Path:
    """Where a build writes when no ``--out`` is given: ``./organisms/<name>`` (current folder)."""
    return Path("organisms") / name


def check_output_dir(out: Path | str, overwrite: bool = False) -> Path:
    """Refuse output directories a build must not write to; return ``out`` resolved.

    Refused: anything inside the installed package (naming the shipped organism it would
    replace), a path that is a file, a non-empty directory that is not an organism directory
    (its files would be deleted), and an existing organism directory unless ``overwrite``.
    Called before a build starts, so a refusal costs nothing.
    """
    path = Path(out).expanduser().resolve()
    if path == PACKAGE_DIR or PACKAGE_DIR in path.parents:
        shipped = ""
        if path.parent == SHIPPED_DIR or path == SHIPPED_DIR:
            shipped = f" and would replace the shipped organism {path.name!r}"
        raise OrganismOutputError(
            f"Refusing to write an organism to {path}: it is inside the installed sae_diff package "
            f"({PACKAGE_DIR}){shipped}. Build into a directory of your own, e.g. "
            f"`--out {default_output_dir(path.name)}` (the default when --out is omitted), and load it "
            f"with load_organism('{default_output_dir(path.name)}')."
        )
    if path.exists() and not path.is_dir():
        raise OrganismOutputError(
            f"--out {path} is a file, not a directory; pick a directory path."
        )
    if path.is_dir() and any(path.iterdir()):
        if not (path / MANIFEST).is_file():
            raise OrganismOutputError(
                f"--out {path} is not empty and is not an organism directory (no {MANIFEST}); "
                "refusing to replace its files. Pick a new or empty directory."
            )
        if not overwrite:
            raise OrganismOutputError(
                f"--out {path} already holds an organism. Pass --overwrite (overwrite=True) to "
                "replace it, or pick another directory."
            )
    return path


@contextmanager
def staged_output_dir(out: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``out``; on success move it into place.

    The organism is written into ``.<name>.partial-*`` and only renamed to ``out`` once every
    file (manifest last) is written, so an interrupted or failed build leaves ``out`` exactly
    as it was, and a reader never sees half an organism. ``out`` is checked with
    :func:`check_output_dir` first.
    """
    path = check_output_dir(out, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; an organism directory is ordinary data
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in tmp.iterdir():  # some writers (safetensors) leave private 0600 files
        if f.is_file():
            f.chmod(0o644)
    old = None
    if path.exists():
        check_output_dir(path, overwrite)  # nothing else appeared there meanwhile
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        path.rename(old)
    tmp.rename(path)
    if old is not None:
        shutil.rmtree(old)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash every file of ``directory`` (except the manifest) into ``manifest.json``."""
    directory = Path(directory)
    files = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": "sae_diff-organism-v1", "files": files, **(extra or {})}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def verify_manifest(directory: Path) -> dict[str, Any]:
    """Check every file listed in ``manifest.json``; raise :class:`OrganismIntegrityError`."""
    directory = Path(directory)
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise OrganismIntegrityError(
            f"No {MANIFEST} in {directory}. This is not an organism directory; build one with "
            "`python -m sae_diff.organisms.build --out DIR` (or pass the right path)."
        )
    manifest = json.loads(mpath.read_text())
    for name, info in manifest["files"].items():
        p = directory / name
        if not p.is_file():
            raise OrganismIntegrityError(
                f"Organism file {name} is missing from {directory}. Reinstall sae_diff or "
                "regenerate it with `python -m sae_diff.organisms.build`."
            )
        got = sha256_file(p)
        if got != info["sha256"]:
            raise OrganismIntegrityError(
                f"sha256 mismatch for {name} in {directory}: expected {info['sha256']}, got "
                f"{got}. The file is corrupt or was modified; reinstall sae_diff or regenerate "
                "the organism with `python -m sae_diff.organisms.build`."
            )
    return manifest


def save_weights(model: HookedTransformer, path: Path, dtype: torch.dtype = torch.float32) -> None:
    """Save the model's parameters (not buffers) as safetensors."""
    sd = {n: p.detach().to(dtype).contiguous().clone() for n, p in model.named_parameters()}
    save_file(sd, str(path), metadata={"format": "pt"})  # one key: byte-deterministic header


def load_weights(model: HookedTransformer, path: Path) -> None:
    """Load parameters saved by :func:`save_weights` (every parameter must be present)."""
    sd = load_file(str(path))
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(sd))
    unexpected = sorted(set(sd) - set(params))
    if missing or unexpected:
        raise OrganismIntegrityError(
            f"{path.name} does not match the model config: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}. Check config.json belongs to these weights."
        )
    with torch.no_grad():
        for n, p in params.items():
            if sd[n].shape != p.shape:
                raise OrganismIntegrityError(
                    f"{path.name}: parameter {n} has shape {tuple(sd[n].shape)}, the config "
                    f"expects {tuple(p.shape)}."
                )
            p.copy_(sd[n].to(p.dtype))
