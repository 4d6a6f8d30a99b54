"""A tiny GPT-2 pair saved as Hugging Face folders, loaded offline through the real
TransformerLens / transformers code: HookedTransformer (hf_model=) and TransformerBridge."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers_models import random_tokens, save_tiny_gpt2_pair

from sae_diff.pairing.model import PairedModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    return save_tiny_gpt2_pair(tmp_path_factory.mktemp("hf"))


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_from_pretrained_local_matches_hf(hf_dirs: tuple[Path, Path], backend: str) -> None:
    from transformers import AutoModelForCausalLM

    base_dir, ft_dir = hf_dirs
    pair = PairedModel.from_pretrained(str(base_dir), str(ft_dir), backend=backend)
    assert pair.is_bridge == (backend == "bridge")
    assert (pair.n_layers, pair.d_model) == (2, 32)
    assert pair.ft_name == str(ft_dir) and pair.describe()["chat_template_hash"] is not None
    toks = random_tokens(2, 9)
    lb, lf = pair.logits(toks)
    for d, logits in ((base_dir, lb), (ft_dir, lf)):
        ref = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager")(toks).logits
        centre = lambda x: x - x.mean(-1, keepdim=True)  # noqa: E731  (HT centres the unembed)
        torch.testing.assert_close(centre(logits), centre(ref), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(lb, lf)

    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]
    acts = pair.paired_activations(toks, hooks)
    _, cb = pair.base.run_with_cache(toks)
    _, cf = pair.ft.run_with_cache(toks)
    for h in hooks:
        torch.testing.assert_close(acts[h][:, :, 0], cb[h], rtol=0, atol=0)
        torch.testing.assert_close(acts[h][:, :, 1], cf[h], rtol=0, atol=0)

    n = pair.n_layers
    torch.testing.assert_close(pair.stitched_logits(toks, 0, first="base"), lf, rtol=0, atol=1e-6)
    torch.testing.assert_close(pair.stitched_logits(toks, n, first="base"), lb, rtol=0, atol=1e-6)
    torch.testing.assert_close(pair.stitched_logits(toks, 0, first="ft"), lb, rtol=0, atol=1e-6)
    torch.testing.assert_close(pair.stitched_logits(toks, n, first="ft"), lf, rtol=0, atol=1e-6)
    mid = pair.stitched_logits(toks, 1, first="base")
    resid = pair.residual_at("base", toks, 1)
    torch.testing.assert_close(mid, pair.continue_from("ft", resid, 1, tokens=toks))
    assert not torch.allclose(mid, lf, atol=1e-4)


def test_from_pretrained_bad_ft_path(hf_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    base_dir, _ = hf_dirs
    with pytest.raises((OSError, ValueError)):
        PairedModel.from_pretrained(str(base_dir), str(tmp_path / "missing"), backend="hooked")
