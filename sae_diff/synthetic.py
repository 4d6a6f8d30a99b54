"""Synthetic paired activations with planted shared / ft-only / base-only directions.

The ground truth for dictionary tests, the README example and benchmarks: each token
activates a few planted features; feature j writes ``a * u_j^b`` into the base model's
activation and ``a * u_j^c`` into the fine-tune's. Shared features have u^b = u^c,
ft-only ones u^b = 0, base-only ones u^c = 0 (the directions a dedicated-feature crosscoder's
ft- / base-dedicated latents should find), and *rotated* ones (``n_rotated``) have
cos(u^b, u^c) = ``rotation_cos``: the fine-tune turned a base direction within a plane of
its own. Gaussian noise is added per model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class PlantedPairedData:
    """Generator of ``(batch, 2, d)`` paired activations with known feature geometry.

    Attributes:
        directions: ``(n_features, 2, d)`` unit (or zero) per-model directions.
        kinds: per feature, ``"shared"``, ``"ft_only"``, ``"base_only"`` or ``"rotated"``.
    """

    directions: torch.Tensor
    kinds: list[str]
    active_per_token: float = 2.0
    noise: float = 0.01
    dtype: torch.dtype = torch.float32
    frequency: torch.Tensor | None = None

    def with_frequency(self, weights: torch.Tensor | list[float]) -> PlantedPairedData:
        """The same features under another data distribution: feature j fires with probability
        ``active_per_token * w_j / sum(w)`` (uniform when ``frequency`` is None). Stage-wise
        diffing's "ft data" is the base data with some features made more frequent."""
        w = torch.as_tensor(weights, dtype=torch.float64)
        if (
            w.shape != (self.directions.shape[0],)
            or not torch.isfinite(w).all()
            or (w < 0).any()
            or w.sum() <= 0
        ):
            raise ValueError(
                f"frequency weights must be {self.directions.shape[0]} finite non-negative numbers "
                f"(one per planted feature, not all zero), got shape {tuple(w.shape)}."
            )
        return PlantedPairedData(
            self.directions, list(self.kinds), self.active_per_token, self.noise, self.dtype, w
        )

    @classmethod
    def make(
        cls,
        d: int = 32,
        n_shared: int = 8,
        n_ft_only: int = 4,
        n_base_only: int = 4,
        active_per_token: float = 2.0,
        noise: float = 0.01,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        n_rotated: int = 0,
        rotation_cos: float = 0.5,
    ) -> PlantedPairedData:
        n = n_shared + n_ft_only + n_base_only
        if n + 2 * n_rotated > d:
            raise ValueError(
                f"Need at most d={d} orthogonal directions: {n} planted features plus 2 per rotated "
                f"feature ({n_rotated}) = {n + 2 * n_rotated}. Lower the counts or raise d."
            )
        if not -1.0 <= rotation_cos <= 1.0:
            raise ValueError(f"rotation_cos must be in [-1, 1], got {rotation_cos}.")
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        u = q[:, : n + 2 * n_rotated].T  # orthonormal rows
        directions = torch.zeros(n + n_rotated, 2, d, dtype=torch.float64)
        kinds: list[str] = []
        for j in range(n):
            if j < n_shared:
                directions[j, 0] = directions[j, 1] = u[j]
                kinds.append("shared")
            elif j < n_shared + n_ft_only:
                directions[j, 1] = u[j]
                kinds.append("ft_only")
            else:
                directions[j, 0] = u[j]
                kinds.append("base_only")
        sin = (1.0 - rotation_cos**2) ** 0.5
        for r in range(n_rotated):  # base u, ft cos·u + sin·v with v ⟂ everything else
            a, b = u[n + 2 * r], u[n + 2 * r + 1]
            directions[n + r, 0] = a
            directions[n + r, 1] = rotation_cos * a + sin * b
            kinds.append("rotated")
        return cls(directions.to(dtype), kinds, active_per_token, noise, dtype)

    @classmethod
    def make_cross_architecture(
        cls,
        d_base: int = 24,
        d_ft: int = 32,
        n_shared: int = 8,
        n_ft_only: int = 4,
        n_base_only: int = 4,
        active_per_token: float = 2.0,
        noise: float = 0.01,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> PlantedPairedData:
        """Two models of different widths: a shared feature writes unrelated unit directions
        u^b in R^d_base and u^c in R^d_ft (there is no common basis), exclusive ones one of
        them. Activations come zero-padded to ``max(d_base, d_ft)`` (``pad_pair``'s layout)."""
        nb, nf = n_shared + n_base_only, n_shared + n_ft_only
        if nb > d_base or nf > d_ft:
            raise ValueError(
                f"Need at most d_base={d_base} base and d_ft={d_ft} ft orthogonal directions, got "
                f"{nb} and {nf}."
            )
        g = torch.Generator().manual_seed(seed)
        d = max(d_base, d_ft)
        ub = torch.linalg.qr(torch.randn(d_base, d_base, generator=g, dtype=torch.float64))[0].T
        uc = torch.linalg.qr(torch.randn(d_ft, d_ft, generator=g, dtype=torch.float64))[0].T
        n = n_shared + n_ft_only + n_base_only
        directions = torch.zeros(n, 2, d, dtype=torch.float64)
        kinds: list[str] = []
        ib = ic = 0
        for j in range(n):
            kind = (
                "shared" if j < n_shared else "ft_only" if j < n_shared + n_ft_only else "base_only"
            )
            if kind != "ft_only":
                directions[j, 0, :d_base] = ub[ib]
                ib += 1
            if kind != "base_only":
                directions[j, 1, :d_ft] = uc[ic]
                ic += 1
            kinds.append(kind)
        return cls(directions.to(dtype), kinds, active_per_token, noise, dtype)

    @property
    def d(self) -> int:
        return self.directions.shape[-1]

    def sample(
        self, n_tokens: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x (n_tokens, 2, d), codes (n_tokens, n_features))``."""
        n_feat = self.directions.shape[0]
        if self.frequency is None:
            p: torch.Tensor | float = min(self.active_per_token / n_feat, 1.0)
        else:
            p = (
                (self.active_per_token * self.frequency / self.frequency.sum())
                .clamp(max=1.0)
                .to(torch.float32)
            )
        on = torch.rand(n_tokens, n_feat, generator=generator) < p
        mags = 0.5 + torch.rand(n_tokens, n_feat, generator=generator)
        codes = (on * mags).to(self.dtype)
        x = torch.einsum("tf,fmd->tmd", codes, self.directions)
        noise = self.noise * torch.randn(x.shape, generator=generator, dtype=self.dtype)
        used = self.directions.abs().sum(0) > 0  # (2, d): no noise on a narrower model's padding
        x = x + noise * used.to(self.dtype) if not bool(used.all()) else x + noise
        return x, codes

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
        """Endless iterator of paired batches (a SAELens ``DataProvider``)."""
        g = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(batch_size, g)[0]
