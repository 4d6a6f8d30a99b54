"""Test-wide settings: offline, deterministic, one thread per worker (CI has 2 cores)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def pair(request: pytest.FixtureRequest):  # -> sae_diff.pairing.model.PairedModel
    """The tiny model pair (``helpers_models.tiny_pair``: ft = base with every weight
    perturbed) as a ``PairedModel``, built once per test module.

    A module changes it with a module-level ``TINY_PAIR`` dict: ``tiny_pair``'s keywords
    (``n_layers``, ``d_model``, ``n_ctx``, ``noise``) and ``PairedModel``'s (``base_name``,
    ``ft_name``). Default: 2 layers, ``d_model`` 16, no names.
    """
    from helpers_models import tiny_pair

    from sae_diff.pairing.model import PairedModel

    spec = dict(getattr(request.module, "TINY_PAIR", {}))
    names = {k: spec.pop(k) for k in ("base_name", "ft_name") if k in spec}
    base, ft = tiny_pair(**spec)
    return PairedModel(base, ft, **names)
