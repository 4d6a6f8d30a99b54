"""Published dictionaries loaded through a local stand-in of the Hub HTTP API (127.0.0.1 only)."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hub_stub import HubStub, local_hub
from interop_fixtures import (
    dl_crosscoder_config,
    dl_crosscoder_state,
    dl_sae_config,
    dl_sae_state,
    ref_dl_crosscoder,
    ref_dl_sae,
    ref_replication,
    replication_state,
    sample_inputs,
    write_dl,
    write_replication,
)
from sae_lens.saes.sae import SAE

from sae_diff import interop
from sae_diff.dictionaries.batchtopk_crosscoder import JumpReLUCrosscoder
from sae_diff.dictionaries.diff_sae import DiffSAE

L, D, N = 2, 8, 16
CC_REPO, DIFF_REPO, REP_REPO = "sof/cc-batchtopk", "sof/diff-sae", "ck/crosscoder-model-diff"
REP_FOLDER = "blocks.14.hook_resid_pre"


def _folder_bytes(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}{p.name}": p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def published(tmp_path: Path) -> dict:
    cc = dl_crosscoder_state(L, D, N, batch_topk=True, normaliser=True)
    diff = dl_sae_state(D, N, normaliser=True)
    rep = replication_state(D, N)
    folders = {
        CC_REPO: write_dl(tmp_path / "cc", cc, dl_crosscoder_config(L, D, N, batch_topk=True)),
        DIFF_REPO: write_dl(tmp_path / "diff", diff, dl_sae_config(D, N)),
        REP_REPO: write_replication(tmp_path / "rep" / REP_FOLDER, rep, D, N),
    }
    return {"cc": cc, "diff": diff, "rep": rep, "folders": folders}


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, published: dict) -> Iterator[HubStub]:
    """Our stub serving the three repos, with huggingface_hub online and pointed at it."""
    repos = {
        CC_REPO: _folder_bytes(published["folders"][CC_REPO]),
        DIFF_REPO: _folder_bytes(published["folders"][DIFF_REPO]),
        REP_REPO: _folder_bytes(published["folders"][REP_REPO], prefix=f"{REP_FOLDER}/"),
    }
    with local_hub(cache_dir=tmp_path / "hf-cache", max_lifetime_s=60) as stub:
        for repo_id, files in repos.items():
            stub.add_repo(repo_id, files)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        for var in (
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "http_proxy",
            "https_proxy",
            "ALL_PROXY",
            "all_proxy",
        ):
            monkeypatch.delenv(var, raising=False)
        yield stub


def _check_all(load_cc, load_diff, load_rep, published: dict) -> None:  # noqa: ANN001
    x = sample_inputs((32, L, D))
    cc = load_cc()
    assert isinstance(cc, JumpReLUCrosscoder)
    f_ref, xhat_ref = ref_dl_crosscoder(published["cc"], x, batch_topk=True)
    with torch.no_grad():
        torch.testing.assert_close(cc.encode(x.float()).double(), f_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cc(x.float()).double(), xhat_ref, atol=1e-5, rtol=1e-5)
    diff = load_diff()
    assert isinstance(diff, DiffSAE) and diff.cfg.diff_sign == "ft_minus_base"
    pair = torch.stack([sample_inputs((32, D), seed=3), sample_inputs((32, D), seed=4)], dim=-2)
    f_ref, _ = ref_dl_sae(published["diff"], pair[:, 1] - pair[:, 0])
    with torch.no_grad():
        torch.testing.assert_close(diff.encode(pair.float()).double(), f_ref, atol=1e-5, rtol=1e-5)
    rep = load_rep()
    c = torch.tensor([0.5, 2.0], dtype=torch.float64)
    f_ref, _ = ref_replication(published["rep"], x * c[:, None])
    with torch.no_grad():
        torch.testing.assert_close(rep.encode(x.float()).double(), f_ref, atol=1e-5, rtol=1e-5)
    assert rep.cfg.metadata.hook_name == REP_FOLDER


def test_load_from_local_hub_stub(online: HubStub, published: dict, tmp_path: Path) -> None:
    cache = tmp_path / "explicit-cache"
    _check_all(
        lambda: interop.load(CC_REPO, endpoint=online.endpoint, cache_dir=cache),
        lambda: interop.load(DIFF_REPO, diff_sign="ft_minus_base", cache_dir=cache),
        lambda: interop.load(f"{REP_REPO}/{REP_FOLDER}", norm_factors=[0.5, 2.0], cache_dir=cache),
        published,
    )
    fetched = {p for m, p in online.requests if m == "GET" and "/resolve/" in p}
    assert f"/{CC_REPO}/resolve/main/model.safetensors" in fetched
    assert f"/{REP_REPO}/resolve/main/{REP_FOLDER}/cc_weights.pt" in fetched
    assert any(p.endswith(f"/{CC_REPO}/resolve/main/config.json") for p in fetched)


def test_saelens_from_pretrained_with_converter(online: HubStub, published: dict) -> None:
    _check_all(
        lambda: SAE.from_pretrained(CC_REPO, "", converter=interop.hf_converter()),
        lambda: SAE.from_pretrained(
            DIFF_REPO, "", converter=interop.hf_converter(diff_sign="ft_minus_base")
        ),
        lambda: SAE.from_pretrained(
            REP_REPO, REP_FOLDER, converter=interop.hf_converter(norm_factors=[0.5, 2.0])
        ),
        published,
    )


def test_missing_repo_file_is_a_clear_error(online: HubStub) -> None:
    with pytest.raises(interop.InteropError, match="found none of"):
        interop.load("sof/cc-batchtopk/no-such-folder")


def test_through_the_training_issue_hub_stand_in(published: dict, tmp_path: Path) -> None:
    """The shared Hub stand-in (tests/hub_stub.py), when present: upload with the real client, load back."""
    try:
        local_hub = importlib.import_module("hub_stub").local_hub
    except (ImportError, AttributeError):
        pytest.skip("tests/hub_stub.py (local_hub) not available in this checkout")
    from huggingface_hub import HfApi

    with local_hub(cache_dir=tmp_path / "cache"):
        api = HfApi()
        for repo, folder in published["folders"].items():
            api.create_repo(repo, exist_ok=True)
            path_in_repo = REP_FOLDER if repo == REP_REPO else ""
            api.upload_folder(repo_id=repo, folder_path=str(folder), path_in_repo=path_in_repo)
        _check_all(
            lambda: interop.load(CC_REPO),
            lambda: SAE.from_pretrained(
                DIFF_REPO, "", converter=interop.hf_converter(diff_sign="ft_minus_base")
            ),
            lambda: interop.load(REP_REPO, subfolder=REP_FOLDER, norm_factors=[0.5, 2.0]),
            published,
        )
