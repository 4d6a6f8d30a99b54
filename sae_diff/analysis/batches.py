"""The batch protocol every analysis pass reads.

Analysis functions (Latent Scaling, the latent table, max-activating examples) take *any
iterable* of paired activation batches, so the same code runs on a
``PairedActivationsStore``, a disk-cache reader, or a plain Python list. Each item of the
iterable may be:

- a ``torch.Tensor`` shaped ``(B, n_models, d)`` (or ``(..., n_models, d)``: leading axes are
  flattened to tokens), index 0 = base, index 1 = ft;
- a tuple ``(acts, masks)`` or ``(acts, masks, meta)`` where ``masks`` maps a name to a
  boolean per-token tensor (``"template"``, ``"assistant"``, ...) and ``meta`` is a dict with
  the optional keys below;
- a ``dict`` with the key ``"acts"`` (or ``"activations"``) and the optional keys ``"masks"``,
  ``"dataset"``, ``"seq"``, ``"pos"``;
- a :class:`PairedBatch`, or any object with an ``acts`` (or ``activations``) attribute and
  optionally ``masks`` / ``dataset`` / ``seq`` / ``pos`` attributes.

Optional per-token metadata:

- ``masks``: ``dict[str, BoolTensor]`` shaped like the token axes of ``acts``; the latent table
  reports, per mask, the firing frequency inside the mask and the share of a latent's
  firings that fall inside it.
- ``dataset``: one label for the whole batch (``str``) or one per token (a sequence of
  ``str``); the table reports a firing frequency per dataset.
- ``seq`` / ``pos``: ``LongTensor`` per token, the sequence index (a row of the token table
  passed to :mod:`sae_diff.analysis.examples`) and the position in it. Only needed for
  max-activating examples.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

DATASET_MASK_PREFIX = "dataset="


@dataclass
class PairedBatch:
    """One normalised batch: ``acts`` ``(B, n_models, d)`` plus optional per-token metadata."""

    acts: torch.Tensor
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    dataset: str | list[str] | None = None
    seq: torch.Tensor | None = None
    pos: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.acts.shape[0])

    def all_masks(self) -> dict[str, torch.Tensor]:
        """Named masks plus one ``dataset=<name>`` mask per dataset label in the batch."""
        out = dict(self.masks)
        if self.dataset is None:
            return out
        if isinstance(self.dataset, str):
            out[DATASET_MASK_PREFIX + self.dataset] = torch.ones(
                self.n_tokens, dtype=torch.bool, device=self.acts.device
            )
            return out
        labels = list(self.dataset)
        for name in sorted(set(labels)):
            out[DATASET_MASK_PREFIX + name] = torch.tensor(
                [lab == name for lab in labels], dtype=torch.bool, device=self.acts.device
            )
        return out


def _flatten_tokens(
    t: torch.Tensor | None, lead: tuple[int, ...], what: str
) -> torch.Tensor | None:
    if t is None:
        return None
    t = torch.as_tensor(t)
    if tuple(t.shape) != lead:
        raise ValueError(
            f"Per-token {what} has shape {tuple(t.shape)} but the activations have token axes "
            f"{lead}: give one value per token (the activations' shape without (n_models, d))."
        )
    return t.reshape(-1)


def as_paired_batch(item: Any, n_models: int | None = None) -> PairedBatch:
    """Normalise one item of a data iterable to a :class:`PairedBatch` (see the module doc)."""
    masks: Mapping[str, Any] | None = None
    meta: Mapping[str, Any] = {}
    acts: Any
    if isinstance(item, PairedBatch):
        acts, masks = item.acts, item.masks
        meta = {"dataset": item.dataset, "seq": item.seq, "pos": item.pos}
    elif isinstance(item, torch.Tensor):
        acts = item
    elif isinstance(item, Mapping):
        acts = item.get("acts", item.get("activations"))
        masks = item.get("masks")
        meta = item
    elif (
        isinstance(item, tuple | list) and len(item) in (2, 3) and isinstance(item[0], torch.Tensor)
    ):
        acts, masks = item[0], item[1]
        meta = item[2] if len(item) == 3 else {}
    elif hasattr(item, "acts") or hasattr(item, "activations"):
        acts = getattr(item, "acts", None)
        if acts is None:
            acts = item.activations
        masks = getattr(item, "masks", None)
        meta = {k: getattr(item, k, None) for k in ("dataset", "seq", "pos")}
    else:
        raise TypeError(
            f"Cannot read a paired activation batch from a {type(item).__name__}. Yield tensors "
            "(B, 2, d), (acts, masks) tuples, dicts with an 'acts' key, or PairedBatch objects."
        )
    if not isinstance(acts, torch.Tensor) or acts.ndim < 2:
        raise ValueError(
            "Each batch needs paired activations shaped (B, n_models, d) with index 0 = base and "
            f"1 = ft; got {type(acts).__name__} {tuple(getattr(acts, 'shape', ()))}."
        )
    if n_models is not None and acts.shape[-2] != n_models:
        raise ValueError(
            f"Expected paired activations with n_models={n_models} on axis -2, got shape "
            f"{tuple(acts.shape)}. Stack the models with torch.stack([x_base, x_ft], dim=-2)."
        )
    lead = tuple(acts.shape[:-2])
    flat_masks: dict[str, torch.Tensor] = {}
    for name, m in (masks or {}).items():
        fm = _flatten_tokens(m, lead, f"mask {name!r}")
        assert fm is not None
        if fm.dtype != torch.bool:
            raise ValueError(f"Mask {name!r} must be a bool tensor, got {fm.dtype}.")
        flat_masks[str(name)] = fm.to(acts.device)
    dataset = meta.get("dataset")
    if dataset is not None and not isinstance(dataset, str):
        labels = list(_flatten_labels(dataset))
        if len(labels) != int(torch.Size(lead).numel()):
            raise ValueError(
                f"Got {len(labels)} dataset labels for {torch.Size(lead).numel()} tokens: "
                "give one label per token or one string for the whole batch."
            )
        dataset = labels
    return PairedBatch(
        acts=acts.reshape(-1, *acts.shape[-2:]),
        masks=flat_masks,
        dataset=dataset,
        seq=_flatten_tokens(meta.get("seq"), lead, "seq"),
        pos=_flatten_tokens(meta.get("pos"), lead, "pos"),
    )


def _head(batch: PairedBatch, n: int) -> PairedBatch:
    """The first ``n`` tokens of a batch."""
    return PairedBatch(
        acts=batch.acts[:n],
        masks={k: m[:n] for k, m in batch.masks.items()},
        dataset=batch.dataset
        if batch.dataset is None or isinstance(batch.dataset, str)
        else batch.dataset[:n],
        seq=None if batch.seq is None else batch.seq[:n],
        pos=None if batch.pos is None else batch.pos[:n],
    )


def cache_batches(
    cache: Any,
    *,
    mask_config: Any = None,
    masks: Sequence[str] | None = None,
    dataset: str | None = None,
) -> Iterator[PairedBatch]:
    """Batches (one per shard, in harvest order) from a :class:`sae_diff.data.cache_reader.ActivationCache`.

    Only the tokens ``mask_config`` keeps are yielded (``cache.keep_mask``; the default
    ``MaskConfig`` drops BOS, padding and high-norm tokens). Every stored token mask
    (``special`` = template/control tokens, ``assistant``, ...) is attached, or only those
    named in ``masks``; ``seq`` indexes the rows of ``cache.tokens()`` and ``pos`` the position,
    so max-activating examples can show their context.
    """
    row0 = 0
    for s in range(cache.n_shards):
        shard = cache.load_shard(s)
        keep = cache.keep_mask(shard, mask_config).bool()
        acts = shard["acts"]
        rows, seq_len = acts.shape[:2]
        r, p = keep.nonzero(as_tuple=True)
        named = {k[5:]: v.bool() for k, v in shard.items() if k.startswith("mask_")}
        if masks is not None:
            missing = [m for m in masks if m not in named]
            if missing:
                raise ValueError(f"The cache has no mask(s) {missing}; it stores {sorted(named)}.")
            named = {k: named[k] for k in masks}
        yield PairedBatch(
            acts=acts[keep],
            masks={k: v[keep] for k, v in named.items()},
            dataset=dataset,
            seq=r + row0,
            pos=p,
        )
        row0 += rows


def _flatten_labels(labels: Any) -> Iterator[str]:
    if isinstance(labels, str):
        yield labels
        return
    if isinstance(labels, Sequence) or hasattr(labels, "__iter__"):
        for lab in labels:
            yield from _flatten_labels(lab)
        return
    yield str(labels)


def iter_paired_batches(
    data: Iterable[Any],
    *,
    n_models: int | None = None,
    progress: bool = True,
    desc: str = "activations",
    max_tokens: int | None = None,
) -> Iterator[PairedBatch]:
    """Iterate ``data`` as :class:`PairedBatch` es, with a tqdm progress bar when ``progress``.

    ``max_tokens`` stops after that many tokens (the last batch is cut); use it with a
    looping ``PairedActivationsStore``, which never ends on its own. Raises a clear error if
    ``data`` is a single tensor (iterate a list of batches instead) or yields no tokens.
    """
    if isinstance(data, torch.Tensor):
        raise TypeError(
            "Pass an iterable of batches, not one tensor: wrap it as [acts] (one batch) or "
            "split it with acts.split(batch_size)."
        )
    total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
    iterator: Iterable[Any] = data
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(data, total=total, desc=desc, unit="batch", leave=False)
    n_tokens = 0
    for item in iterator:
        batch = as_paired_batch(item, n_models)
        if max_tokens is not None and n_tokens + batch.n_tokens > max_tokens:
            batch = _head(batch, max_tokens - n_tokens)
        n_tokens += batch.n_tokens
        if batch.n_tokens:
            yield batch
        if max_tokens is not None and n_tokens >= max_tokens:
            break
    if n_tokens == 0:
        raise ValueError(
            "The data yielded no tokens (an empty iterable, or only empty batches). Pass a "
            "non-empty store, cache reader or list of (B, 2, d) activation batches."
        )


__all__ = [
    "DATASET_MASK_PREFIX",
    "PairedBatch",
    "as_paired_batch",
    "cache_batches",
    "iter_paired_batches",
]
