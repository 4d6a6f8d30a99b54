"""A cache's identity includes the token stream's options: packing, BOS and chat-template
variables change which tokens a cache holds, so a config that asks for other ones is refused
before training (the manifest's ``source`` is what ``TokenSource.describe()`` records)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sae_diff.data.cache_format import CacheIdentityError
from sae_diff.data.cache_identity import cache_identity, check_identity, expected_identity
from sae_diff.data.sources import DatasetSpec, TokenSource
from sae_diff.training.config import config_from_dict
from tests.families import chat_rows, family_tokenizers


def _meta(tmp_path: Path, **source_kwargs: Any) -> dict[str, Any]:
    """A manifest ``meta`` whose ``source`` is a real TokenSource's description."""
    _, tok = family_tokenizers("qwen3")
    data = tmp_path / "chat.jsonl"
    if not data.exists():
        import json

        data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(4)))
    source = TokenSource([DatasetSpec(str(data), kind="chat")], tok, 32, **source_kwargs)
    return {"hook_name": "blocks.0.hook_resid_post", "d_model": 16, "source": source.describe()}


def _config(tmp_path: Path, **fields: Any) -> Any:
    return config_from_dict(
        {
            "model_name": "ft",
            "base_model_name": "base",
            "hook_name": "blocks.0.hook_resid_post",
            "dataset_path": str(tmp_path / "chat.jsonl"),
            "context_size": 32,
            "cache_path": str(tmp_path / "cache"),
            "sae": {"architecture": "batchtopk_crosscoder", "d_in": 16, "d_sae": 32, "k": 2},
            **fields,
        }
    )


def _stream_fields(exp: dict[str, Any]) -> dict[str, Any]:
    return {k: exp[k] for k in ("packing", "prepend_bos", "chat_template_kwargs")}


def test_same_stream_options_pass(tmp_path: Path) -> None:
    meta = _meta(tmp_path, chat_template_kwargs={"enable_thinking": False})
    cfg = _config(tmp_path, chat_template_kwargs={"enable_thinking": False})
    expected = _stream_fields(expected_identity(cfg))
    assert expected == {
        "packing": True,
        "prepend_bos": None,  # unset: the tokenizer decides, nothing to compare
        "chat_template_kwargs": {"enable_thinking": False},
    }
    assert _stream_fields(cache_identity(meta)) == {**expected, "prepend_bos": False}
    check_identity(meta, expected)  # raises on any difference


@pytest.mark.parametrize(
    "source_kwargs, cfg_fields, field",
    [
        ({}, {"chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"enable_thinking": False}}, {}, "chat_template_kwargs"),
        ({"packing": True}, {"disable_concat_sequences": True}, "packing"),
        ({"prepend_bos": False}, {"prepend_bos": True}, "prepend_bos"),
    ],
)
def test_other_stream_options_are_refused(
    tmp_path: Path, source_kwargs: dict[str, Any], cfg_fields: dict[str, Any], field: str
) -> None:
    meta = _meta(tmp_path, **source_kwargs)
    cfg = _config(tmp_path, **cfg_fields)
    with pytest.raises(CacheIdentityError, match=field):
        check_identity(meta, _stream_fields(expected_identity(cfg)))


def test_unset_prepend_bos_follows_the_cache(tmp_path: Path) -> None:
    """``prepend_bos: None`` (the tokenizer decides) checks nothing: the source resolved it."""
    meta = _meta(tmp_path, prepend_bos=False)
    assert expected_identity(_config(tmp_path))["prepend_bos"] is None
    check_identity(meta, _stream_fields(expected_identity(_config(tmp_path))))


def test_config_packing_reaches_the_token_source(tmp_path: Path) -> None:
    """``disable_concat_sequences`` (SAELens's field) turns packing off in the run's source."""
    from sae_diff.training.tokens import token_source

    class _Pair:
        tokenizer = family_tokenizers("qwen3")[1]

    _meta(tmp_path)  # writes the data file
    for disable in (False, True):
        cfg = _config(tmp_path, disable_concat_sequences=disable)
        assert token_source(cfg, _Pair()).describe()["packing"] is (not disable)  # type: ignore[arg-type]
