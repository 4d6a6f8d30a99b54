"""Share dictionaries on the Hugging Face Hub the way SAELens users share SAEs.

Uploads go through SAELens's own ``upload_saes_to_huggingface`` (same repository layout:
one folder per ``sae_id`` holding ``cfg.json``, ``sae_weights.safetensors`` and, when present,
``sparsity.safetensors`` and ``runner_cfg.json``), so that after ``import sae_diff``::

    sae = SAE.from_pretrained("org/repo", sae_id)

loads the dictionary through SAELens's Hugging Face loader (SAELens treats a ``release``
that is not in its directory as a repo id and ``sae_id`` as the folder). The saved config
carries the pair in ``cfg.metadata``: ``base_model_name``, ``model_name`` (the fine-tune),
``hook_name`` and, for diff-SAEs, ``diff_sign``; :func:`upload_dictionary` checks it is there.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.saes.sae import SAE, TrainingSAE

import sae_diff  # noqa: F401  (registers the architectures)
from sae_diff.dictionaries import specs
from sae_diff.errors import SaeDiffError

#: metadata every uploaded pair dictionary must carry
REQUIRED_PAIR_METADATA: tuple[str, ...] = ("base_model_name", "model_name", "hook_name")
#: saved (inference) names of pair dictionaries (crosscoders, diff-SAEs): from the architecture table
PAIR_ARCHITECTURES: frozenset[str] = specs.inference_names("crosscoder") | specs.inference_names(
    "diff_sae"
)
EXTRA_FILES: tuple[str, ...] = ("eval.json",)


class HubError(SaeDiffError, ValueError):
    """A dictionary cannot be uploaded as is (the message says what to add)."""


def _export(sae_or_path: SAE[Any] | str | Path, tmp: Path) -> Path:
    """A folder in SAELens layout for ``sae_or_path`` (training dictionaries are exported)."""
    if isinstance(sae_or_path, TrainingSAE):
        sae_or_path.save_inference_model(str(tmp))
        return tmp
    if isinstance(sae_or_path, SAE):
        sae_or_path.save_model(str(tmp))
        return tmp
    path = Path(sae_or_path)
    for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path} is not a saved dictionary: {name} is missing. Pass a training output "
                "folder (cfg.json + sae_weights.safetensors) or an SAE object."
            )
    return path


def pair_metadata(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The pair fields of a saved config's metadata (missing ones are None)."""
    md = cfg_dict.get("metadata") or {}
    keys = (*REQUIRED_PAIR_METADATA, "diff_sign", "store_mode", "sae_diff_version")
    return {k: md.get(k) for k in keys}


def _check_metadata(cfg_dict: dict[str, Any], where: str) -> None:
    arch = cfg_dict.get("architecture")
    if arch not in PAIR_ARCHITECTURES:
        return
    md = cfg_dict.get("metadata") or {}
    missing = [k for k in REQUIRED_PAIR_METADATA if not md.get(k)]
    if arch in specs.inference_names("diff_sae") and not (
        md.get("diff_sign") or cfg_dict.get("diff_sign")
    ):
        missing.append("diff_sign")
    if missing:
        raise HubError(
            f"{where}: the config's metadata lacks {missing}, so users could not tell which models "
            "the dictionary compares. Pass metadata={...} to upload_dictionary (or --metadata "
            "KEY=VALUE to `sae-diff upload`)."
        )


def _readme(repo_id: str, entries: dict[str, dict[str, Any]]) -> str:
    first = next(iter(entries.values()))
    base, ft = first.get("base_model_name"), first.get("model_name")
    lines = [
        "---",
        "library_name: saelens",
        "tags:",
        "- sae_diff",
        "- model-diffing",
        "- sparse-autoencoder",
    ]
    lines += [
        "---",
        "",
        f"# Model-diffing dictionaries: {base} (base) vs {ft} (fine-tuned)",
        "",
        "Trained with sae_diff, a SAELens / TransformerLens plugin for model diffing.",
        "",
        "| sae_id | architecture | hook | d_in | d_sae |",
        "|---|---|---|---|---|",
    ]
    for sae_id, e in entries.items():
        lines.append(
            f"| {sae_id} | {e.get('architecture')} | {e.get('hook_name')} | {e.get('d_in')} | {e.get('d_sae')} |"
        )
    lines += [
        "",
        "```python",
        "import sae_diff  # registers the architectures with SAELens",
        "from sae_lens import SAE",
        "",
        f'sae = SAE.from_pretrained("{repo_id}", "<sae_id>")',
        "```",
        "",
    ]
    return "\n".join(lines)


def upload_dictionaries(
    saes: dict[str, SAE[Any] | str | Path],
    repo_id: str,
    *,
    revision: str = "main",
    private: bool = False,
    metadata: dict[str, Any] | None = None,
    readme: bool = True,
    show_progress: bool = True,
) -> str:
    """Upload several dictionaries (``{sae_id: SAE or saved folder}``) to ``repo_id``.

    ``metadata`` is merged into each config's ``metadata`` first (e.g. to add
    ``base_model_name`` to a dictionary trained elsewhere). Pair dictionaries whose config
    lacks the pair metadata are refused (:class:`HubError`). Returns the repo URL.
    """
    from huggingface_hub import HfApi
    from sae_lens.training.upload_saes_to_huggingface import upload_saes_to_huggingface

    if not saes:
        raise ValueError("No dictionaries to upload.")
    with tempfile.TemporaryDirectory(prefix="sae-diff-upload-") as tmp_root:
        folders: dict[str, Path] = {}
        summaries: dict[str, dict[str, Any]] = {}
        for sae_id, ref in saes.items():
            staged = Path(tmp_root) / f"{len(folders)}"
            staged.mkdir()
            src = _export(ref, staged / "export")
            if src != staged / "export":  # a folder on disk: copy so metadata edits stay local
                shutil.copytree(src, staged / "export", dirs_exist_ok=True)
            folder = staged / "export"
            cfg_path = folder / SAE_CFG_FILENAME
            cfg_dict = json.loads(cfg_path.read_text())
            if metadata:
                cfg_dict["metadata"] = {**(cfg_dict.get("metadata") or {}), **metadata}
                cfg_path.write_text(json.dumps(cfg_dict, indent=2, default=str))
            _check_metadata(cfg_dict, f"dictionary {sae_id!r}")
            folders[sae_id] = folder
            summaries[sae_id] = {
                **pair_metadata(cfg_dict),
                "architecture": cfg_dict.get("architecture"),
                "d_in": cfg_dict.get("d_in"),
                "d_sae": cfg_dict.get("d_sae"),
            }
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        if readme:
            api.upload_file(
                path_or_fileobj=_readme(repo_id, summaries).encode(),
                path_in_repo="README.md",
                repo_id=repo_id,
                revision=revision,
                commit_message="Add README.md",
            )
        upload_saes_to_huggingface(
            dict(folders.items()),
            hf_repo_id=repo_id,
            hf_revision=revision,  # type: ignore[arg-type]
            show_progress=show_progress,
            add_default_readme=False,
        )
        for sae_id, folder in folders.items():
            for extra in EXTRA_FILES:
                if (folder / extra).is_file():
                    api.upload_file(
                        path_or_fileobj=str(folder / extra),
                        path_in_repo=f"{sae_id}/{extra}",
                        repo_id=repo_id,
                        revision=revision,
                        commit_message=f"Add {sae_id}/{extra}",
                    )
    return f"{api.endpoint}/{repo_id}"


def upload_dictionary(
    sae_or_path: SAE[Any] | str | Path, repo_id: str, sae_id: str | None = None, **kwargs: Any
) -> str:
    """Upload one dictionary; ``sae_id`` defaults to the folder's name. See
    :func:`upload_dictionaries` for the options."""
    if sae_id is None:
        if isinstance(sae_or_path, SAE):
            raise ValueError("Give sae_id when uploading an SAE object.")
        sae_id = Path(sae_or_path).resolve().name
    return upload_dictionaries({sae_id: sae_or_path}, repo_id, **kwargs)


def load_dictionary(
    repo_id: str,
    sae_id: str,
    device: str = "cpu",
    dtype: str = "float32",
    force_download: bool = False,
) -> SAE[Any]:
    """``SAE.from_pretrained(repo_id, sae_id)`` with sae_diff's architectures registered."""
    return SAE.from_pretrained(
        repo_id, sae_id, device=device, dtype=dtype, force_download=force_download
    )


__all__ = [
    "HubError",
    "load_dictionary",
    "pair_metadata",
    "upload_dictionaries",
    "upload_dictionary",
]
