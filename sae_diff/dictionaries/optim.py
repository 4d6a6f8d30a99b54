"""Adam for dictionary training: SAELens's optimiser, with ``fused=True`` where supported.

Separate from the sparse kernels (:mod:`sae_diff.dictionaries.kernels` re-exports it) because
it is an optimiser choice used by the runner for every architecture, sparse or not.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fused_adam_supported", "make_adam"]


def fused_adam_supported(device: torch.device | str) -> bool:
    """Whether ``torch.optim.Adam(..., fused=True)`` works for float32 params on ``device``."""
    dev = torch.device(device)
    try:
        p = torch.nn.Parameter(torch.zeros(2, device=dev))
        p.grad = torch.ones(2, device=dev)
        torch.optim.Adam([p], lr=1e-3, fused=True).step()
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def make_adam(
    params: list[torch.nn.Parameter] | list[Tensor],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    *,
    fused: bool | None = None,
) -> torch.optim.Adam:
    """Adam as SAELens's ``SAETrainer`` builds it, but ``fused=True`` where supported.

    SAELens 6 constructs ``torch.optim.Adam(params, lr, betas)`` with default flags, which on
    CPU is the single-tensor for-loop implementation; the fused kernel (CPU since torch 2.4,
    CUDA) does one vectorised pass per parameter and is numerically the same algorithm.
    """
    params = list(params)
    if fused is None:
        dev = params[0].device if params else torch.device("cpu")
        fused = fused_adam_supported(dev) and all(
            p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) for p in params
        )
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=bool(fused))
