"""Hub round trip against a local stand-in for the Hub's HTTP API (tests/hub_stub.py): the
real huggingface_hub client and SAELens's uploader / loader run; nothing leaves 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE
from sae_lens.training.upload_saes_to_huggingface import upload_saes_to_huggingface

import sae_diff  # noqa: F401  (registers the architectures SAE.from_pretrained needs)
from sae_diff.cli import main
from sae_diff.dictionaries.registry import training_config, training_sae
from sae_diff.hub import HubError, load_dictionary, upload_dictionary
from tests import hub_stub as _stub_module
from tests.hub_stub import HubStub, local_hub

hub_stub = _stub_module.hub_stub  # the fixture: a running stub with huggingface_hub pointed at it

D = 8
PAIR_MD = {
    "base_model_name": "org/base",
    "model_name": "org/ft",
    "hook_name": "blocks.1.hook_resid_post",
}


def trained(arch: str, **kw: Any) -> Any:
    """A training dictionary after a few optimiser steps (thresholds and norms measured)."""
    cfg = training_config(arch, d_in=D, d_sae=32, **kw)
    for k, v in PAIR_MD.items():
        cfg.metadata[k] = v
    if arch == "batchtopk_diff_sae":
        cfg.metadata["diff_sign"] = cfg.diff_sign
    sae = training_sae(cfg)
    paired = arch != "batchtopk_diff_sae"
    if paired:
        sae.set_norm_factors(torch.tensor([0.7, 1.3]))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    from sae_lens.saes.sae import TrainStepInput

    for _ in range(5):
        x = torch.randn(64, 2, D) if paired else torch.randn(64, D)
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients={"l1": 0.1},
                dead_neuron_mask=None,
                n_training_steps=0,
                is_logging_step=False,
            )
        )
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return sae


ARCHS = {"crosscoder": {}, "batchtopk_crosscoder": {"k": 4}, "batchtopk_diff_sae": {"k": 4}}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_upload_then_from_pretrained_gives_identical_outputs(
    hub_stub: HubStub, tmp_path: Path, arch: str
) -> None:
    sae = trained(arch, **ARCHS[arch])
    out = tmp_path / "out"
    sae.save_inference_model(out)
    upload_dictionary(out, "my-org/diffing", sae_id=f"l1/{arch}", show_progress=False)

    files = hub_stub.files("my-org/diffing")
    assert {f"l1/{arch}/cfg.json", f"l1/{arch}/sae_weights.safetensors", "README.md"} <= set(files)
    assert "SAE.from_pretrained" in files["README.md"].decode()
    cfg = json.loads(files[f"l1/{arch}/cfg.json"])
    assert {k: cfg["metadata"][k] for k in PAIR_MD} == PAIR_MD

    loaded = SAE.from_pretrained("my-org/diffing", f"l1/{arch}")
    assert type(loaded).__name__ == type(sae.to_inference()).__name__
    local = SAE.load_from_disk(out)
    x = torch.randn(16, 2, D)
    assert torch.equal(loaded.encode(x), local.encode(x))
    assert torch.equal(loaded(x), local(x))
    if (
        arch != "batchtopk_diff_sae"
    ):  # the exported dictionary matches the training one's raw-space output
        torch.testing.assert_close(loaded.decode(loaded.encode(x)), local(x))
    assert loaded.cfg.metadata.base_model_name == "org/base"
    assert ("POST", "/api/models/my-org/diffing/commit/main") in hub_stub.requests
    assert not hub_stub.unhandled


def test_saelens_uploader_and_loader_directly(hub_stub: HubStub, tmp_path: Path) -> None:
    """SAELens's own upload_saes_to_huggingface + SAE.from_pretrained, with an SAE object."""
    inf = trained("batchtopk_crosscoder", k=4).to_inference()
    upload_saes_to_huggingface({"cc": inf}, hf_repo_id="org/direct", show_progress=False)
    loaded = load_dictionary("org/direct", "cc")
    x = torch.randn(4, 2, D)
    assert torch.equal(loaded(x), inf(x))

    from huggingface_hub import snapshot_download

    snap = Path(snapshot_download("org/direct"))
    assert (snap / "cc" / "cfg.json").is_file() and (snap / "README.md").is_file()


def test_upload_refuses_missing_pair_metadata_and_accepts_added(
    hub_stub: HubStub, tmp_path: Path
) -> None:
    sae = trained("batchtopk_crosscoder", k=4)
    sae.cfg.metadata.base_model_name = None
    out = tmp_path / "nometa"
    sae.save_inference_model(out)
    with pytest.raises(HubError, match="base_model_name"):
        upload_dictionary(out, "org/meta", show_progress=False)
    assert "org/meta" not in hub_stub.repos  # refused before anything was created
    # the CLI adds it with --metadata
    rc = main(
        [
            "upload",
            str(out),
            "--repo-id",
            "org/meta",
            "--sae-id",
            "cc",
            "--metadata",
            "base_model_name=org/base",
        ]
    )
    assert rc == 0
    assert SAE.from_pretrained("org/meta", "cc").cfg.metadata.base_model_name == "org/base"
    assert (
        json.loads(out.joinpath("cfg.json").read_text())["metadata"].get("base_model_name") is None
    )  # local untouched


def test_stub_is_offline_safe_and_stops() -> None:
    from huggingface_hub import constants

    before = constants.ENDPOINT
    with local_hub(max_lifetime_s=30) as hub:
        assert hub.endpoint.startswith("http://127.0.0.1:")
        assert constants.ENDPOINT == hub.endpoint and not constants.HF_HUB_OFFLINE
    assert constants.ENDPOINT == before and hub._server is None
    # a stub left running stops itself
    stub = HubStub(max_lifetime_s=0.2).start()
    stub._thread.join(timeout=5)  # type: ignore[union-attr]
    assert stub._server is None
