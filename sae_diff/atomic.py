"""The one way sae_diff writes files and folders: atomically, optionally durably.

Every output (dictionaries, checkpoints, cache shards and manifests, latent tables, reports)
goes through :func:`atomic_write` or :func:`atomic_dir`, so a reader never sees a partial file:
the content is written to a hidden temporary sibling (same directory, hence same filesystem)
and renamed over the target with ``os.replace``, which POSIX makes atomic.

Fsync semantics, stated once:

- ``durable=False`` (default): atomic against a crash or kill of *this process* (the old or the
  new file is there, never a mix), not against power loss or an OS crash: the data may still be
  in the page cache when the rename is.
- ``durable=True``: the file's data are ``fsync``-ed before the rename and the directory after
  it, so the new content survives power loss once the call returns. Used where a later step
  trusts what it reads without re-checking everything (the activation cache's shards and
  manifest). A filesystem that refuses a directory ``fsync`` is tolerated (the rename is
  still atomic).

Files get ordinary permissions (``0o666`` less the umask), not ``mkstemp``'s ``0o600``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without O_RDONLY directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str],
    content: bytes | Callable[[Path], object],
    *,
    durable: bool = False,
) -> Path:
    """Write ``path`` atomically (module docstring), creating its folder if needed.

    Args:
        path: the file to (re)place.
        content: the bytes to write, or a function ``write(tmp_path)`` that writes the file
            at ``tmp_path`` itself (``save_file(tensors, tmp)``, ``df.to_parquet(tmp)`` ...).
        durable: fsync the data and the directory (survives power loss).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        if isinstance(content, (bytes, bytearray, memoryview)):
            with os.fdopen(fd, "wb") as f:
                f.write(content)
        else:
            os.close(fd)
            content(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_dir(
    final: str | os.PathLike[str], fill: Callable[[Path], None], *, durable: bool = False
) -> Path:
    """Create the folder ``final`` atomically: ``fill(tmp)`` writes into a hidden sibling
    folder, which is then renamed to ``final`` (an older ``final`` is moved aside first and
    deleted after). ``durable``: fsync every file written and the parent directory."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        fill(tmp)
        if durable:
            for p in tmp.rglob("*"):
                if p.is_file():
                    _fsync_file(p)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        if durable:
            _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


__all__ = ["atomic_dir", "atomic_write"]
