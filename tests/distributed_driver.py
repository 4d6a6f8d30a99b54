"""The one torchrun launch of ``tests/test_distributed.py`` (imports paid once per rank).

    torchrun --standalone --nproc_per_node=2 tests/distributed_driver.py RESUME.yaml TRAIN.yaml OUT.json \
        CHECKPOINT RESUMED_OUT

1. ``sae-diff harvest --config RESUME.yaml``: resumes a sharded harvest that lost a shard;
2. ``sae-diff train --config TRAIN.yaml``: sharded harvest + data-parallel training;
3. ``sae-diff train --resume CHECKPOINT --output_path RESUMED_OUT``: a one-process
   checkpoint continued by 2 processes;
4. the global BatchTopK selection against the one-process kernel on planted scores (ties,
   imbalanced ranks); its outcome goes to OUT.json (rank 0) for the test to report.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

import torch


def check_global_topk() -> None:
    """Each rank's slice of a planted global score matrix through the distributed BatchTopK:
    the kept set must be the one-process kernel's flat top-K (ties included)."""
    import torch.distributed as dist

    from sae_diff.dictionaries import kernels
    from sae_diff.training import global_topk as gt

    rank, world_size = dist.get_rank(), dist.get_world_size()
    B, n, k = 12, 40, 3.0
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(B * world_size, n, generator=g)
    scores[B:] *= 3.0  # rank 1 holds most of the top-K: its 1.5K/W offer is too short
    scale = torch.rand(n, generator=g) + 0.5
    K = int(k * B * world_size)
    # ties across the ranks exactly at the selection boundary: copy the K-th entry's
    # pre-activation into the same latent of two rows of the other rank
    kth = kernels.batch_topk(scores, K, scale=scale, force_slow=True)
    at = int(torch.nonzero(kth.scores == kth.kth_score)[0])
    row, col = int(kth.row[at]), int(kth.col[at])
    other = (row + B) % (B * world_size)
    scores[other, col] = scores[(other + 1) % (B * world_size), col] = scores[row, col]
    ref = kernels.batch_topk(scores, K, scale=scale, force_slow=True)
    n_tied = int(((torch.relu(scores) * scale).flatten() == ref.kth_score).sum())
    assert n_tied >= 3 and int((ref.scores == ref.kth_score).sum()) < n_tied, (
        "the planted tie is not at the boundary"
    )
    want = {(int(r), int(c)) for r, c in zip(ref.row, ref.col)}
    mine = scores[rank * B : (rank + 1) * B]
    for margin, n_calls in ((1.5, 2), (100.0, 1)):  # imbalanced: exact fallback; then a full offer
        gt.MARGIN = margin
        calls: list[int] = []

        def counted(*a: Any, _calls: list[int] = calls, **kw: Any) -> Any:
            _calls.append(int(a[1]))
            return kernels.batch_topk(*a, **kw)

        selection = gt.GlobalBatchTopK(k, counted)
        sel = selection.select(mine, int(k * B), None, scale=scale)
        assert len(calls) == n_calls, f"margin {margin}: offers {calls}"
        got = [(int(r) + rank * B, int(c)) for r, c in zip(sel.row, sel.col)]
        everyone: list[Any] = [None] * world_size
        dist.all_gather_object(everyone, got)
        union = [x for part in everyone for x in part]
        assert len(union) == K and set(union) == want, f"margin {margin}: not the global top-K"
        assert sel.kth_score == ref.kth_score
        # the threshold EMA takes the global smallest kept score, on every rank, once a step
        fed = selection.min_kept(None)
        assert fed is not None and float(fed) == float(ref.scores.min())
        assert selection.min_kept(fed) is None, "fed twice in one step"
        selection.new_step()
        assert selection.min_kept(None) is None, "a new step fed the previous step's score"
    gt.MARGIN = 1.5
    # dense path (distinct scores: torch.topk's tie order is unspecified)
    v = torch.relu(torch.randn(B * world_size, n, generator=g))
    dense_ref = torch.zeros(v.numel(), dtype=torch.bool)
    dense_ref[v.flatten().topk(K).indices] = True
    mask = gt.GlobalBatchTopK(k).mask(v[rank * B : (rank + 1) * B], int(k * B))
    parts: list[Any] = [None] * world_size
    dist.all_gather_object(parts, mask)
    assert torch.equal(torch.cat(parts).flatten(), dense_ref), "dense path: not the global top-K"


def main(resume_cfg: str, train_cfg: str, out: str, checkpoint: str, resumed_out: str) -> int:
    torch.set_num_threads(1)
    from sae_diff.cli import main as cli
    from sae_diff.training import distributed

    for argv in (
        ["harvest", "--config", resume_cfg],
        ["train", "--config", train_cfg],
        [
            "train",
            "--resume",
            checkpoint,
            "--output_path",
            resumed_out,
            "--checkpoint_path",
            resumed_out + "_ckpt",
        ],
    ):
        rc = cli(argv)
        if rc:
            return rc
    try:
        check_global_topk()
        result: dict[str, Any] = {"ok": True}
    except Exception:  # noqa: BLE001 - reported to the test
        result = {"ok": False, "error": traceback.format_exc()}
    if distributed.world().is_main:
        with open(out, "w") as f:
            json.dump(result, f)
    distributed.barrier()
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:6]))
