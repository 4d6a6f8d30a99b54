"""Published-format loaders: encodings match an independent reference forward of each source."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
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
from sae_lens.saes.jumprelu_sae import JumpReLUSAE
from sae_lens.saes.sae import SAE

import sae_diff  # noqa: F401  (registers the architectures)
from sae_diff import interop
from sae_diff.dictionaries.batchtopk_crosscoder import JumpReLUCrosscoder
from sae_diff.dictionaries.crosscoder import Crosscoder
from sae_diff.dictionaries.diff_sae import DiffSAE
from sae_diff.dictionaries.geometry import delta_from_ckkissane_ratio, relative_norm

L, D, N = 2, 8, 24
ATOL = 1e-6


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= atol + 1e-6 * b.abs().max().item(), f"max abs error {err}"


def _check_crosscoder(
    sae: SAE,
    sd: dict,
    x: torch.Tensor,
    batch_topk: bool,
    code: str,
    dtype: torch.dtype = torch.float64,
) -> None:
    f_ref, xhat_ref = ref_dl_crosscoder(sd, x, batch_topk=batch_topk, code=code)
    assert 0 < (f_ref > 0).float().mean() < 1, "the test inputs should switch some latents off"
    with torch.no_grad():
        f = sae.encode(x.to(dtype))
        _close(f, f_ref)
        _close(sae.decode(f_ref.to(dtype)), xhat_ref)
        _close(sae(x.to(dtype)), xhat_ref)


# --- dictionary_learning crosscoders -----------------------------------------------------------


@pytest.mark.parametrize("normaliser", [False, True])
def test_l1_crosscoder_matches_source(tmp_path: Path, normaliser: bool) -> None:
    sd = dl_crosscoder_state(L, D, N, batch_topk=False, normaliser=normaliser)
    folder = write_dl(tmp_path / "cc", sd, dl_crosscoder_config(L, D, N, batch_topk=False))
    sae = interop.load(folder, dtype="float64")
    assert isinstance(sae, Crosscoder) and sae.cfg.architecture() == "crosscoder"
    assert sae.cfg.code_normalisation == "crosscoder"
    assert (sae.cfg.norm_factors is not None) == normaliser
    _check_crosscoder(sae, sd, sample_inputs((32, L, D)), batch_topk=False, code="CROSSCODER")


@pytest.mark.parametrize(
    "code,normaliser", [("CROSSCODER", True), ("SAE", False), ("NONE", True), ("MIXED", True)]
)
def test_batchtopk_crosscoder_matches_source(tmp_path: Path, code: str, normaliser: bool) -> None:
    sd = dl_crosscoder_state(L, D, N, batch_topk=True, code=code, normaliser=normaliser)
    folder = write_dl(
        tmp_path / "cc", sd, dl_crosscoder_config(L, D, N, batch_topk=True, code=code)
    )
    label = {"MIXED": {"code_normalisation": "crosscoder"}}.get(code, {})
    sae = interop.load(folder, dtype="float64", **label)
    assert isinstance(sae, JumpReLUCrosscoder) and sae.cfg.k == 3
    _check_crosscoder(sae, sd, sample_inputs((64, L, D)), batch_topk=True, code=code)


def test_float32_default_matches_source(tmp_path: Path) -> None:
    sd = dl_crosscoder_state(L, D, N, batch_topk=True, normaliser=True)
    sae = interop.load(
        write_dl(tmp_path / "cc", sd, dl_crosscoder_config(L, D, N, batch_topk=True))
    )
    assert sae.W_enc.dtype == torch.float32
    _check_crosscoder(
        sae, sd, sample_inputs((64, L, D)), batch_topk=True, code="CROSSCODER", dtype=torch.float32
    )


def test_old_pt_checkpoint_with_compile_prefix_and_no_config(tmp_path: Path) -> None:
    sd = dl_crosscoder_state(L, D, N, batch_topk=True, normaliser=False)
    del sd["code_normalization_id"]  # older checkpoints: CROSSCODER assumed, as the source does
    write_dl(tmp_path / "old", sd, None, weights="checkpoint_100.pt", compile_prefix=True)
    with pytest.warns(UserWarning, match="assuming CROSSCODER"):
        sae = interop.load(tmp_path / "old" / "checkpoint_100.pt", dtype="float64")
    assert isinstance(sae, JumpReLUCrosscoder)
    _check_crosscoder(sae, sd, sample_inputs((64, L, D)), batch_topk=True, code="CROSSCODER")


def test_training_config_with_trainer_section_and_ae_pt(tmp_path: Path) -> None:
    sd = dl_sae_state(D, N, normaliser=True)
    cfg = {
        "trainer": {**dl_sae_config(D, N), "lm_name": "google/gemma-2-2b-it", "layer": 13},
        "buffer": {"ctx_len": 1024},
    }
    sae = interop.load(write_dl(tmp_path / "tr", sd, cfg, weights="ae.pt"), dtype="float64")
    x = sample_inputs((32, D))
    with torch.no_grad():
        _close(sae(x), ref_dl_sae(sd, x)[1])
    bad = {"trainer": {**dl_sae_config(D, N), "dict_size": N * 2}}
    with pytest.raises(interop.ShapeMismatchError, match="dict_size"):
        interop.load(write_dl(tmp_path / "tr2", sd, bad, weights="ae.pt"))


class _NotATensor:
    pass


def test_pt_files_are_read_with_weights_only(tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save(
        {"encoder.weight": torch.zeros(2, 3, 4), "payload": _NotATensor()}, folder / "model.pt"
    )
    with pytest.raises(interop.InteropError, match="weights_only=True"):
        interop.load(folder / "model.pt")


def test_embedding_bag_decoder_layers_are_stacked(tmp_path: Path) -> None:
    sd = dl_crosscoder_state(L, D, N, batch_topk=False)
    dec = sd.pop("decoder.weight")
    for i in range(L):
        sd[f"decoder.layers.{i}.weight"] = dec[i]
    sae = interop.load(
        write_dl(tmp_path / "eb", sd, dl_crosscoder_config(L, D, N, batch_topk=False)),
        dtype="float64",
    )
    sd["decoder.weight"] = dec
    _check_crosscoder(sae, sd, sample_inputs((16, L, D)), batch_topk=False, code="CROSSCODER")


# --- Δ convention -------------------------------------------------------------------------------


def test_relative_norm_in_project_convention_and_base_index(tmp_path: Path) -> None:
    sd = dl_crosscoder_state(L, D, N, batch_topk=False, normaliser=True)
    folder = write_dl(tmp_path / "cc", sd, dl_crosscoder_config(L, D, N, batch_topk=False))
    norms = sd["decoder.weight"].double().norm(dim=2)  # (L, n) in the source's normalised space
    expected = 0.5 * ((norms[0] - norms[1]) / torch.maximum(norms[0], norms[1]) + 1)
    _close(relative_norm(interop.load(folder, dtype="float64")), expected, atol=1e-6)
    # a source whose model 1 is the base: swapped so that index 0 = base, Δ mirrored
    swapped = interop.load(folder, dtype="float64", base_index=1)
    _close(relative_norm(swapped), 1 - expected, atol=1e-6)
    x = sample_inputs((16, L, D))
    _close(swapped.encode(x.flip(1)), interop.load(folder, dtype="float64").encode(x))


# --- BatchTopKSAE (chat-SAE, diff-SAE) ------------------------------------------------------------


@pytest.mark.parametrize("normaliser", [False, True])
def test_batchtopk_sae_matches_source(tmp_path: Path, normaliser: bool) -> None:
    sd = dl_sae_state(D, N, normaliser=normaliser)
    folder = write_dl(tmp_path / "sae", sd, dl_sae_config(D, N))
    sae = interop.load(folder, dtype="float64")
    assert type(sae) is JumpReLUSAE
    x = sample_inputs((64, D))
    f_ref, xhat_ref = ref_dl_sae(sd, x)
    assert 0 < (f_ref > 0).float().mean() < 1
    with torch.no_grad():
        _close(sae.encode(x), f_ref)
        _close(sae.decode(f_ref), xhat_ref)


@pytest.mark.parametrize("diff_sign", ["ft_minus_base", "base_minus_ft"])
def test_diff_sae_takes_paired_input(tmp_path: Path, diff_sign: str) -> None:
    sd = dl_sae_state(D, N, normaliser=True)
    sae = interop.load(
        write_dl(tmp_path / "d", sd, dl_sae_config(D, N)), dtype="float64", diff_sign=diff_sign
    )
    assert isinstance(sae, DiffSAE) and sae.cfg.diff_sign == diff_sign and sae.cfg.k == 4
    pair = torch.stack([sample_inputs((32, D), seed=5), sample_inputs((32, D), seed=6)], dim=-2)
    diff = pair[:, 1] - pair[:, 0] if diff_sign == "ft_minus_base" else pair[:, 0] - pair[:, 1]
    f_ref, xhat_ref = ref_dl_sae(sd, diff)
    with torch.no_grad():
        _close(sae.encode(pair), f_ref)
        _close(sae(pair), xhat_ref)


def test_transposed_sae_layouts_detected_by_shape(tmp_path: Path) -> None:
    sd = dl_sae_state(D, N)
    flipped = {
        **sd,
        "encoder.weight": sd["encoder.weight"].T.contiguous(),
        "decoder.weight": sd["decoder.weight"].T.contiguous(),
    }
    sae = interop.load(write_dl(tmp_path / "t", flipped, dl_sae_config(D, N)), dtype="float64")
    x = sample_inputs((32, D))
    with torch.no_grad():
        _close(sae(x), ref_dl_sae(sd, x)[1])


# --- replication format -------------------------------------------------------------------------


def test_replication_with_norm_factors(tmp_path: Path) -> None:
    sd = replication_state(D, N)
    folder = write_replication(tmp_path / "blocks.14.hook_resid_pre", sd, D, N)
    c = torch.tensor([0.4, 0.7], dtype=torch.float64)
    sae = interop.load(folder, norm_factors=c.tolist(), dtype="float64")
    assert isinstance(sae, Crosscoder) and sae.cfg.norm_factors == pytest.approx(c.tolist())
    assert sae.cfg.metadata.hook_name == "blocks.14.hook_resid_pre"
    x = sample_inputs((32, 2, D))
    f_ref, xhat_n = ref_replication(sd, x * c[:, None])
    with torch.no_grad():
        _close(sae.encode(x), f_ref)
        _close(sae.decode(f_ref), xhat_n / c[:, None])  # raw-space reconstruction
    # Δ in this project's convention, consistent with the source's ckkissane ratio
    nb, nc = sd["W_dec"].double().norm(dim=-1).unbind(-1)
    _close(relative_norm(sae), delta_from_ckkissane_ratio(nc / (nb + nc)), atol=1e-6)


def test_replication_without_factors_expects_scaled_inputs(tmp_path: Path) -> None:
    sd = replication_state(D, N)
    folder = write_replication(tmp_path / "r", sd, D, N)
    with pytest.warns(UserWarning, match="norm_factors"):
        sae = interop.load(folder, dtype="float64")
    assert sae.cfg.norm_factors is None
    x = sample_inputs((16, 2, D))
    f_ref, xhat_ref = ref_replication(sd, x)
    with torch.no_grad():
        _close(sae(x), xhat_ref)


# --- SAELens form: save, load_from_disk, converters ------------------------------------------------


@pytest.mark.parametrize("kind", ["crosscoder", "batchtopk_crosscoder", "diff_sae", "replication"])
def test_convert_saves_in_saelens_form(tmp_path: Path, kind: str) -> None:
    kwargs: dict = {}
    if kind == "replication":
        src = write_replication(tmp_path / "src", replication_state(D, N), D, N)
        kwargs["norm_factors"] = [0.5, 2.0]
        x = sample_inputs((16, 2, D))
    elif kind == "diff_sae":
        src = write_dl(tmp_path / "src", dl_sae_state(D, N, normaliser=True), dl_sae_config(D, N))
        kwargs["diff_sign"] = "ft_minus_base"
        x = sample_inputs((16, 2, D))
    else:
        bt = kind == "batchtopk_crosscoder"
        src = write_dl(
            tmp_path / "src",
            dl_crosscoder_state(L, D, N, batch_topk=bt, normaliser=True),
            dl_crosscoder_config(L, D, N, batch_topk=bt),
        )
        x = sample_inputs((16, L, D))
    direct = interop.load(src, **kwargs)
    out = interop.convert(src, tmp_path / "out", **kwargs)
    assert json.loads((out / "cfg.json").read_text())["architecture"] == direct.cfg.architecture()
    back = SAE.load_from_disk(out)
    assert type(back) is type(direct)
    with torch.no_grad():
        _close(back(x.float()), direct(x.float()), atol=0)
    via_converter = SAE.load_from_disk(src, converter=interop.disk_converter(**kwargs))
    with torch.no_grad():
        _close(via_converter(x.float()), direct(x.float()), atol=0)
    # a converted folder is itself a valid source (format "sae_lens")
    with torch.no_grad():
        _close(interop.load(out)(x.float()), direct(x.float()), atol=0)


# --- clear errors -------------------------------------------------------------------------------


def test_unknown_dict_class(tmp_path: Path) -> None:
    cfg = {**dl_crosscoder_config(L, D, N, batch_topk=False), "dict_class": "MatryoshkaCrossCoder"}
    folder = write_dl(tmp_path / "u", dl_crosscoder_state(L, D, N, batch_topk=False), cfg)
    with pytest.raises(
        interop.UnknownDictClassError, match="MatryoshkaCrossCoder.*Supported: BatchTopKCrossCoder"
    ):
        interop.load(folder)


def test_missing_keys_are_named(tmp_path: Path) -> None:
    sd = dl_crosscoder_state(L, D, N, batch_topk=True)
    del sd["decoder.bias"], sd["threshold"]
    folder = write_dl(tmp_path / "m", sd, dl_crosscoder_config(L, D, N, batch_topk=True))
    with pytest.raises(interop.MissingKeysError, match=r"\['decoder.bias'\]"):
        interop.load(folder)
    sd2 = dl_crosscoder_state(L, D, N, batch_topk=True)
    del sd2["threshold"]
    with pytest.raises(interop.MissingKeysError, match=r"\['threshold'\].*threshold=<value>"):
        interop.load(write_dl(tmp_path / "m2", sd2, dl_crosscoder_config(L, D, N, batch_topk=True)))
    sd3 = dl_sae_state(D, N, normaliser=True)
    del sd3["activation_std"]
    with pytest.raises(interop.MissingKeysError, match="activation_std"):
        interop.load(write_dl(tmp_path / "m3", sd3, dl_sae_config(D, N)))
    rep = replication_state(D, N)
    del rep["W_dec"]
    with pytest.raises(interop.MissingKeysError, match="W_dec"):
        interop.load(write_replication(tmp_path / "m4", rep, D, N), norm_factors=[1.0, 1.0])


def test_shape_mismatches(tmp_path: Path) -> None:
    sd = dl_crosscoder_state(L, D, N, batch_topk=False)
    cfg = {**dl_crosscoder_config(L, D, N, batch_topk=False), "dict_size": N + 1}
    with pytest.raises(interop.ShapeMismatchError, match="dict_size"):
        interop.load(write_dl(tmp_path / "s1", sd, cfg))
    bad = {**sd, "decoder.weight": sd["decoder.weight"][:, :-1]}
    with pytest.raises(interop.ShapeMismatchError, match=r"decoder.weight has shape \(2, 23, 8\)"):
        interop.load(
            write_dl(tmp_path / "s2", bad, dl_crosscoder_config(L, D, N, batch_topk=False))
        )
    rep = replication_state(D, N)
    rep["W_enc"] = rep["W_enc"][..., :-2]
    with pytest.raises(interop.ShapeMismatchError, match="W_enc"):
        interop.load(write_replication(tmp_path / "s3", rep, D, N), norm_factors=[1.0, 1.0])


def test_decoupled_and_mixed_codes(tmp_path: Path) -> None:
    sd = dl_crosscoder_state(L, D, N, batch_topk=True)
    sd["code_normalization_id"] = torch.tensor(5)
    sd["threshold"] = torch.tensor([0.1, 0.2])
    folder = write_dl(
        tmp_path / "dc", sd, dl_crosscoder_config(L, D, N, batch_topk=True, code="DECOUPLED")
    )
    with pytest.raises(interop.UnsupportedDictionaryError, match="decoupled"):
        interop.load(folder)
    with pytest.raises(NotImplementedError):  # also catchable as NotImplementedError
        interop.load(folder)
    # an L1 crosscoder's code normalisation only weights its training loss: converts with a label
    l1 = dl_crosscoder_state(L, D, N, batch_topk=False)
    l1["code_normalization_id"] = torch.tensor(5)
    l1_folder = write_dl(
        tmp_path / "l1", l1, dl_crosscoder_config(L, D, N, batch_topk=False, code="DECOUPLED")
    )
    with pytest.raises(interop.UnsupportedDictionaryError, match="code_normalisation="):
        interop.load(l1_folder)
    assert (
        interop.load(l1_folder, code_normalisation="crosscoder").cfg.code_normalisation
        == "crosscoder"
    )
    mixed = dl_crosscoder_state(L, D, N, batch_topk=True, code="MIXED")
    mixed_folder = write_dl(
        tmp_path / "mx", mixed, dl_crosscoder_config(L, D, N, batch_topk=True, code="MIXED")
    )
    with pytest.raises(interop.UnsupportedDictionaryError, match="MIXED"):
        interop.load(mixed_folder)


def test_conflicting_code_normalisation_and_unset_threshold(tmp_path: Path) -> None:
    sd = dl_crosscoder_state(L, D, N, batch_topk=True)
    cfg = dl_crosscoder_config(L, D, N, batch_topk=True, code="SAE")  # buffer says CROSSCODER
    with pytest.raises(interop.InteropError, match="code_normalization_id says CROSSCODER"):
        interop.load(write_dl(tmp_path / "c", sd, cfg))
    sd["threshold"] = torch.tensor(-1.0)
    folder = write_dl(tmp_path / "t", sd, dl_crosscoder_config(L, D, N, batch_topk=True))
    with pytest.raises(interop.UnsupportedDictionaryError, match="never set"):
        interop.load(folder)
    assert isinstance(interop.load(folder, threshold=0.5), JumpReLUCrosscoder)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(interop.InteropError, match="found none of"):
        interop.load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        interop.load(str(tmp_path / "does-not-exist"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="diff_sign"):
            interop.load(tmp_path / "empty", diff_sign="chat")
