"""One-line loading of published dictionaries, and the matching SAELens converters.

import sae_diff.interop as interop
cc  = interop.load("owner/crosscoder-repo")                          # dictionary_learning
sae = interop.load("owner/diff-sae-repo", diff_sign="ft_minus_base")  # BatchTopKSAE on a difference
cc  = interop.load("ckkissane/crosscoder-gemma-2-2b-model-diff/blocks.14.hook_resid_pre",
                   norm_factors=[c_0, c_1])                           # replication format
interop.convert(source, "out_dir")                                    # SAELens files on disk

SAE.from_pretrained("owner/repo", "", converter=interop.hf_converter())
SAE.load_from_disk("path/to/folder", converter=interop.disk_converter())
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader
from sae_lens.saes.sae import SAE

from sae_diff.dictionaries.base import DIFF_SIGNS
from sae_diff.dictionaries.io import build_sae, save_sae_files
from sae_diff.interop import dictionary_learning, replication
from sae_diff.interop.common import ConversionOptions, StateDict
from sae_diff.interop.errors import InteropError
from sae_diff.interop.files import Source, read_json, read_state_dict, resolve_source

FORMATS = ("dictionary_learning", "crosscoder_replication", "sae_lens")
DL_CONFIG = "config.json"
#: weights a dictionary_learning folder may hold, in order of preference: a Hub upload
#: (model.safetensors), older saves, and the trainer's own output folder (model_final.pt, then
#: its newest checkpoint_<step>.pt)
DL_WEIGHTS = ("model.safetensors", "model.pt", "ae.pt", "model_final.pt")
DL_CHECKPOINT = re.compile(r"^checkpoint_(\d+)\.pt$")
#: the replication's own save(): <version>.pt + <version>_cfg.json
REPLICATION_SAVE = re.compile(r"^(\d+)_cfg\.json$")


def _replication_save_version(src: Source, weights_file: str | None) -> str | None:
    """The newest ``<v>.pt`` + ``<v>_cfg.json`` pair of a local replication save folder
    (the one ``weights_file`` names, when given), or None when there is none."""
    if src.local is None:
        return None
    versions = sorted(
        (
            int(m.group(1))
            for p in src.list_local("_cfg.json")
            if (m := REPLICATION_SAVE.match(p.name))
        ),
    )
    versions = [v for v in versions if (src.local / f"{v}.pt").is_file()]
    if weights_file is not None:
        stem = Path(weights_file).name.removesuffix(".pt")
        return stem if stem.isdigit() and int(stem) in versions else None
    return str(versions[-1]) if versions else None


def _newest_dl_checkpoint(src: Source) -> Path | None:
    """The highest-step ``checkpoint_<step>.pt`` of a local trainer output folder."""
    found = [
        (int(m.group(1)), p) for p in src.list_local(".pt") if (m := DL_CHECKPOINT.match(p.name))
    ]
    return max(found)[1] if found else None


SAE_LENS_CFG, SAE_LENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"


def _detect_format(src: Source, weights_file: str | None) -> str:
    if _replication_save_version(src, weights_file) is not None:
        return "crosscoder_replication"
    if weights_file is not None:
        if weights_file.endswith(replication.WEIGHTS_FILE):
            return "crosscoder_replication"
        if weights_file.endswith(SAE_LENS_WEIGHTS):
            return "sae_lens"
        return "dictionary_learning"
    if src.fetch(DL_CONFIG) is not None:
        return "dictionary_learning"
    cfg_path = src.fetch(SAE_LENS_CFG)
    if cfg_path is not None:
        return "sae_lens" if "architecture" in read_json(cfg_path) else "crosscoder_replication"
    if src.list_local(".pt") or src.list_local(".safetensors"):
        return "dictionary_learning"
    raise InteropError(
        f"{src.describe()}: found none of {DL_CONFIG} (dictionary_learning), {SAE_LENS_CFG} "
        f"(replication or SAELens) or weight files. Point at the folder holding the checkpoint, "
        "or pass format= and weights_file=."
    )


def _weights_path(src: Source, names: Sequence[str], what: str) -> Path:
    path = src.first(list(names))
    if path is not None:
        return path
    local = src.list_local(".pt") + src.list_local(".safetensors")
    if len(local) == 1:
        return local[0]
    newest = _newest_dl_checkpoint(src) if what == "dictionary_learning" else None
    if newest is not None and all(DL_CHECKPOINT.match(p.name) for p in src.list_local(".pt")):
        return newest  # a trainer folder without model_final.pt: its last checkpoint
    raise InteropError(
        f"{src.describe()}: no {what} weights found (looked for {list(names)}"
        + (f"; several candidates {[p.name for p in local]}" if local else "")
        + "). Pass weights_file=<name>."
    )


def read(
    source: str | Path,
    *,
    format: str | None = None,
    weights_file: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    force_download: bool = False,
    **options: Any,
) -> tuple[dict[str, Any], StateDict]:
    """Read a published checkpoint and return ``(cfg_dict, state_dict)`` in SAELens form.

    This is the converter core (``load`` builds the SAE from it). ``options`` are the fields
    of :class:`~sae_diff.interop.common.ConversionOptions`; see :func:`load`.
    """
    opts = ConversionOptions(**options)
    if opts.diff_sign is not None and opts.diff_sign not in DIFF_SIGNS:
        raise ValueError(f"diff_sign must be one of {list(DIFF_SIGNS)}, got {opts.diff_sign!r}.")
    src, file_name = resolve_source(
        source,
        subfolder=subfolder,
        revision=revision,
        cache_dir=cache_dir,
        endpoint=endpoint,
        force_download=force_download,
    )
    weights_file = weights_file or file_name
    fmt = format or _detect_format(src, weights_file)
    if fmt not in FORMATS:
        raise InteropError(f"Unknown format {fmt!r}; choose one of {list(FORMATS)}.")
    where = src.describe()

    if fmt == "sae_lens":
        cfg_path = src.fetch(SAE_LENS_CFG)
        weights = src.fetch(weights_file or SAE_LENS_WEIGHTS)
        if cfg_path is None or weights is None:
            raise InteropError(
                f"{where}: a SAELens folder needs {SAE_LENS_CFG} and {SAE_LENS_WEIGHTS}."
            )
        return sae_lens_disk_loader(cfg_path.parent, opts.device, {"dtype": opts.dtype})

    if fmt == "crosscoder_replication":
        version = _replication_save_version(src, weights_file)
        cfg_name = f"{version}_cfg.json" if version is not None else replication.CFG_FILE
        weights_name = (
            f"{version}.pt" if version is not None else weights_file or replication.WEIGHTS_FILE
        )
        cfg_path = src.fetch(cfg_name)
        config = read_json(cfg_path) if cfg_path is not None else {}
        weights = _weights_path(src, [weights_name], "replication")
        return replication.convert(
            read_state_dict(weights), config, opts, f"{where}/{weights.name}"
        )

    cfg_path = src.fetch(DL_CONFIG)
    config = read_json(cfg_path) if cfg_path is not None else {}
    weights = _weights_path(
        src, [weights_file] if weights_file else DL_WEIGHTS, "dictionary_learning"
    )
    return dictionary_learning.convert(
        read_state_dict(weights), config, opts, f"{where}/{weights.name}"
    )


def load(source: str | Path, **kwargs: Any) -> SAE[Any]:
    """Load a published dictionary as the matching sae_diff / SAELens class, in one line.

    Args:
        source: a local folder or weights file, or a Hub repo id ``owner/name`` optionally
            followed by ``/sub/folder``.
        format: ``"dictionary_learning"``, ``"crosscoder_replication"`` or ``"sae_lens"``;
            detected from the files when omitted.
        weights_file, subfolder, revision, cache_dir, endpoint, force_download: where to read.
        dict_class: override ``config.json``'s ``dict_class`` (``CrossCoder``,
            ``BatchTopKCrossCoder``, ``BatchTopKSAE``); detected from the keys when there is no config.
        diff_sign: for a ``BatchTopKSAE`` trained on a difference, ``"ft_minus_base"`` or
            ``"base_minus_ft"``; returns a :class:`~sae_diff.dictionaries.diff_sae.DiffSAE`.
            Without it a ``BatchTopKSAE`` becomes a SAELens ``JumpReLUSAE`` (chat-/base-SAE).
        norm_factors: replication format only: the per-model input scalars its README asks for,
            in the checkpoint's model order; folded into the weights.
        base_index: which of the source's two models is the base (0, the default, or 1). With 1
            the models are swapped so that index 0 = base, as everywhere in sae_diff.
        code_normalisation: label to record when the source's (``mixed``, or ``decoupled`` on an
            L1 crosscoder) has no sae_diff equivalent; encodings are exact either way.
        threshold: override (or supply) the BatchTopK inference threshold theta.
        model_name, base_model_name, hook_name: recorded in ``cfg.metadata``.
        dtype, device: of the returned dictionary (``"float32"``, ``"cpu"`` by default).
    """
    cfg, state_dict = read(source, **kwargs)
    return build_sae(cfg, state_dict)


def convert(source: str | Path, out_dir: str | Path, **kwargs: Any) -> Path:
    """Convert a published dictionary and save it in SAELens form (``cfg.json`` +
    ``sae_weights.safetensors``) under ``out_dir``; ``SAE.load_from_disk(out_dir)`` loads it
    back after ``import sae_diff``. Takes the same arguments as :func:`load`."""
    cfg, state_dict = read(source, **kwargs)
    build_sae(cfg, state_dict)  # fail before writing anything if the result does not load
    save_sae_files(out_dir, state_dict, cfg)
    return Path(out_dir)


HfLoader = Callable[..., tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]]
DiskLoader = Callable[..., tuple[dict[str, Any], dict[str, torch.Tensor]]]


def _apply_overrides(cfg: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    if overrides:
        cfg.update(overrides)
    return cfg


def hf_converter(**options: Any) -> HfLoader:
    """A SAELens ``PretrainedSaeHuggingfaceLoader`` for published formats.

    ``SAE.from_pretrained(repo_id, folder_or_empty_string, converter=hf_converter(**options))``;
    ``options`` are those of :func:`load` (except where to read, which SAELens supplies).
    """

    def loader(
        repo_id: str,
        folder_name: str,
        device: str = "cpu",
        force_download: bool = False,
        cfg_overrides: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]:
        dtype = (cfg_overrides or {}).get("dtype", options.get("dtype", "float32"))
        cfg, sd = read(
            repo_id,
            subfolder=folder_name or None,
            force_download=force_download,
            **{**options, "device": device, "dtype": dtype},
        )
        return _apply_overrides(cfg, cfg_overrides), sd, None

    return loader


def disk_converter(**options: Any) -> DiskLoader:
    """A SAELens ``PretrainedSaeDiskLoader``: ``SAE.load_from_disk(path, converter=disk_converter())``."""

    def loader(
        path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        dtype = (cfg_overrides or {}).get("dtype", options.get("dtype", "float32"))
        cfg, sd = read(path, **{**options, "device": device, "dtype": dtype})
        return _apply_overrides(cfg, cfg_overrides), sd

    return loader


#: Ready-made converters with default options (auto-detected format).
published_hf_loader: HfLoader = hf_converter()
published_disk_loader: DiskLoader = disk_converter()
