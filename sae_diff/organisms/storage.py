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
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer

from sae_diff.errors import SaeDiffError

MANIFEST = "manifest.json"


class OrganismIntegrityError(SaeDiffError, RuntimeError):
    """An organism file is missing or does not match the sha256 in its manifest."""


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
