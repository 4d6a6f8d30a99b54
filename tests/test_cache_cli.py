"""The harvest CLI: a YAML config naming local HF folders and a local dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_models import save_tiny_gpt2_pair

from sae_diff.data.cache import ActivationCache
from sae_diff.data.harvest import main

pytestmark = pytest.mark.slow


def test_cli_harvest_from_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base_dir, ft_dir = save_tiny_gpt2_pair(tmp_path / "hf")
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": "some words here. " * 4}) for _ in range(8)))
    chat = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    chat.write_text("\n".join(json.dumps({"messages": msgs}) for _ in range(8)))
    cfg = tmp_path / "harvest.yaml"
    cfg.write_text(
        f"""
base: {base_dir}
ft: {ft_dir}
hook_name: blocks.0.hook_resid_post
out_dir: {tmp_path / "cache"}
datasets:
  - {{path: {text}, kind: text}}
  - {{path: {chat}, kind: chat, stop: 6}}
proportions: [0.7, 0.3]
context_size: 24
rows_per_shard: 4
max_rows: 10
"""
    )
    assert main([str(cfg), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "240 tokens in 10 rows, 3 shards" in out and "tokens/s" in out
    cache = ActivationCache(tmp_path / "cache")
    assert cache.meta["models"]["ft"]["name"] == str(ft_dir) and cache.meta["is_chat"]
    assert cache.meta["source"]["datasets"][1]["stop"] == 6
    sh = cache.read_all()
    assert sh["acts"].shape == (10, 24, 2, 32) and sh["mask_assistant"].any()
    assert not torch.equal(sh["acts"][:, :, 0], sh["acts"][:, :, 1])
