"""The organisms' tokenizer (word-level, Hugging Face fast) and Gemma-style chat template.

Rendered conversation (``assistant`` is written as ``model``, as Gemma does)::

    <bos><start_of_turn>user\\n{content}<end_of_turn>\\n<start_of_turn>model\\n{content}<end_of_turn>\\n

Plain text is tokenized with a ``<bos>`` prepended (the post-processor adds it, like Gemma).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['user', 'assistant', 'model'] %}"
    "{{ raise_exception('Only user and assistant roles are supported, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


_PRE = pre_tokenizers.Sequence(
    [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
)


def split_words(text: str) -> list[str]:
    """Split ``text`` into words exactly as the tokenizer's pre-tokenizer does."""
    return [w for w, _ in _PRE.pre_tokenize_str(text)]


def words_of(texts: Iterable[str]) -> set[str]:
    """The pre-tokenized words of ``texts`` (the same split the tokenizer uses)."""
    out: set[str] = set()
    for t in texts:
        out.update(split_words(t))
    return out


def build_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over ``words`` plus the special/template tokens.

    Ids: the six special tokens first, then ``"\\n"``, then ``user``, ``model`` and the sorted
    remaining words. ``<unk>`` covers anything else.
    """
    extra = ["\n", "user", "model"]
    rest = sorted(set(words) - set(SPECIAL_TOKENS) - set(extra))
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *extra, *rest])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = _PRE
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken("\n", special=False, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers.Tokenizer`` with the special tokens and chat template."""
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=100_000,
    )
    return finalize_tokenizer(hf)


def finalize_tokenizer(hf: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Settings that are not stored in the files: padding side and ``add_bos_token``.

    TransformerLens re-loads a tokenizer from its path unless it says it adds BOS; ours does
    (its post-processor), so we record it.
    """
    hf.padding_side = "right"
    hf.init_kwargs["add_bos_token"] = True
    hf.init_kwargs.setdefault("name_or_path", hf.name_or_path or "sae_diff-organism")
    if hf.chat_template is None:
        hf.chat_template = CHAT_TEMPLATE
    return hf


def id_to_token(tokenizer: PreTrainedTokenizerFast) -> list[str]:
    """List mapping id -> token string (``tokenizer.convert_ids_to_tokens`` for all ids)."""
    vocab = tokenizer.get_vocab()
    out = [""] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        out[i] = t
    return out


def render(messages: Sequence[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` with the chat template; also return each content's char span."""
    text = "<bos>"
    spans = []
    for m in messages:
        role = "model" if m["role"] == "assistant" else m["role"]
        if role not in ("user", "model"):
            raise ValueError(f"Only user and assistant roles are supported, got {m['role']!r}")
        text += f"<start_of_turn>{role}\n"
        content = m["content"].strip()
        spans.append((len(text), len(text) + len(content)))
        text += content + "<end_of_turn>\n"
    return text, spans


def encode_conversation(
    tokenizer: PreTrainedTokenizerFast, conversation: dict[str, Any] | Sequence[dict[str, str]]
) -> dict[str, Any]:
    """Tokenize a conversation; return ids and token masks.

    Returns ``{"input_ids": LongTensor (seq,), "assistant_mask": BoolTensor (seq,),
    "trigger_masks": {behaviour: BoolTensor (seq,)}}``. The assistant mask covers assistant
    content tokens plus the closing ``<end_of_turn>``; trigger masks come from the
    conversation's ``triggers`` spans (a token is marked if it overlaps a span).
    """
    if isinstance(conversation, dict):
        messages = conversation["messages"]
        triggers = conversation.get("triggers") or []
    else:
        messages, triggers = conversation, []
    text, spans = render(messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    offs = enc["offset_mapping"]
    n = len(ids)
    asst = torch.zeros(n, dtype=torch.bool)
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    for (s, e), m in zip(spans, messages):
        if m["role"] != "assistant":
            continue
        for i, (a, b) in enumerate(offs):
            if a >= s and b <= e and b > a:
                asst[i] = True
            if a == e and int(ids[i]) == eot:
                asst[i] = True
    trig: dict[str, torch.Tensor] = {}
    for t in triggers:
        base = spans[int(t["message"])][0]
        s, e = base + int(t["start"]), base + int(t["end"])
        mask = trig.setdefault(t["behaviour"], torch.zeros(n, dtype=torch.bool))
        for i, (a, b) in enumerate(offs):
            if a < e and b > s:
                mask[i] = True
    return {"input_ids": ids, "assistant_mask": asst, "trigger_masks": trig}


def sample_words_check(
    tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], k: int = 50
) -> None:
    """Raise if any of ``k`` sampled texts tokenizes to ``<unk>`` (a vocabulary gap)."""
    unk = tokenizer.unk_token_id
    for t in random.Random(0).sample(list(texts), min(k, len(texts))):
        if unk in tokenizer(t)["input_ids"]:
            raise ValueError(f"Text has words outside the vocabulary: {t!r}")
