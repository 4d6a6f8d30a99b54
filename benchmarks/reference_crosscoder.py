"""A re-implementation of crosscoder_learning's BatchTopK crosscoder training step.

crosscoder_learning (github.com/science-of-finetuning/crosscoder_learning, Julian Minder's fork of
dictionary_learning, used for "Robustly identifying concepts introduced during chat
fine-tuning") trains with ``BatchTopKCrossCoderTrainer``. This module re-states its algorithm,
written from its description in docs/methods.md, so that ``benchmarks/run.py`` can time it and
``benchmarks/fidelity.py`` can train with it when the original is not importable. Nothing here is
used by the library.

What the reference does, per step (its defaults in brackets):

- inputs ``(B, n_models, d)`` are centred per model and scaled by one scalar per model so that
  the summed variance is ``target_rms**2`` [1];
- at step 0 the decoder bias is set to the geometric median of that (normalised) batch;
- dense encode: ``einsum("bld,ldf->blf")`` summed over models, ``+ b_enc``, ReLU (``p``);
- selection scores ``p * s`` with ``s_j = sum_m ||d_j^m||`` [code normalisation "crosscoder"];
  flat ``topk`` of ``B * k`` over the batch; kept values are the unscaled ``p``;
- the inference threshold (on scores) is an EMA [beta 0.999] of the smallest positive kept
  score, updated only after ``threshold_start_step`` [1000] and initialised by its first value;
- dense decode ``einsum("bf,lfd->bld") + b_dec``;
- loss ``mean_{tokens, models} ||x^m - xhat^m||`` (the *unsquared* norm) ``+ auxk_alpha`` [1/32]
  times the aux-K loss: the top ``d // 2`` dead latents (no firing in 10M tokens), ranked by
  their scaled post-ReLU score, reconstruct the detached residual without bias; squared error
  divided by the residual's variance;
- ``clip_grad_norm_(1.0)``, Adam(betas 0.9, 0.999) at ``lr = 2e-4 / sqrt(n / 2**14)`` with a
  linear warm-up over ``warmup_steps`` [1000] (factor ``step / warmup_steps``);
- initialisation: encoder ``kaiming_uniform_`` on ``(n_models, d, n)``, each model's column
  rescaled to norm 1 [``norm_init_scale``]; decoder = its transpose; biases zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class ReferenceConfig:
    """Hyper-parameters of the reference trainer (its defaults)."""

    d: int
    n: int
    k: int
    steps: int
    n_models: int = 2
    lr: float | None = None
    warmup_steps: int = 1000
    threshold_beta: float = 0.999
    threshold_start_step: int = 1000
    auxk_alpha: float = 1 / 32
    dead_tokens: int = 10_000_000
    norm_init_scale: float = 1.0
    target_rms: float = 1.0
    clip: float = 1.0
    seed: int = 0
    # ablations (not the reference): sae_diff's squared error summed over models
    squared_loss: bool = False

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.n / 2**14)


def geometric_median(points: Tensor, iters: int = 100, tol: float = 1e-5) -> Tensor:
    """Weiszfeld iterations per model: ``points (N, n_models, d)`` -> ``(n_models, d)``."""
    guess = points.mean(0)
    for _ in range(iters):
        w = 1.0 / (points - guess).norm(dim=-1).clamp(min=1e-12)  # (N, n_models)
        w = w / w.sum(0, keepdim=True)
        new = (w[..., None] * points).sum(0)
        done = bool(((new - guess).norm(dim=-1) < tol).all())
        guess = new
        if done:
            break
    return guess


class ReferenceBatchTopKCrosscoder(nn.Module):
    """Weights in the reference's layout: ``W_enc (m, d, n)``, ``W_dec (m, n, d)``."""

    act_mean: Tensor
    act_scale: Tensor
    threshold: Tensor
    tokens_since_fired: Tensor

    def __init__(
        self,
        cfg: ReferenceConfig,
        mean: Tensor | None = None,
        scale: Tensor | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        m, d, n = cfg.n_models, cfg.d, cfg.n
        # kaiming_uniform_ on a (m, d, n) tensor: fan_in = d * n, gain sqrt(2)
        bound = math.sqrt(6.0 / (d * n))
        w = (torch.rand(m, d, n, generator=g, dtype=torch.float64) * 2 - 1) * bound
        w = w / w.norm(dim=1, keepdim=True) * cfg.norm_init_scale
        self.W_enc = nn.Parameter(w.to(device, dtype))
        self.W_dec = nn.Parameter(w.transpose(1, 2).contiguous().to(device, dtype))
        self.b_enc = nn.Parameter(torch.zeros(n, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(m, d, device=device, dtype=dtype))
        mean = torch.zeros(m, d) if mean is None else mean
        scale = torch.ones(m) if scale is None else scale
        self.register_buffer("act_mean", mean.to(device, dtype))
        self.register_buffer("act_scale", scale.to(device, dtype))
        self.register_buffer("threshold", torch.tensor(-1.0, device=device))
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.long, device=device))

    @staticmethod
    def normalisation_from_data(x: Tensor, target_rms: float = 1.0) -> tuple[Tensor, Tensor]:
        """Per-model mean and the scalar making the summed variance ``target_rms**2``."""
        xd = x.to(torch.float64)
        mean = xd.mean(0)
        total_var = xd.var(0).sum(-1)
        return mean.float(), (target_rms / torch.sqrt(total_var + 1e-8)).float()

    def normalise(self, x: Tensor) -> Tensor:
        return (x - self.act_mean) * self.act_scale[:, None]

    def code_scale(self) -> Tensor:
        return self.W_dec.norm(dim=-1).sum(0)

    def preacts(self, x_n: Tensor) -> Tensor:
        return torch.relu(torch.einsum("bld,ldf->blf", x_n, self.W_enc).sum(1) + self.b_enc)

    def decode(self, f: Tensor, bias: bool = True) -> Tensor:
        out = torch.einsum("bf,lfd->bld", f, self.W_dec)
        return out + self.b_dec if bias else out


class ReferenceTrainer:
    """The reference's training loop state: model, Adam, warm-up schedule, threshold, deads."""

    def __init__(self, model: ReferenceBatchTopKCrosscoder) -> None:
        self.model = model
        cfg = model.cfg
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.999))
        warm = cfg.warmup_steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: s / warm if s < warm else 1.0
        )

    def loss(self, step: int, x_n: Tensor) -> Tensor:
        m = self.model
        cfg = m.cfg
        B = x_n.shape[0]
        p = m.preacts(x_n)
        s = m.code_scale()
        v = p * s
        top = v.flatten().topk(cfg.k * B, sorted=False)
        f = (
            torch.zeros_like(v.flatten())
            .scatter_(-1, top.indices, p.flatten()[top.indices])
            .view_as(p)
        )
        if step > cfg.threshold_start_step:
            with torch.no_grad():
                kept = (f * s)[f > 0]
                mk = kept.min() if kept.numel() else torch.zeros((), device=f.device)
                if m.threshold < 0:
                    m.threshold.copy_(mk)
                else:
                    m.threshold.mul_(cfg.threshold_beta).add_((1 - cfg.threshold_beta) * mk)
        x_hat = m.decode(f)
        e = x_n - x_hat
        with torch.no_grad():
            fired = f.sum(0) > 0
            m.tokens_since_fired += B
            m.tokens_since_fired[fired] = 0
        l2 = e.pow(2).sum((-2, -1)).mean() if cfg.squared_loss else e.norm(dim=-1).mean()
        dead = m.tokens_since_fired >= cfg.dead_tokens
        aux = x_n.new_zeros(())
        if bool(dead.any()):
            k_aux = min(cfg.d // 2, int(dead.sum()))
            r = e.detach().reshape(B, -1)
            cand = torch.where(dead[None], v, -torch.inf).detach()
            idx = cand.topk(k_aux, sorted=False).indices
            acts = torch.zeros_like(p).scatter(-1, idx, p.gather(-1, idx))
            rec = m.decode(acts, bias=False).reshape(B, -1)
            num = (r - rec).pow(2).sum(-1).mean()
            den = (r - r.mean(0)).pow(2).sum(-1).mean()
            aux = (num / den).nan_to_num(0.0)
        return l2 + cfg.auxk_alpha * aux

    def update(self, step: int, x: Tensor) -> float:
        m = self.model
        x_n = m.normalise(x)
        if step == 0:
            with torch.no_grad():
                m.b_dec.copy_(geometric_median(x_n))
        loss = self.loss(step, x_n)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), m.cfg.clip)
        self.opt.step()
        self.opt.zero_grad()
        self.sched.step()
        return float(loss.detach())
