"""Data for the training runner: models, tokens and a *resumable* activation provider.

``SAETrainer`` consumes any iterator of activation batches (its ``data_provider``). Exact
resume needs the provider to restart at sample n. :class:`ResumableProvider` wraps any
deterministic batch iterator, counts the batches drawn (norm estimation included) and, on
resume, positions a fresh one: through the iterator's own ``load_state_dict`` /
``skip_batches`` when it has them (``sae_diff.data``'s cache reader), else by drawing and
discarding (exact for any seeded iterator, at the cost of recomputing them).

Organism configs (``cfg.organism``) load the bundled pair with
``sae_diff.organisms.load_organism`` and, unless a dataset is configured, read its
pretraining text + chat mixture (:func:`organism_datasets`).

Sources, in order of preference:

1. ``cfg.cache_path``: ``sae_diff.data.cache`` (harvested first when missing);
2. ``sae_diff.data.store.PairedActivationsStore`` harvesting on the fly;
3. an in-memory harvest (:class:`TensorBatchProvider`), used by smoke tests and whenever
   ``sae_diff.data`` is unavailable: paired activations for the run's tokens, masked, held in
   memory and served in seeded shuffled epochs.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from sae_diff.errors import SaeDiffError
from sae_diff.training.config import PairedRunnerConfig


class TrainingDataError(SaeDiffError, RuntimeError):
    """The run's data cannot be built (missing dataset column, empty data, ...)."""


# ---------------------------------------------------------------------- models
def build_smoke_test_pair(spec: Any, ft_name: str = "smoke-ft", base_name: str = "smoke-base") -> Any:
    """A tiny random ``PairedModel`` from :class:`~sae_diff.training.config.SmokeTestModels`."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from sae_diff.pairing.model import PairedModel

    tl_cfg = HookedTransformerConfig(
        n_layers=spec.n_layers, d_model=spec.d_model, n_ctx=spec.n_ctx, n_heads=spec.n_heads,
        d_head=spec.d_model // spec.n_heads, d_mlp=4 * spec.d_model, d_vocab=spec.d_vocab,
        act_fn="gelu", normalization_type="LN", device="cpu", seed=spec.seed,
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
                    scale = v.std().nan_to_num(1.0).clamp_min(0.02) if v.numel() > 1 else torch.tensor(0.02)
                    v = v + spec.noise * scale * torch.randn(v.shape, generator=g)
                state[k] = v
            ft.load_state_dict(state)
    finally:
        torch.set_rng_state(rng_state)  # building models must not shift the run's RNG stream
    base.eval()
    ft.eval()
    return PairedModel(base, ft, base_name=base_name, ft_name=ft_name, check=False)


def load_pair(cfg: PairedRunnerConfig) -> Any:
    """The run's ``PairedModel``: smoke-test models, the bundled organism
    (``load_organism(cfg.organism).paired()``, float32, names from the config), or
    ``PairedModel.from_pretrained``."""
    if cfg.organism is not None:
        from sae_diff.organisms import load_organism

        organism = load_organism(cfg.organism, device=cfg.llm_device or cfg.device)
        return organism.paired(base_name=cfg.base_model_name, ft_name=cfg.model_name)
    if cfg.smoke_test_models is not None:
        return build_smoke_test_pair(cfg.smoke_test_models, ft_name=cfg.model_name,
                                     base_name=cfg.base_model_name or "smoke-base")
    from sae_lens.util import str_to_dtype

    from sae_diff.pairing.model import PairedModel

    kwargs = dict(cfg.base_model_from_pretrained_kwargs or cfg.model_from_pretrained_kwargs or {})
    return PairedModel.from_pretrained(
        cfg.base_model_name, cfg.model_name, device=cfg.llm_device or cfg.device,
        dtype=str_to_dtype(cfg.dtype), hf_model_path_or_local_dir=cfg.ft_weights_path,
        backend=cfg.model_backend, **kwargs,  # type: ignore[arg-type]
    )


def check_pair_matches(cfg: PairedRunnerConfig, pair: Any) -> None:
    """After loading: the hook exists and ``sae.d_in`` is its width (clear error otherwise)."""
    from sae_diff.training.config import ConfigError, check_hook_d_in

    dims = {"n_layers": int(pair.n_layers), "d_model": int(pair.d_model)}
    d_mlp = getattr(pair.base.cfg, "d_mlp", None)
    if d_mlp:
        dims["d_mlp"] = int(d_mlp)
    check_hook_d_in(cfg.hook_name, cfg.sae.d_in, dims)
    try:
        pair.validate_hooks([cfg.hook_name])
    except Exception as e:
        raise ConfigError(f"hook_name {cfg.hook_name!r} is not a hook of these models: {e}") from e


# ---------------------------------------------------------------------- tokens
def dataset_specs(cfg: PairedRunnerConfig) -> list[Any]:
    """The run's datasets as ``sae_diff.data.sources.DatasetSpec`` s (empty for smoke tests)."""
    from sae_diff.data.sources import DatasetSpec

    if cfg.dataset_mixture:
        return [DatasetSpec(**spec) for spec in cfg.dataset_mixture]
    if cfg.dataset_path:
        return [DatasetSpec(cfg.dataset_path, column=cfg.dataset_column, split=cfg.dataset_split,
                            streaming=cfg.streaming)]
    return []


def uses_organism_data(cfg: PairedRunnerConfig) -> bool:
    """Whether the run reads the organism's own corpus (an organism and no dataset set)."""
    return cfg.organism is not None and not (cfg.dataset_path or cfg.dataset_mixture)


def run_token_rows(cfg: PairedRunnerConfig) -> int:
    """Rows of ``context_size`` tokens a run reads: the training rows, then the held-out
    evaluation rows after them."""
    n_train = -(-cfg.training_tokens // cfg.context_size)
    n_eval = max(cfg.n_eval_batches, 1) * (cfg.eval_batch_size_prompts or cfg.store_batch_size_prompts)
    return n_train + n_eval


@functools.lru_cache(maxsize=4)
def _organism_corpus(organism: str, chat_share: float, n_documents: int | None,
                     n_tokens: int) -> tuple[tuple[Any, ...], tuple[float, ...]]:
    from sae_diff.data.sources import iter_documents
    from sae_diff.organisms import chat_dataset, load_tokenizer, pretraining_dataset
    from sae_diff.organisms.organism import organism_dir

    path = organism_dir(organism)
    if not (path / "world.json").is_file():  # a custom organism: its examples, no world corpus
        raise TrainingDataError(
            f"organism {organism!r} has no world.json, so no pretraining corpus to train on; set "
            "dataset_path or dataset_mixture to the data to use."
        )
    tokenizer = load_tokenizer(path)
    kinds = [(kind, share) for kind, share in (("text", 1.0 - chat_share), ("chat", chat_share)) if share > 0]
    datasets: list[Any] = []
    for kind, share in kinds:
        make = pretraining_dataset if kind == "text" else chat_dataset
        n = n_documents
        if n is None:  # enough documents for this kind's share of the tokens, with a 2x margin
            lengths = [len(doc) for doc in iter_documents(make("train", 64, name=path), tokenizer)]
            mean = max(sum(lengths) / max(len(lengths), 1), 1.0)
            n = int(math.ceil(2.0 * share * n_tokens / mean)) + 64
        datasets.append(make("train", n, name=path))
    return tuple(datasets), tuple(share for _, share in kinds)


def organism_datasets(cfg: PairedRunnerConfig) -> tuple[list[Any], list[float]]:
    """The organism's training corpus as HF datasets and their token shares: pretraining
    documents (``text``) and chat conversations (``messages``) of its ``train`` split, mixed
    ``1 - organism_chat_share`` / ``organism_chat_share`` by tokens.

    The same datasets (cached) serve training and evaluation, so the held-out rows are the
    rows after the training rows of one stream.
    """
    if cfg.organism is None:
        raise TrainingDataError("organism_datasets needs cfg.organism.")
    n_tokens = run_token_rows(cfg) * cfg.context_size
    ds, shares = _organism_corpus(str(cfg.organism), float(cfg.organism_chat_share), cfg.organism_n_documents,
                                  n_tokens)
    return list(ds), list(shares)


def check_dataset_column(cfg: PairedRunnerConfig) -> None:
    """Peek at each dataset's first row (no model needed).

    Raises :class:`TrainingDataError` naming the available columns when the configured column
    (or, if unset, any text / tokens / chat column) is missing.
    """
    from sae_diff.data.sources import CHAT_COLUMNS, TEXT_COLUMNS, TOKEN_COLUMNS, load_rows

    for spec in dataset_specs(cfg):
        try:
            row = next(iter(load_rows(spec)), None)
        except FileNotFoundError as e:
            raise TrainingDataError(f"dataset {spec.path!r} cannot be read: {e}") from e
        if row is None:
            raise TrainingDataError(f"dataset {spec.path!r} (split {spec.split!r}) is empty.")
        cols = list(row.keys())
        if spec.column is not None:
            if spec.column not in row:
                raise TrainingDataError(
                    f"dataset {spec.path!r} has no column {spec.column!r}; its columns are {cols}. "
                    "Set dataset_column (or the mixture entry's `column`) to one of them."
                )
        elif not any(c in row for c in (*TOKEN_COLUMNS, *CHAT_COLUMNS, *TEXT_COLUMNS)):
            raise TrainingDataError(
                f"dataset {spec.path!r} has no text, tokens or chat column (it has {cols}). "
                "Set dataset_column."
            )


def smoke_test_tokens(cfg: PairedRunnerConfig, n_seqs: int, offset: int = 0) -> torch.Tensor:
    """Random tokens for the smoke-test pair (seeded; ``offset`` picks a disjoint stream)."""
    spec = cfg.smoke_test_models
    assert spec is not None
    g = torch.Generator().manual_seed(spec.seed * 1_000_003 + 7 + offset)
    toks = torch.randint(1, spec.d_vocab, (n_seqs, cfg.context_size), generator=g)
    if cfg.prepend_bos:
        toks[:, 0] = 0
    return toks


def token_batches(cfg: PairedRunnerConfig, pair: Any, n_tokens: int, offset_seqs: int = 0) -> Iterator[torch.Tensor]:
    """``(batch, context_size)`` token batches covering about ``n_tokens`` tokens.

    Smoke-test configs get random tokens; datasets are read by ``sae_diff.data.sources``
    (text, pre-tokenised or chat columns; packed rows starting with BOS).
    """
    bs = cfg.store_batch_size_prompts
    n_seqs = max(1, -(-n_tokens // cfg.context_size))
    if not dataset_specs(cfg) and not uses_organism_data(cfg):
        toks = smoke_test_tokens(cfg, n_seqs, offset=offset_seqs)
        yield from toks.split(bs)
        return
    check_dataset_column(cfg)
    source = token_source(cfg, pair, n_seqs)
    for batch in source.batches(bs, start_row=offset_seqs, stop_row=offset_seqs + n_seqs):
        yield batch.tokens


# ---------------------------------------------------------------------- masks and modes
def token_mask(cfg: PairedRunnerConfig, acts: torch.Tensor) -> torch.Tensor:
    """Keep-mask ``(batch, seq)`` for paired activations ``(batch, seq, 2, d)``: BOS, first n
    positions and tokens whose norm exceeds ``mask_high_norm`` x the median (either model)."""
    keep = torch.ones(acts.shape[:2], dtype=torch.bool, device=acts.device)
    first = max(cfg.mask_first_n, 1 if (cfg.mask_bos and cfg.prepend_bos) else 0)
    keep[:, :first] = False
    if cfg.mask_high_norm is not None:
        norms = acts.float().norm(dim=-1)  # (batch, seq, 2)
        ref = norms[keep] if keep.any() else norms.reshape(-1, norms.shape[-1])
        median = ref.median(dim=0).values
        keep &= ~(norms > cfg.mask_high_norm * median).any(-1)
    return keep


@torch.no_grad()
def harvest_in_memory(cfg: PairedRunnerConfig, pair: Any, n_tokens: int, offset_seqs: int = 0,
                      return_tokens: bool = False) -> Any:
    """Masked paired activations ``(N, 2, d)`` for about ``n_tokens`` tokens (raw, unscaled).

    With ``return_tokens`` also returns the ``(n_seqs, ctx)`` tokens and the ``(n_seqs, ctx)``
    keep-mask (for the loss-recovered evaluation).
    """
    from tqdm.auto import tqdm

    out, all_toks, all_keep = [], [], []
    total = 0
    bar = tqdm(total=n_tokens, desc="Harvesting paired activations", leave=False, disable=n_tokens < 50_000)
    for toks in token_batches(cfg, pair, n_tokens, offset_seqs=offset_seqs):
        acts = pair.paired_activations(toks, [cfg.hook_name])[cfg.hook_name].to(cfg.act_store_device or "cpu")
        keep = token_mask(cfg, acts)
        kept = acts[keep].to(torch.float32)
        out.append(kept)
        all_toks.append(toks)
        all_keep.append(keep.cpu())
        total += toks.numel()
        bar.update(toks.numel())
        if total >= n_tokens:
            break
    bar.close()
    if not out or sum(o.shape[0] for o in out) == 0:
        raise TrainingDataError("No activations were harvested (empty dataset, or every token masked).")
    acts_all = torch.cat(out)
    if return_tokens:
        return acts_all, torch.cat(all_toks), torch.cat(all_keep)
    return acts_all


class TensorBatchProvider(Iterator[torch.Tensor]):
    """Batches from an in-memory ``(N, ...)`` tensor in seeded, reshuffled epochs.

    Deterministic given ``seed``; :meth:`skip_batches` jumps to batch n without computing
    anything, so resumed runs see exactly the batches an uninterrupted run would.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int, transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if data.shape[0] < batch_size:
            raise TrainingDataError(
                f"Only {data.shape[0]} activations for batches of {batch_size}: harvest more tokens "
                "or lower train_batch_size_tokens."
            )
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.transform = transform
        self.per_epoch = data.shape[0] // batch_size
        self.n_batches = 0
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _perm_for(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perm = torch.randperm(self.data.shape[0], generator=g)
            self._epoch = epoch
        return self._perm

    def __iter__(self) -> TensorBatchProvider:
        return self

    def __next__(self) -> torch.Tensor:
        epoch, i = divmod(self.n_batches, self.per_epoch)
        idx = self._perm_for(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        self.n_batches += 1
        batch = self.data[idx]
        return self.transform(batch) if self.transform is not None else batch

    def skip_batches(self, n: int) -> None:
        """Advance by ``n`` batches without producing them."""
        self.n_batches += n


class ResumableProvider(Iterator[torch.Tensor]):
    """Counts the batches drawn from ``source`` and restores that position on resume."""

    def __init__(self, source: Iterator[torch.Tensor]):
        self.source = source
        self.n_batches = 0

    def __iter__(self) -> ResumableProvider:
        return self

    def __next__(self) -> torch.Tensor:
        batch = next(self.source)
        self.n_batches += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"n_batches": self.n_batches}
        inner = getattr(self.source, "state_dict", None)
        if callable(inner):
            state["source"] = inner()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Position a *fresh* source at ``state['n_batches']``."""
        n = int(state["n_batches"])
        if self.n_batches:
            raise RuntimeError("load_state_dict needs a fresh provider (no batch drawn yet).")
        load = getattr(self.source, "load_state_dict", None)
        skip = getattr(self.source, "skip_batches", None)
        if "source" in state and callable(load):
            load(state["source"])
        elif callable(skip):
            skip(n)
        else:
            for _ in range(n):
                next(self.source)
        self.n_batches = n


# ---------------------------------------------------------------------- disk cache
def mask_config(cfg: PairedRunnerConfig) -> Any:
    """The ``sae_diff.pairing.masks.MaskConfig`` equivalent of the run's mask fields.

    Smoke-test models have no tokenizer, so their BOS position is masked as "first 1"."""
    from sae_diff.pairing.masks import MaskConfig

    first_n = cfg.mask_first_n
    if cfg.smoke_test_models is not None and cfg.mask_bos and cfg.prepend_bos:
        first_n = max(first_n, 1)
    return MaskConfig(exclude_bos=cfg.mask_bos, exclude_high_norm=cfg.mask_high_norm is not None,
                      high_norm_ratio=cfg.mask_high_norm or 10.0, first_n=first_n,
                      exclude_special=bool(cfg.exclude_special_tokens))


def token_source(cfg: PairedRunnerConfig, pair: Any, n_rows: int) -> Any:
    """The run's token rows as a ``sae_diff.data.sources`` source (for harvesting)."""
    from sae_diff.data.sources import TensorTokenSource, TokenSource

    if uses_organism_data(cfg):
        datasets, shares = organism_datasets(cfg)
        return TokenSource(datasets, pair.tokenizer, cfg.context_size, proportions=shares,
                           prepend_bos=cfg.prepend_bos)
    specs = dataset_specs(cfg)
    if not specs:
        return TensorTokenSource(smoke_test_tokens(cfg, n_rows), name="smoke-test random tokens")
    return TokenSource(specs, pair.tokenizer, cfg.context_size, prepend_bos=cfg.prepend_bos)


def harvest(cfg: PairedRunnerConfig, pair: Any = None, overwrite: bool = False, progress: bool = True) -> Any:
    """Harvest ``cfg.cache_path`` (enough rows for ``training_tokens``) with
    ``sae_diff.data.harvest.harvest_cache``; resumes an unfinished harvest. Returns its summary."""
    from sae_diff.data.harvest import harvest_cache

    if cfg.cache_path is None:
        raise TrainingDataError("cache_path is not set: nowhere to harvest to.")
    check_dataset_column(cfg)
    pair = pair if pair is not None else load_pair(cfg)
    check_pair_matches(cfg, pair)
    n_rows = -(-cfg.training_tokens // cfg.context_size)
    return harvest_cache(pair, token_source(cfg, pair, n_rows), cfg.cache_path, cfg.hook_name,
                         batch_size=cfg.store_batch_size_prompts, dtype=cfg.dtype, mask_config=mask_config(cfg),
                         max_rows=n_rows, overwrite=overwrite, progress=progress, verbose=progress)


def cache_exists(cfg: PairedRunnerConfig) -> bool:
    """Whether ``cfg.cache_path`` holds a finished cache."""
    from pathlib import Path

    if cfg.cache_path is None:
        return False
    manifest = Path(cfg.cache_path) / "manifest.json"
    if not manifest.is_file():
        return False
    import json

    try:
        return bool(json.loads(manifest.read_text()).get("complete"))
    except ValueError:
        return False


class CacheBatchProvider(Iterator[torch.Tensor]):
    """Training batches from a ``sae_diff.data.cache.ActivationCache``, forever.

    Epoch e reads the cache's blocks in the order seeded by ``seed + e``, pools
    ``buffer_batches`` batches' worth of tokens, shuffles the pool with a seeded generator and
    serves it; the tail that does not fill a batch carries over. Fully deterministic given the
    seed, so ``ResumableProvider`` resumes it exactly (by re-reading, no forward passes).
    """

    def __init__(self, cache: Any, batch_size: int, seed: int, mask_config: Any = None, buffer_batches: int = 16,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if cache.n_tokens < batch_size:
            raise TrainingDataError(f"The cache holds {cache.n_tokens} tokens, fewer than one batch ({batch_size}).")
        self.cache = cache
        self.batch_size = batch_size
        self.seed = seed
        self.mask_config = mask_config
        self.buffer_tokens = batch_size * buffer_batches
        self.transform = transform
        self._gen = self._generate()

    def _blocks(self) -> Iterator[torch.Tensor]:
        epoch = 0
        while True:
            n = 0
            for block in self.cache.iter_blocks(mask_config=self.mask_config, shuffle=True, seed=self.seed + epoch):
                n += block.shape[0]
                yield block
            if n == 0:
                raise TrainingDataError("Every token of the cache is masked out; loosen the masks.")
            epoch += 1

    def _generate(self) -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        pool: list[torch.Tensor] = []
        carry = torch.empty(0)
        pooled = 0
        for block in self._blocks():
            pool.append(block.float())
            pooled += block.shape[0]
            if pooled < self.buffer_tokens:
                continue
            buf = torch.cat([carry, *pool]) if carry.numel() else torch.cat(pool)
            buf = buf[torch.randperm(buf.shape[0], generator=g)]
            n_full = buf.shape[0] // self.batch_size
            for i in range(n_full):
                yield buf[i * self.batch_size:(i + 1) * self.batch_size]
            carry = buf[n_full * self.batch_size:]
            pool, pooled = [], carry.shape[0]

    def __iter__(self) -> CacheBatchProvider:
        return self

    def __next__(self) -> torch.Tensor:
        batch = next(self._gen)
        return self.transform(batch) if self.transform is not None else batch


def optional_module(name: str) -> Any | None:
    """Import ``name`` if it exists (other parts of sae_diff may not be installed yet)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


__all__ = [
    "CacheBatchProvider",
    "ResumableProvider",
    "TensorBatchProvider",
    "TrainingDataError",
    "build_smoke_test_pair",
    "cache_exists",
    "check_dataset_column",
    "check_pair_matches",
    "dataset_specs",
    "harvest",
    "harvest_in_memory",
    "load_pair",
    "mask_config",
    "smoke_test_tokens",
    "token_batches",
    "token_source",
    "token_mask",
]
