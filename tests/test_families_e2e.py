"""End to end, per family: ``sae-diff harvest`` then ``sae-diff train`` from a plain YAML
config (model folders, hook, a .jsonl of chat ``messages``, sizes; no workaround options),
then Latent Scaling on the cache, layer stitching and KL patching with the trained
crosscoder. Stitched logits are checked against an independent Hugging Face computation
(the base's hidden state after block 0 substituted into the ft model's forward)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from families import FAMILIES, build_family_pair, chat_rows, hf_stitched_logits

from sae_diff.cli import main

pytestmark = pytest.mark.slow


def _plain_yaml(family: str, root: Path) -> tuple[Path, dict[str, Any]]:
    base_dir, ft_dir = build_family_pair(family)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(48, seed=1)))
    cfg: dict[str, Any] = {
        "base_model_name": str(base_dir),
        "model_name": str(ft_dir),
        "hook_name": "blocks.1.hook_resid_pre",
        "dataset_path": str(data),
        "context_size": 32,
        "training_tokens": 1024,
        "train_batch_size_tokens": 128,
        "sae": {"architecture": "batchtopk_crosscoder", "d_in": 64, "d_sae": 128, "k": 8},
        "cache_path": str(root / "cache"),
        "output_path": str(root / "out"),
        "checkpoint_path": str(root / "ckpt"),
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


@pytest.mark.parametrize("family", FAMILIES)
def test_harvest_train_analyse(
    family: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sae_lens import SAE

    from sae_diff.analysis import cache_batches, latent_table
    from sae_diff.data import ActivationCache
    from sae_diff.evaluation import kl_patching_table, stitching_sweep
    from sae_diff.pairing.masks import encode_chat
    from sae_diff.pairing.model import PairedModel

    torch.manual_seed(0)
    path, cfg = _plain_yaml(family, tmp_path)
    assert main(["train", "--config", str(path), "--dry-run"]) == 0
    assert main(["harvest", "--config", str(path)]) == 0, capsys.readouterr().err
    assert main(["train", "--config", str(path)]) == 0, capsys.readouterr().err
    sae = SAE.load_from_disk(cfg["output_path"])
    assert sae.cfg.d_sae == 128

    # Latent Scaling over the harvested cache
    cache = ActivationCache(cfg["cache_path"])
    table = latent_table(sae, cache_batches(cache), min_count=1, progress=False)
    assert len(table) == 128
    nu_cols = [c for c in table.columns if str(c).startswith("nu_")]
    assert nu_cols and np.isfinite(table[nu_cols].to_numpy(dtype=float)).any()

    # chat tokens with their assistant masks, from the ft tokenizer's template
    base_dir, ft_dir = build_family_pair(family)
    pair = PairedModel.from_pretrained(str(base_dir), str(ft_dir))
    encs = [encode_chat(r["messages"], pair.tokenizer) for r in chat_rows(4, seed=9)]
    n = min(len(e.input_ids) for e in encs)
    tokens = torch.tensor([list(e.input_ids[:n]) for e in encs])
    mask = torch.tensor([list(e.assistant[:n]) for e in encs], dtype=torch.bool)
    assert mask.any()

    # layer stitching: pure models at the ends, and the split layer equals plain HF
    sweep = stitching_sweep(pair, tokens, mask, directions=("base",))
    by_layer = sweep.set_index("layer")
    assert by_layer.loc[0, "kl_to_ft"] == pytest.approx(0.0, abs=1e-6)
    assert by_layer.loc[pair.n_layers, "kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert by_layer.loc[pair.n_layers, "kl_to_ft"] > 0
    torch.testing.assert_close(
        pair.stitched_logits(tokens, 1, first="base"),
        hf_stitched_logits(base_dir, ft_dir, tokens, 1),
        atol=1e-4,
        rtol=1e-4,
    )

    # KL patching with the trained crosscoder
    patch = kl_patching_table(pair, {"crosscoder": sae}, tokens, mask, random_seeds=1)
    rows = patch.set_index("intervention")
    assert rows.loc["ft", "kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows.loc["stitched", "kl"] > 0
    assert np.isfinite(float(rows.loc["reconstruction", "closed"]))
