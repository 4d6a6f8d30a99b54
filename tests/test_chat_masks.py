"""Chat masks from each family's own chat template, per conversation, through packing.

The assistant mask of :func:`encode_chat` (sentinel rendering + token offsets) is checked
against an independent computation that never looks at offsets or sentinels: render the
conversation prefix by prefix (``messages[:i]`` with the generation prompt, then
``messages[:i+1]``) and take the tokens the assistant message adds, up to and including
the first special token (the end-of-turn).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from families import FAMILIES, chat_rows, family_tokenizers
from helpers_models import BOS_ID, make_tokenizer, tiny_pair

from sae_diff.data.sources import TensorTokenSource, TokenBatch, TokenSource
from sae_diff.pairing.masks import (
    ChatMarkers,
    ChatTemplateError,
    MaskConfig,
    assistant_mask,
    chat_markers,
    encode_chat,
)

CONVERSATIONS = [r["messages"] for r in chat_rows(8, seed=0)]


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _render(tok, msgs, **kw) -> list[int]:
    return _ids(tok, tok.apply_chat_template(msgs, tokenize=False, **kw))


def _specials(tok) -> set[int]:
    ids = set(tok.all_special_ids)
    ids |= {i for i, t in tok.added_tokens_decoder.items() if t.special}
    return ids


def prefix_assistant_mask(msgs, tok) -> list[bool]:
    """Independent assistant mask: tokens added by each assistant message (prefix renders)."""
    full = _render(tok, msgs)
    specials = _specials(tok)
    mask = [False] * len(full)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _render(tok, msgs[:i], add_generation_prompt=True)
        upto = _render(tok, msgs[: i + 1])
        assert full[: len(before)] == before and upto[: len(before)] == before
        added = upto[len(before) :]
        end = next(k for k, t in enumerate(added) if t in specials)  # the end-of-turn token
        turn = added[: end + 1]
        assert full[len(before) : len(before) + len(turn)] == turn
        for k in range(len(before), len(before) + len(turn)):
            mask[k] = True
    return mask


@pytest.mark.parametrize("family", FAMILIES)
def test_assistant_mask_agrees_with_prefix_rendering(family: str) -> None:
    _, ft = family_tokenizers(family)
    agree = total = n_assistant = 0
    for msgs in CONVERSATIONS:
        enc = encode_chat(msgs, ft)
        assert enc.input_ids == _render(ft, msgs)  # the ids the template gives, unchanged
        expected = prefix_assistant_mask(msgs, ft)
        agree += sum(a == b for a, b in zip(enc.assistant, expected))
        total += len(expected)
        n_assistant += sum(expected)
        assert enc.assistant == expected, family
    assert agree == total and n_assistant > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_template_mask_is_everything_but_contents(family: str) -> None:
    """Decoding the non-template tokens of each message gives back its content."""
    _, ft = family_tokenizers(family)
    for msgs in CONVERSATIONS:
        enc = encode_chat(msgs, ft)
        ids = torch.tensor(enc.input_ids)
        content_ids = ids[~torch.tensor(enc.template)].tolist()
        got = ft.decode(content_ids, skip_special_tokens=False)
        assert got.replace(" ", "") == "".join(m["content"] for m in msgs).replace(" ", "")
        # BOS and every special token the template writes is template
        for i, t in enumerate(enc.input_ids):
            if t in _specials(ft):
                assert enc.template[i]
        # the end-of-turn closing an assistant turn is both template and assistant
        both = [a and t for a, t in zip(enc.assistant, enc.template)]
        n_asst_turns = sum(m["role"] == "assistant" for m in msgs)
        assert sum(both) == n_asst_turns


def test_organism_template_matches_organism_encoder() -> None:
    """The organisms' own encoder (assistant content + closing <end_of_turn>) agrees."""
    from sae_diff.organisms.chat import build_tokenizer, encode_conversation, words_of

    msgs = [
        {"role": "user", "content": "  what is the capital of france ?"},
        {"role": "assistant", "content": "paris is the capital . "},
        {"role": "user", "content": "and of spain ?"},
        {"role": "assistant", "content": "madrid ."},
    ]
    tok = build_tokenizer(words_of(m["content"] for m in msgs))
    ref = encode_conversation(tok, msgs)
    enc = encode_chat(msgs, tok)
    assert enc.input_ids == ref["input_ids"].tolist()
    assert enc.assistant == ref["assistant_mask"].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_markers_read_off_template(family: str) -> None:
    """Token-level search with markers inferred from the template finds the same turns on
    unpacked conversations."""
    _, ft = family_tokenizers(family)
    mk = chat_markers(ft)
    for msgs in CONVERSATIONS[:4]:
        enc = encode_chat(msgs, ft)
        got = assistant_mask(torch.tensor([enc.input_ids]), ft, markers=mk)[0].tolist()
        assert got == enc.assistant
    # explicit markers override the alignment for the assistant mask
    enc = encode_chat(CONVERSATIONS[0], ft, markers=mk)
    assert enc.assistant == prefix_assistant_mask(CONVERSATIONS[0], ft)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("family", ["llama3", "qwen2", "gemma2"])
def test_packing_keeps_every_assistant_token(family: str, tmp_path: Path) -> None:
    """At context 32 most turns cross rows; the packed rows' masks equal the conversations'."""
    _, ft = family_tokenizers(family)
    rows = chat_rows(12, seed=1)
    f = _jsonl(tmp_path / "chat.jsonl", rows)
    src = TokenSource(str(f), ft, context_size=32)
    batches = list(src.batches(4))
    b = TokenBatch.concat(batches)
    assert b.assistant is not None and b.template is not None
    # rebuild the stream: drop the BOS each continued row starts with
    bos = ft.bos_token_id
    toks, asst = [], []
    for r in range(len(b)):
        lead = int(bos is not None and not b.doc_starts[r, 0])
        toks += b.tokens[r, lead:].tolist()
        asst += b.assistant[r, lead:].tolist()
        assert not b.assistant[r, :lead].any()
    stream, expected = [], []
    for row in rows:
        enc = encode_chat(row["messages"], ft)
        ids, mask = enc.input_ids, enc.assistant
        if bos is not None and ids[0] != bos:
            ids, mask = [bos, *ids], [False, *mask]
        stream += ids
        expected += mask
    n = len(toks)
    assert toks == stream[:n] and n == len(stream) - src.stats.dropped_tail_tokens
    assert asst == expected[:n]  # no assistant token lost or added by packing
    # the old per-row search misses turns continued from the previous row
    per_row = assistant_mask(b.tokens, ft, markers=chat_markers(ft))
    assert int(per_row.sum()) < int(b.assistant.sum())


def test_first_n_and_bos_on_a_packed_row(tmp_path: Path) -> None:
    """``mask_first_n: 2, mask_bos: true`` on ``[BOS a b c d BOS e f g h]`` keeps b..h."""
    tok = make_tokenizer()
    f = _jsonl(tmp_path / "t.jsonl", [{"text": "abcd"}, {"text": "efgh"}])
    b = next(TokenSource(str(f), tok, context_size=10).batches(1))
    assert b.tokens[0].tolist() == [BOS_ID, *_ids(tok, "abcd"), BOS_ID, *_ids(tok, "efgh")]
    cfg = MaskConfig(first_n=2, exclude_bos=True, exclude_high_norm=False)
    keep = cfg.keep(b.masks(tok, config=cfg))
    assert "".join(tok.convert_ids_to_tokens(b.tokens[0][keep[0]].tolist())) == "bcdefgh"
    # first_n alone: positions 0 and 1 of the row (not of each document)
    keep = MaskConfig(first_n=2, exclude_bos=False, exclude_high_norm=False).keep(b.masks(tok))
    assert keep[0].tolist() == [False, False] + [True] * 8


def test_no_fake_bos_without_a_bos_token(tmp_path: Path) -> None:
    base, ft = family_tokenizers("qwen2")
    assert ft.bos_token_id is None
    rows = chat_rows(6, seed=2)
    f = _jsonl(tmp_path / "chat.jsonl", rows)
    src = TokenSource(str(f), ft, context_size=32)
    assert src.prepend_bos is False
    b = TokenBatch.concat(list(src.batches(8)))
    stream = sum((encode_chat(r["messages"], ft).input_ids for r in rows), [])
    assert b.tokens.flatten().tolist() == stream[: b.tokens.numel()]  # nothing inserted
    masks = b.masks(ft)
    assert not masks.bos.any()
    # the row start is maskable on its own
    keep = MaskConfig(first_n=1, exclude_high_norm=False).keep(masks)
    assert not keep[:, 0].any() and keep[:, 1:].all()
    with pytest.raises(ValueError, match="no BOS token"):
        TokenSource(str(f), ft, context_size=32, prepend_bos=True)
    # a text tokenizer with BOS still gets it by default
    assert TokenSource(str(f), make_tokenizer(), 32).prepend_bos is True


def test_harvest_passes_attention_mask(tmp_path: Path) -> None:
    """Left- and right-padded rows give the activations of the unpadded sequence."""
    from sae_diff.data.cache import ActivationCache
    from sae_diff.data.harvest import harvest_cache
    from sae_diff.pairing.model import PairedModel

    torch.set_num_threads(1)
    base, ft = tiny_pair(n_layers=2)
    pair = PairedModel(base, ft, base_name="b", ft_name="f")
    hook = "blocks.1.hook_resid_post"
    g = torch.Generator().manual_seed(0)
    seq, real = 12, [12, 7, 9, 5]
    tokens = torch.full((4, seq), 2, dtype=torch.long)  # PAD
    am = torch.zeros(4, seq, dtype=torch.bool)
    unpadded = []
    for r, n in enumerate(real):
        u = torch.randint(5, 30, (n,), generator=g)
        u[0] = BOS_ID
        unpadded.append(u)
        if r % 2:  # left-padded
            tokens[r, seq - n :], am[r, seq - n :] = u, True
        else:  # right-padded
            tokens[r, :n], am[r, :n] = u, True
    harvest_cache(
        pair,
        TensorTokenSource(tokens, am),
        tmp_path / "c",
        hook,
        batch_size=4,
        rows_per_shard=4,
        progress=False,
        verbose=False,
    )
    data = ActivationCache(tmp_path / "c").read_all()
    assert data["mask_padding"].tolist() == (~am).tolist()
    for r, u in enumerate(unpadded):
        for m, model in enumerate((base, ft)):
            _, cache = model.run_with_cache(u[None], names_filter=[hook])
            torch.testing.assert_close(
                data["acts"][r, am[r], m], cache[hook][0], rtol=1e-4, atol=1e-4
            )


def test_tensor_source_chat_masks_and_batch_helpers() -> None:
    tok = make_tokenizer()
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    enc = encode_chat(msgs, tok)
    ids = torch.tensor([enc.input_ids] * 3)
    asst = torch.tensor([enc.assistant] * 3)
    src = TensorTokenSource(ids, assistant=asst, template=torch.tensor([enc.template] * 3))
    assert src.is_chat
    bs = list(src.batches(2))
    cat = TokenBatch.concat(bs)
    assert torch.equal(cat.assistant, asst) and torch.equal(cat.select(1, 3).tokens, ids[1:])
    m = cat.masks(tok)
    assert torch.equal(m.assistant, asst) and m.template is not None
    assert MaskConfig(only_assistant=True, exclude_high_norm=False).keep(m).sum() == 3 * 3
    with pytest.raises(ValueError, match="with and without"):
        TokenBatch.concat([bs[0], next(TensorTokenSource(ids).batches(1))])
    with pytest.raises(ValueError, match="shape"):
        TensorTokenSource(ids, assistant=asst[:, :2])


def test_bad_conversations_name_the_problem() -> None:
    tok = make_tokenizer()
    with pytest.raises(ChatTemplateError, match="message 1"):
        encode_chat([{"role": "user", "content": "hi"}, {"content": "x"}], tok)
    with pytest.raises(ChatTemplateError, match="string contents"):
        encode_chat([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], tok)
    with pytest.raises(ChatTemplateError, match="chat template"):
        encode_chat([{"role": "user", "content": "hi"}], make_tokenizer(chat_template=None))
    twice = make_tokenizer(
        chat_template="{% for m in messages %}{{ m['content'] + m['content'] }}{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match="more than once"):
        encode_chat([{"role": "user", "content": "hi"}], twice)
    # explicit markers are the escape hatch: assistant mask from them, template mask empty
    with pytest.warns(UserWarning, match="cannot be aligned"):
        enc = encode_chat(
            [{"role": "user", "content": "hi"}],
            twice,
            markers=ChatMarkers("<start_of_turn>model\n", "<end_of_turn>"),
        )
    assert not any(enc.template) and not any(enc.assistant)


def test_harvest_stores_per_conversation_chat_masks(tmp_path: Path) -> None:
    """The cache records the masks the source computed per conversation (not a re-search of
    the packed rows), so only_assistant trains on every assistant token."""
    from sae_diff.data.cache import ActivationCache
    from sae_diff.data.harvest import harvest_cache
    from sae_diff.pairing.model import PairedModel

    torch.set_num_threads(1)
    tok = make_tokenizer()
    base, ft = tiny_pair(n_layers=2, tokenizer=tok)
    pair = PairedModel(base, ft)
    convs = [
        {
            "messages": [
                {"role": "user", "content": f"question {i}, please?"},
                {"role": "assistant", "content": "a long answer that crosses rows " * (1 + i % 2)},
            ]
        }
        for i in range(6)
    ]
    f = _jsonl(tmp_path / "chat.jsonl", convs)
    src = TokenSource(str(f), tok, context_size=16)
    expected = TokenBatch.concat(list(src.batches(8)))
    harvest_cache(
        pair,
        src,
        tmp_path / "c",
        "blocks.0.hook_resid_post",
        batch_size=3,
        rows_per_shard=5,
        progress=False,
        verbose=False,
    )
    data = ActivationCache(tmp_path / "c").read_all()
    assert torch.equal(data["tokens"], expected.tokens)
    assert torch.equal(data["mask_assistant"], expected.assistant)
    assert torch.equal(data["mask_template"], expected.template)
    # every assistant token of the harvested part of the stream is in the cache
    stream_mask: list[bool] = []
    for c in convs:
        enc = encode_chat(c["messages"], tok)
        stream_mask += enc.assistant if enc.input_ids[0] == BOS_ID else [False, *enc.assistant]
    used = len(stream_mask) - src.stats.dropped_tail_tokens
    assert int(data["mask_assistant"].sum()) == sum(stream_mask[:used]) > 0


# Qwen3-style template with the empty think block before the last assistant turn and
# reasoning split out of an assistant content (written for this test, renders like Qwen3's).
QWEN3_THINK_TEMPLATE = (
    "{%- set ns = namespace(last=messages|length - 1) %}"
    "{%- for m in messages[::-1] %}{%- set i = (messages|length - 1) - loop.index0 %}"
    "{%- if m.role == 'user' and ns.last == messages|length - 1 %}{%- set ns.last = i %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- set content = message.content %}"
    "{%- if message.role in ['user', 'system'] %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_qwen3_think_block_is_template_and_reasoning_needs_markers() -> None:
    _, ft = family_tokenizers("qwen3")
    ft.chat_template = QWEN3_THINK_TEMPLATE
    msgs = [
        {"role": "user", "content": "Hello world"},
        {"role": "assistant", "content": "Yes good"},
        {"role": "user", "content": "Why"},
        {"role": "assistant", "content": "Because data"},
    ]
    enc = encode_chat(msgs, ft)
    toks = ft.convert_ids_to_tokens(enc.input_ids)
    asst = "".join(t for t, k in zip(toks, enc.assistant) if k)
    assert asst == "YesĠgood<|im_end|>BecauseĠdata<|im_end|>"
    think = [i for i, t in enumerate(toks) if t in ("<think>", "</think>")]
    assert len(think) == 2 and all(enc.template[i] and not enc.assistant[i] for i in think)
    # reasoning inside a content is moved by the template: not alignable, the error says
    # what to do, and markers give the whole generated turn
    msgs[3] = {"role": "assistant", "content": "<think>\nmaybe cat\n</think>\n\nBecause data"}
    with pytest.raises(ChatTemplateError, match="ChatMarkers"):
        encode_chat(msgs, ft)
    mk = ChatMarkers("<|im_start|>assistant\n", "<|im_end|>")
    with pytest.warns(UserWarning, match="cannot be aligned"):
        enc = encode_chat(msgs, ft, markers=mk)
    toks = ft.convert_ids_to_tokens(enc.input_ids)
    asst = "".join(t for t, k in zip(toks, enc.assistant) if k)
    assert asst.startswith("YesĠgood<|im_end|><think>") and asst.endswith("BecauseĠdata<|im_end|>")


def test_bundled_organism_chat_data_agrees_with_organism_mask() -> None:
    """On the organism's own chat data, encode_chat equals the organism's token-level
    assistant mask (content + closing <end_of_turn>), conversation by conversation."""
    from sae_diff.organisms.organism import assistant_mask as organism_assistant_mask
    from sae_diff.organisms.organism import chat_dataset, load_tokenizer

    tok = load_tokenizer()
    for row in chat_dataset("train", n=40):
        enc = encode_chat(row["messages"], tok)
        ref = organism_assistant_mask(torch.tensor([enc.input_ids]))[0].tolist()
        assert enc.assistant == ref and any(ref)


@pytest.mark.filterwarnings("ignore:the base and ft tokenizers share")  # expected for these pairs
@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_harvest_padded_rows_match_hf_forward(family: str, tmp_path: Path) -> None:
    """Rotary families: left/right-padded rows harvested with their attention mask equal
    Hugging Face's own forward on the unpadded sequence (hidden state after block 0)."""
    from families import build_family_pair
    from transformers import AutoModelForCausalLM

    from sae_diff.data.cache import ActivationCache
    from sae_diff.data.harvest import harvest_cache
    from sae_diff.pairing.model import PairedModel

    torch.set_num_threads(1)
    base_dir, ft_dir = build_family_pair(family)
    pair = PairedModel.from_pretrained(str(base_dir), str(ft_dir), device="cpu")
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(300, 400, (n,), generator=g) for n in (7, 12, 4)]
    tokens = torch.zeros(3, 12, dtype=torch.long)
    am = torch.zeros(3, 12, dtype=torch.bool)
    for r, u in enumerate(seqs):
        sl = slice(12 - len(u), 12) if r % 2 == 0 else slice(0, len(u))  # left, right, left
        tokens[r, sl], am[r, sl] = u, True
    harvest_cache(
        pair,
        TensorTokenSource(tokens, am),
        tmp_path / "c",
        "blocks.0.hook_resid_post",
        batch_size=3,
        rows_per_shard=3,
        progress=False,
        verbose=False,
    )
    acts = ActivationCache(tmp_path / "c").read_all()["acts"]
    for m, d in enumerate((base_dir, ft_dir)):
        hf = AutoModelForCausalLM.from_pretrained(d).eval()
        for r, u in enumerate(seqs):
            with torch.no_grad():
                ref = hf(u[None], output_hidden_states=True).hidden_states[1][0]
            torch.testing.assert_close(acts[r, am[r], m], ref, rtol=1e-4, atol=1e-4)
