"""Finding and reading the files of a published dictionary, locally or on the Hugging Face Hub.

Nothing here runs code from the checkpoint: ``.pt`` files go through
``torch.load(weights_only=True)`` and configs are plain JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sae_diff.interop.errors import InteropError, InteropFileNotFoundError

COMPILE_PREFIX = "_orig_mod."


@dataclass
class HubLocation:
    """Where to fetch files from: a Hub repo (``repo_id``, optional ``subfolder``)."""

    repo_id: str
    subfolder: str = ""
    revision: str | None = None
    cache_dir: str | None = None
    endpoint: str | None = None
    force_download: bool = False

    def describe(self) -> str:
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return f"hf://{self.repo_id}{sub}" + (f"@{self.revision}" if self.revision else "")


class Source:
    """A folder of checkpoint files, local or on the Hub, with one ``fetch(name)`` method."""

    def __init__(self, local: Path | None = None, hub: HubLocation | None = None) -> None:
        if (local is None) == (hub is None):
            raise ValueError("Source needs exactly one of local= or hub=.")
        self.local = local
        self.hub = hub

    def describe(self) -> str:
        return str(self.local) if self.local is not None else self.hub.describe()  # type: ignore[union-attr]

    def fetch(self, name: str) -> Path | None:
        """Local path of file ``name`` in this source, downloading it if needed; None if absent."""
        if self.local is not None:
            path = self.local / name
            return path if path.is_file() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import RemoteEntryNotFoundError

        hub = self.hub
        assert hub is not None
        try:
            return Path(
                hf_hub_download(
                    repo_id=hub.repo_id,
                    filename=name,
                    subfolder=hub.subfolder or None,
                    revision=hub.revision,
                    cache_dir=hub.cache_dir,
                    endpoint=hub.endpoint,
                    force_download=hub.force_download,
                )
            )
        except RemoteEntryNotFoundError:  # absent; offline or unreachable errors propagate
            return None

    def first(self, names: list[str]) -> Path | None:
        """The first of ``names`` present in the source (in order), or None."""
        for name in names:
            path = self.fetch(name)
            if path is not None:
                return path
        return None

    def list_local(self, suffix: str) -> list[Path]:
        """Local files ending in ``suffix`` (empty for Hub sources)."""
        if self.local is None:
            return []
        return sorted(p for p in self.local.iterdir() if p.is_file() and p.name.endswith(suffix))


def resolve_source(
    source: str | Path,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    force_download: bool = False,
) -> tuple[Source, str | None]:
    """Turn ``source`` into a :class:`Source` and, if it named a single file, that file's name.

    A path that exists locally is local (a folder, or one weights file). Otherwise ``source`` is
    a Hub repo id ``owner/name``, optionally followed by ``/sub/folder`` (or pass ``subfolder``).
    """
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file():
            return Source(local=path.parent), path.name
        return Source(local=path / subfolder if subfolder else path), None
    raw = str(source)
    text = raw.strip("/")
    parts = text.split("/")
    # decide "is this a path?" on the text as given: stripping "/" first would turn a missing
    # absolute path into a plausible repo id (and five network retries)
    looks_local = (
        Path(raw).is_absolute()
        or raw.startswith((".", "~", "\\"))
        or (len(raw) > 1 and raw[1] == ":")  # C:\... on Windows
        or raw.endswith((".pt", ".safetensors", ".json"))
    )
    if looks_local or len(parts) < 2:
        raise InteropFileNotFoundError(
            f"{source!r} is neither an existing local path nor a Hub repo id ('owner/name')"
            + (": no such file or folder" if looks_local else "")
            + ". Check the path, or pass the repo id of a Hugging Face model repo."
        )
    repo_id = "/".join(parts[:2])
    sub = "/".join(
        p for p in [*parts[2:], *(subfolder.strip("/").split("/") if subfolder else [])] if p
    )
    hub = HubLocation(
        repo_id=repo_id,
        subfolder=sub,
        revision=revision,
        cache_dir=None if cache_dir is None else str(cache_dir),
        endpoint=endpoint,
        force_download=force_download,
    )
    return Source(hub=hub), None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, with a clear error if it is not one."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InteropError(f"{path} is not valid JSON ({e}).") from e
    if not isinstance(data, dict):
        raise InteropError(f"{path} should hold a JSON object, got {type(data).__name__}.")
    return data


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` or ``.pt`` file, on CPU, ``torch.compile`` prefixes removed.

    ``.pt`` files are read with ``torch.load(weights_only=True)``: no pickled code runs. A file
    holding ``{"state_dict": {...}}`` (or ``"model"``) is unwrapped; non-tensor entries
    (e.g. ``_hub_mixin_config``) are dropped.
    """
    if path.suffix == ".safetensors":
        try:
            raw: Any = load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError, OSError: truncated or not safetensors
            raise InteropError(
                f"Could not read {path} as safetensors ({type(e).__name__}: {e}). The file is "
                "truncated or corrupt (an interrupted download?); download it again "
                "(force_download=True) or re-save it."
            ) from e
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors come in many types
            raise InteropError(
                f"Could not read {path} with torch.load(weights_only=True): {e}. sae_diff never "
                "unpickles arbitrary objects; re-save the checkpoint as a plain state dict."
            ) from e
    if isinstance(raw, dict):
        for wrapper in ("state_dict", "model_state_dict", "model"):
            if (
                wrapper in raw
                and isinstance(raw[wrapper], dict)
                and not isinstance(raw[wrapper], torch.Tensor)
            ):
                raw = raw[wrapper]
                break
    if not isinstance(raw, dict):
        raise InteropError(f"{path} does not hold a state dict (got {type(raw).__name__}).")
    return strip_compile_prefix({k: v for k, v in raw.items() if isinstance(v, torch.Tensor)})


def strip_compile_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``_orig_mod.`` (added by ``torch.compile``) from every key."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = key.replace(COMPILE_PREFIX, "")
        if new in out:
            raise InteropError(
                f"State dict has both {new!r} and a torch.compile copy of it; keep one."
            )
        out[new] = value
    return out
