"""What a harvest records about itself (the cache meta it starts from) and reports when done;
shared by the one-process and the sharded harvest."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sae_diff.data.token_batch import RowSource
from sae_diff.pairing.masks import MaskConfig
from sae_diff.pairing.model import PairedModel


@dataclass
class HarvestSummary:
    """What a harvest did (printed as a plain summary at the end)."""

    out_dir: str
    rows: int
    tokens: int
    shards: int
    bytes: int
    seconds: float
    resumed_from_rows: int = 0

    @property
    def tokens_per_s(self) -> float:
        new_tokens = self.tokens - self.resumed_tokens
        return new_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def resumed_tokens(self) -> int:
        return int(self.resumed_from_rows * (self.tokens / self.rows)) if self.rows else 0

    def __str__(self) -> str:
        resumed = (
            f" (resumed after {self.resumed_from_rows} rows)" if self.resumed_from_rows else ""
        )
        return (
            f"harvest {self.out_dir}: {self.tokens:,} tokens in {self.rows:,} rows, "
            f"{self.shards} shards, {self.bytes / 2**20:.1f} MiB, {self.seconds:.1f} s, "
            f"{self.tokens_per_s:,.0f} tokens/s{resumed}"
        )


def harvest_meta(
    paired_model: PairedModel,
    token_source: RowSource,
    hook_name: str,
    max_rows: int | None,
    mask_config: MaskConfig,
) -> dict[str, Any]:
    """What a harvest records about itself (the writer adds dtype, width and shard size:
    :func:`~sae_diff.data.cache_format.cache_meta`)."""
    return {
        "models": paired_model.describe(),
        "hook_name": hook_name,
        "source": token_source.describe(),
        "max_rows": max_rows,
        "mask_config": asdict(mask_config),
        "is_chat": bool(getattr(token_source, "is_chat", False)),
    }


__all__ = ["HarvestSummary", "harvest_meta"]
