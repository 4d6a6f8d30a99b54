"""The run's token source (sae_diff.training.tokens): chat_template_kwargs reach the template."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from families import family_tokenizers

from sae_diff.data.sources import TokenSource
from sae_diff.pairing.model import PairedModel
from sae_diff.training import tokens
from sae_diff.training.config import ConfigError, PairedRunnerConfig, config_from_dict

#: a Qwen3-style template whose assistant turns carry an empty thinking block exactly when
#: the caller passes enable_thinking=False (the variable changes the rendered tokens)
THINKING_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' and enable_thinking is defined "
    "and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MESSAGES = [
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello, how can I help"},
]


def chat_config(tmp_path: Path, **over: Any) -> PairedRunnerConfig:
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": MESSAGES}) + "\n")
    return config_from_dict(
        {
            "model_name": "ft",
            "base_model_name": "base",
            "smoke_test_models": {},
            "hook_name": "blocks.0.hook_resid_post",
            "dataset_path": str(tmp_path / "chat.jsonl"),
            "context_size": 8,
            "training_tokens": 64,
            "train_batch_size_tokens": 32,
            "sae": {"architecture": "batchtopk_crosscoder", "d_in": 32, "d_sae": 64, "k": 4},
            **over,
        }
    )


@pytest.mark.parametrize("kwargs", [None, {"enable_thinking": False}])
def test_chat_template_kwargs_reach_the_rendered_template(
    tmp_path: Path, kwargs: dict[str, Any] | None
) -> None:
    tok = family_tokenizers("qwen3")[1]  # no BOS: rows are the rendered conversation as is
    tok.chat_template = THINKING_TEMPLATE
    cfg = chat_config(tmp_path, chat_template_kwargs=kwargs)
    assert PairedRunnerConfig.from_dict(cfg.to_dict()).chat_template_kwargs == kwargs
    pair = cast(PairedModel, SimpleNamespace(tokenizer=tok))  # token_source reads the tokenizer
    source = tokens.token_source(cfg, pair)
    assert isinstance(source, TokenSource)  # a dataset, not the smoke-test random tokens
    ids = [t for row in source.rows() for t in row[0]]
    # independent reference: the tokenizer's own rendering with (or without) the variable
    want = tok(
        tok.apply_chat_template(MESSAGES, tokenize=False, **(kwargs or {})),
        add_special_tokens=False,
    )["input_ids"]
    assert ids and ids == want[: len(ids)]
    think = tok("<think>", add_special_tokens=False)["input_ids"]
    assert (think[0] in ids) is (kwargs is not None), "the variable did not change the tokens"


def test_chat_template_kwargs_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="chat_template_kwargs"):
        chat_config(tmp_path, chat_template_kwargs=["enable_thinking"])
