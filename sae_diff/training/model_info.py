"""What a training config can know about its models without loading weights or using the network.

Sizes come from the organism's ``config.json``, the smoke-test spec, the base model's own
``config.json`` (a local Hugging Face folder or the Hugging Face cache), and only then from a
small built-in table of the recipe models (``--dry-run`` on a machine that never downloaded
them). The hook-width check (:func:`check_hook_d_in`) reads hook names through
:mod:`sae_diff.pairing.hooks`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import try_to_load_from_cache

from sae_diff.organisms.ground_truth import available_organisms, organism_dir
from sae_diff.pairing.backends import read_model_info
from sae_diff.pairing.errors import PairingError
from sae_diff.pairing.hooks import block_of, hook_width
from sae_diff.training.errors import ConfigError

if TYPE_CHECKING:  # a real import would be a cycle: config -> validation -> this module
    from sae_diff.training.config import PairedRunnerConfig


@dataclass(frozen=True)
class OrganismInfo:
    """What a config needs to know about a bundled organism, read from its ``config.json``
    (no weights loaded, no checksums verified: ``load_organism`` does that when training).

    Attributes:
        name: the name or directory given in the config.
        path: the organism's directory.
        base_name, ft_name: the pair's names (recorded in the dictionary's metadata).
        recommended_hook: where its planted differences are clearest.
        dims: ``n_layers``, ``d_model``, ``d_mlp``, ``d_vocab``, ``n_ctx``.
    """

    name: str
    path: Path
    base_name: str
    ft_name: str
    recommended_hook: str
    dims: dict[str, int]


def organism_info(name: str) -> OrganismInfo:
    """Describe the organism ``name`` (a shipped name or a directory made by
    ``python -m sae_diff.organisms.build``) without loading it.

    Raises :class:`ConfigError` listing the shipped organisms when ``name`` is neither.
    """
    try:
        path = organism_dir(name)
    except FileNotFoundError:
        raise ConfigError(
            f"organism={name!r} is not a bundled organism; available: {available_organisms()} "
            "(or give a directory built with `python -m sae_diff.organisms.build --out DIR`)."
        ) from None
    try:
        conf = json.loads((path / "config.json").read_text())
        model = conf["model"]
        dims = {k: int(model[k]) for k in ("n_layers", "d_model", "d_mlp", "d_vocab", "n_ctx")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"organism {name!r} at {path} has no readable config.json with model sizes: {e}"
        ) from e
    return OrganismInfo(
        name=str(name),
        path=path,
        base_name=str(conf.get("base_name", "organism-base")),
        ft_name=str(conf.get("ft_name", "organism-ft")),
        recommended_hook=str(conf.get("recommended_hook", "blocks.2.hook_resid_pre")),
        dims=dims,
    )


def check_hook_d_in(hook_name: str, d_in: int, dims: dict[str, int]) -> None:
    """Raise unless ``d_in`` is the width of ``hook_name`` in a model of dimensions ``dims``
    (keys ``n_layers``, ``d_model`` and optionally ``d_mlp``)."""
    block = block_of(hook_name)
    if block is not None and block >= dims["n_layers"]:
        raise ConfigError(
            f"hook_name {hook_name!r} names layer {block}, but the model has "
            f"{dims['n_layers']} layers (0..{dims['n_layers'] - 1})."
        )
    width = hook_width(hook_name)
    expected = dims.get(width) if width is not None else None
    if expected is not None and d_in != expected:
        raise ConfigError(
            f"sae.d_in={d_in} does not match hook {hook_name!r}, which is {expected} wide in "
            f"this model. Set sae.d_in: {expected}."
        )


#: Dimensions of the recipe models, used only when their ``config.json`` is neither a local
#: folder nor in the Hugging Face cache (``--dry-run`` on a machine that never downloaded them).
KNOWN_MODEL_DIMS: dict[str, dict[str, int]] = {
    "google/gemma-2-2b": {
        "n_layers": 26,
        "d_model": 2304,
        "d_mlp": 9216,
        "d_vocab": 256000,
        "n_ctx": 8192,
    },
    "google/gemma-2-2b-it": {
        "n_layers": 26,
        "d_model": 2304,
        "d_mlp": 9216,
        "d_vocab": 256000,
        "n_ctx": 8192,
    },
    "gemma-2-2b": {
        "n_layers": 26,
        "d_model": 2304,
        "d_mlp": 9216,
        "d_vocab": 256000,
        "n_ctx": 8192,
    },
    "gemma-2-2b-it": {
        "n_layers": 26,
        "d_model": 2304,
        "d_mlp": 9216,
        "d_vocab": 256000,
        "n_ctx": 8192,
    },
    "gpt2": {"n_layers": 12, "d_model": 768, "d_mlp": 3072, "d_vocab": 50257, "n_ctx": 1024},
}


def model_config_dir(name: str | None, revision: str | None = None) -> str | None:
    """A folder holding ``config.json`` for ``name`` without touching the network: ``name``
    itself when it is a local Hugging Face folder, else its snapshot in the Hugging Face cache
    (None when neither exists)."""
    if not name:
        return None
    if (Path(name) / "config.json").is_file():
        return name
    if Path(name).exists() or name.count("/") > 1:
        return None
    try:
        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # an invalid repo id, or no cache: nothing known offline
        return None
    return str(Path(found).parent) if isinstance(found, str) else None


def _config_dims(name: str | None, revision: str | None = None) -> dict[str, int] | None:
    folder = model_config_dir(name, revision)
    if folder is None:
        return None
    try:
        dims = read_model_info(folder).dims()
    except PairingError:
        return None
    return dims if "n_layers" in dims and "d_model" in dims else None


def known_model_dims(cfg: PairedRunnerConfig) -> dict[str, int] | None:
    """The base model's dimensions (``n_layers``, ``d_model``, ``d_mlp``, ``d_vocab``,
    ``n_ctx``) if known without loading weights or using the network: the organism's
    ``config.json``, the smoke-test spec, the base model's ``config.json`` (a local folder or
    the Hugging Face cache), or else the built-in table of recipe models."""
    if cfg.organism is not None:
        return dict(organism_info(cfg.organism).dims)
    s = cfg.smoke_test_models
    if s is not None:
        return {
            "n_layers": s.n_layers,
            "d_model": s.d_model,
            "d_mlp": 4 * s.d_model,
            "d_vocab": s.d_vocab,
        }
    name = cfg.base_model_name
    dims = _config_dims(name)
    if dims is not None:
        return dims
    if name in KNOWN_MODEL_DIMS:
        return dict(KNOWN_MODEL_DIMS[name])
    return None


__all__ = [
    "KNOWN_MODEL_DIMS",
    "OrganismInfo",
    "check_hook_d_in",
    "known_model_dims",
    "model_config_dir",
    "organism_info",
]
