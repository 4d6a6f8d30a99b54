"""Data for the training runner: the models and the run's one data provider.

The provider is ``sae_diff.data.store.PairedActivationsStore`` (:func:`training_store`), the
same store the README, the tutorials and the demo use:

- with ``cfg.cache_path``: read from that ``sae_diff.data.cache`` cache (harvested first with
  :func:`harvest` when missing; stored in ``cache_dtype``);
- without: on the fly from the models, with no disk cache (the training rows are harvested
  shard by shard into the store's shuffling buffer).

Both paths select the same tokens: the masks of :func:`mask_config` applied to shards built
by the harvest's batches (``tests/test_pipeline.py`` checks it token for token). Both resume
exactly from the store's ``state_dict`` (the data order is a function of the seed and the
step). The held-out evaluation rows are the rows after the training rows of the same token
stream (:func:`heldout_data`).

Organism configs (``cfg.organism``) load the bundled pair with
``sae_diff.organisms.load_organism`` and, unless a dataset is configured, read its
pretraining text + chat mixture (``sae_diff.training.tokens.organism_datasets``).

Which token rows a run reads (datasets, row counts, the token source) is
:mod:`sae_diff.training.tokens`; the names that moved there still resolve here, with a
``DeprecationWarning``, for one release.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from sae_lens.util import str_to_dtype
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_diff import organisms, process_group
from sae_diff.data.cache import check_config_cache
from sae_diff.data.harvest import harvest_cache
from sae_diff.data.harvest_summary import HarvestSummary
from sae_diff.data.store import PairedActivationsStore, model_shards, shard_keep
from sae_diff.moved import moved_names, to
from sae_diff.pairing.masks import MaskConfig
from sae_diff.pairing.model import PairedModel
from sae_diff.training.config import PairedRunnerConfig, SmokeTestModels
from sae_diff.training.errors import ConfigError, TrainingDataError
from sae_diff.training.model_info import check_hook_d_in
from sae_diff.training.tokens import (
    check_dataset_column,
    run_token_rows,
    token_source,
    train_rows,
)


# ---------------------------------------------------------------------- models
def build_smoke_test_pair(
    spec: SmokeTestModels, ft_name: str = "smoke-ft", base_name: str = "smoke-base"
) -> PairedModel:
    """A tiny random ``PairedModel`` from :class:`~sae_diff.training.config.SmokeTestModels`."""
    tl_cfg = HookedTransformerConfig(
        n_layers=spec.n_layers,
        d_model=spec.d_model,
        n_ctx=spec.n_ctx,
        n_heads=spec.n_heads,
        d_head=spec.d_model // spec.n_heads,
        d_mlp=4 * spec.d_model,
        d_vocab=spec.d_vocab,
        act_fn="gelu",
        normalization_type="LN",
        device="cpu",
        seed=spec.seed,
    )
    rng_state = torch.get_rng_state()
    try:
        torch.manual_seed(spec.seed)
        base = HookedTransformer(tl_cfg)
        ft = HookedTransformer(copy.deepcopy(tl_cfg))
        g = torch.Generator().manual_seed(spec.seed + 1)
        with torch.no_grad():
            state = {}
            for k, v in base.state_dict().items():
                if v.is_floating_point() and "IGNORE" not in k and "mask" not in k:
                    scale = (
                        v.std().nan_to_num(1.0).clamp_min(0.02)
                        if v.numel() > 1
                        else torch.tensor(0.02)
                    )
                    v = v + spec.noise * scale * torch.randn(v.shape, generator=g)
                state[k] = v
            ft.load_state_dict(state)
    finally:
        torch.set_rng_state(rng_state)  # building models must not shift the run's RNG stream
    base.eval()
    ft.eval()
    return PairedModel(base, ft, base_name=base_name, ft_name=ft_name, check=False)


def load_pair(cfg: PairedRunnerConfig) -> PairedModel:
    """The run's ``PairedModel``: smoke-test models, the bundled organism
    (``load_organism(cfg.organism).paired()``, float32, names from the config), or
    ``PairedModel.from_pretrained``.

    Under ``torchrun`` the process group is joined first, which makes ``device: cuda`` this
    process's GPU (``cuda:LOCAL_RANK``) before any weight is loaded."""
    process_group.init(cfg.llm_device or cfg.device)
    if cfg.organism is not None:
        # through the module, so a test's patch of sae_diff.organisms.load_organism applies
        organism = organisms.load_organism(cfg.organism, device=cfg.llm_device or cfg.device)
        return organism.paired(base_name=cfg.base_model_name, ft_name=cfg.model_name)
    if cfg.smoke_test_models is not None:
        return build_smoke_test_pair(
            cfg.smoke_test_models,
            ft_name=cfg.model_name,
            base_name=cfg.base_model_name or "smoke-base",
        )
    kwargs = dict(cfg.base_model_from_pretrained_kwargs or cfg.model_from_pretrained_kwargs or {})
    return PairedModel.from_pretrained(
        cfg.base_model_name,
        cfg.model_name,
        device=cfg.llm_device or cfg.device,
        dtype=str_to_dtype(cfg.dtype),
        hf_model_path_or_local_dir=cfg.ft_weights_path,
        backend=cfg.model_backend,
        **kwargs,  # type: ignore[arg-type]
    )


def check_pair_matches(cfg: PairedRunnerConfig, pair: PairedModel) -> None:
    """After loading: the hook exists and ``sae.d_in`` is its width (clear error otherwise)."""
    dims = {"n_layers": int(pair.n_layers), "d_model": int(pair.d_model)}
    d_mlp = getattr(pair.base.cfg, "d_mlp", None)
    if d_mlp:
        dims["d_mlp"] = int(d_mlp)
    check_hook_d_in(cfg.hook_name, cfg.sae.d_in, dims)
    try:
        pair.validate_hooks([cfg.hook_name])
    except Exception as e:
        raise ConfigError(f"hook_name {cfg.hook_name!r} is not a hook of these models: {e}") from e


# ---------------------------------------------------------------------- the data provider
def mask_config(cfg: PairedRunnerConfig) -> MaskConfig:
    """The ``sae_diff.pairing.masks.MaskConfig`` equivalent of the run's mask fields (the one
    place a run's token selection is defined; the cache and on-the-fly paths both use it).

    Smoke-test models have no tokenizer, so their BOS position is masked as "first 1"."""
    first_n = cfg.mask_first_n
    if cfg.smoke_test_models is not None and cfg.mask_bos and cfg.prepend_bos is not False:
        first_n = max(first_n, 1)
    return MaskConfig(
        exclude_bos=cfg.mask_bos,
        exclude_high_norm=cfg.mask_high_norm is not None,
        high_norm_ratio=cfg.mask_high_norm or 10.0,
        first_n=first_n,
        exclude_special=bool(cfg.exclude_special_tokens),
    )


def storage_dtype(cfg: PairedRunnerConfig) -> str:
    """Dtype activations are stored in, on disk and in the on-the-fly buffer:
    ``cache_dtype``, else the models' ``dtype``."""
    return str(cfg.cache_dtype or cfg.dtype)


def harvest(
    cfg: PairedRunnerConfig,
    pair: PairedModel | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> HarvestSummary:
    """Harvest ``cfg.cache_path`` (the training rows) with
    ``sae_diff.data.harvest.harvest_cache``; resumes an unfinished harvest. Returns its summary."""
    if cfg.cache_path is None:
        raise TrainingDataError("cache_path is not set: nowhere to harvest to.")
    check_dataset_column(cfg)
    pair = pair if pair is not None else load_pair(cfg)
    check_pair_matches(cfg, pair)
    n_rows = train_rows(cfg)
    return harvest_cache(
        pair,
        token_source(cfg, pair),
        cfg.cache_path,
        cfg.hook_name,
        batch_size=cfg.store_batch_size_prompts,
        rows_per_shard=cfg.cache_rows_per_shard,
        dtype=storage_dtype(cfg),
        mask_config=mask_config(cfg),
        max_rows=n_rows,
        overwrite=overwrite,
        progress=progress,
        verbose=progress,
    )


def cache_exists(cfg: PairedRunnerConfig) -> bool:
    """Whether ``cfg.cache_path`` holds a finished cache."""
    if cfg.cache_path is None:
        return False
    manifest = Path(cfg.cache_path) / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return bool(json.loads(manifest.read_text()).get("complete"))
    except ValueError:
        return False


def training_store(
    cfg: PairedRunnerConfig, pair: PairedModel | None = None, *, loop: bool = True
) -> PairedActivationsStore:
    """The run's data provider, a ``sae_diff.data.store.PairedActivationsStore``.

    With ``cache_path``: read from the cache (harvested first when missing; needs ``pair``
    then). Without: on the fly from ``pair``, with no disk cache, harvesting the training rows
    shard by shard into the shuffling buffer. Both select the same tokens
    (:func:`mask_config`, the harvest's shards) and shuffle in windows of at least
    ``n_batches_in_buffer`` batches, seeded by ``seed``.
    """
    common: dict[str, Any] = {
        "mode": cfg.store_mode,
        "diff_sign": str(getattr(cfg.sae, "diff_sign", "ft_minus_base")),
        "batch_size": cfg.train_batch_size_tokens,
        "buffer_size": max(cfg.n_batches_in_buffer, 1) * cfg.train_batch_size_tokens,
        "seed": cfg.seed,
        "loop": loop,
    }
    if cfg.cache_path is not None:
        check_config_cache(
            cfg, pair=pair
        )  # a cache of another setup is refused, listing every mismatch
        if not cache_exists(cfg):
            if pair is None:
                raise TrainingDataError(
                    f"no finished cache at {cfg.cache_path} and no models to harvest it with."
                )
            harvest(cfg, pair)
        return PairedActivationsStore.from_cache(
            cfg.cache_path, mask_config=mask_config(cfg), **common
        )
    if pair is None:
        raise TrainingDataError(
            "training without cache_path harvests on the fly and needs the models."
        )
    return PairedActivationsStore.from_model(
        pair,
        token_source(cfg, pair),
        cfg.hook_name,
        store_batch_size_prompts=cfg.store_batch_size_prompts,
        mask_config=mask_config(cfg),
        rows_per_shard=cfg.cache_rows_per_shard,
        storage_dtype=storage_dtype(cfg),
        stop_row=train_rows(cfg),
        **common,
    )


def heldout_data(
    cfg: PairedRunnerConfig, pair: PairedModel
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Held-out evaluation data: the rows after the training rows, through the same shards
    and masks as training. Returns kept paired activations ``(N, 2, d)`` (float32), the
    rows' tokens ``(n_rows, ctx)`` and their keep-mask ``(n_rows, ctx)``."""
    n_eval_rows = run_token_rows(cfg) - train_rows(cfg)
    start = train_rows(cfg)
    acts, toks, keeps = [], [], []
    mc = mask_config(cfg)
    for shard in model_shards(
        pair,
        token_source(cfg, pair),
        cfg.hook_name,
        batch_size=cfg.store_batch_size_prompts,
        rows_per_shard=cfg.cache_rows_per_shard,
        mask_config=mc,
        dtype=storage_dtype(cfg),
        start_row=start,
        stop_row=start + n_eval_rows,
    ):
        keep = shard_keep(shard, mc)
        acts.append(shard["acts"][keep].float())
        toks.append(shard["tokens"])
        keeps.append(keep)
    if not acts or sum(a.shape[0] for a in acts) == 0:
        raise TrainingDataError(
            f"No held-out activations: the data has no tokens after its {start} training rows, or every "
            "held-out token is masked. Lower training_tokens or add data."
        )
    return torch.cat(acts), torch.cat(toks), torch.cat(keeps)


def cache_eval_sample(cfg: PairedRunnerConfig, n_tokens: int) -> torch.Tensor:
    """``n_tokens`` kept paired activations (float32) from ``cfg.cache_path``, shards in an
    order seeded apart from training's (for runs with the cache and no models: not held out)."""
    assert cfg.cache_path is not None
    store = PairedActivationsStore.from_cache(
        cfg.cache_path,
        mask_config=mask_config(cfg),
        seed=cfg.seed + 10_007,
        batch_size=1,
        buffer_size=1,
        loop=False,
    )
    blocks, n = [], 0
    for block in store.kept_blocks(0):
        blocks.append(block.float())
        n += block.shape[0]
        if n >= n_tokens:
            break
    if n == 0:
        raise TrainingDataError(
            f"every token of the cache {cfg.cache_path} is masked out; loosen the masks."
        )
    return torch.cat(blocks)[:n_tokens]


#: name -> module it moved to (one release; see sae_diff.moved)
__getattr__ = moved_names(
    __name__,
    to(
        "sae_diff.training.tokens",
        (
            "dataset_specs",
            "uses_organism_data",
            "organism_datasets",
            "smoke_test_tokens",
            "effective_prepend_bos",
        ),
    ),
)


__all__ = [
    "TrainingDataError",
    "build_smoke_test_pair",
    "cache_eval_sample",
    "cache_exists",
    "check_dataset_column",
    "check_pair_matches",
    "harvest",
    "heldout_data",
    "load_pair",
    "mask_config",
    "run_token_rows",
    "storage_dtype",
    "token_source",
    "train_rows",
    "training_store",
]
