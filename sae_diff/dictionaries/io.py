"""Writing and rebuilding dictionaries in SAELens's on-disk format, atomically
(:mod:`sae_diff.atomic`)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.saes.sae import SAE, SAEConfig, TrainingSAE
from safetensors.torch import save_file

from sae_diff.atomic import atomic_write
from sae_diff.dictionaries.protocol import PairedDictionary
from sae_diff.dictionaries.specs import inference_class


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Deprecated alias of :func:`sae_diff.atomic.atomic_write` (``write(tmp_path)`` then an
    atomic rename over ``path``); goes in the next release."""
    warnings.warn(
        "sae_diff.dictionaries.io.atomic_write_bytes moved to sae_diff.atomic.atomic_write.",
        DeprecationWarning,
        stacklevel=2,
    )
    atomic_write(path, write)


def save_sae_files(
    path: str | Path, state_dict: dict[str, torch.Tensor], cfg_dict: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``sae_weights.safetensors`` and ``cfg.json`` (SAELens layout), each atomically."""
    path = Path(path)
    weights = path / SAE_WEIGHTS_FILENAME
    cfg_path = path / SAE_CFG_FILENAME
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(weights, lambda p: save_file(tensors, str(p)))
    atomic_write(cfg_path, lambda p: p.write_text(json.dumps(cfg_dict, indent=2, default=str)))
    return weights, cfg_path


def build_sae(cfg_dict: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> SAE[Any]:
    """Instantiate the registered inference class for ``cfg_dict['architecture']``."""
    sae_cls, cfg_cls = inference_class(cfg_dict["architecture"])
    cfg = cfg_cls.from_dict(cfg_dict)
    assert isinstance(cfg, SAEConfig)
    sae = sae_cls(cfg)
    sae.load_state_dict(state_dict)
    return sae


def inference_export(sae: TrainingSAE[Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict and config of a training dictionary's inference form (what
    ``save_inference_model`` writes): weights folded, BatchTopK thresholds set. Works for
    sae_diff's training classes and SAELens's own (``inference_config_dict`` when present)."""
    state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state)
    cfg = (
        sae.inference_config_dict()
        if hasattr(sae, "inference_config_dict")
        else sae.cfg.get_inference_sae_cfg_dict()
    )
    return state, cfg


def as_inference(sae: PairedDictionary) -> PairedDictionary:
    """The inference form of any dictionary; inference dictionaries are returned as they are."""
    if not isinstance(sae, TrainingSAE):
        return sae
    state, cfg = inference_export(sae)
    return build_sae(cfg, state).to(sae.W_dec.device)
