"""Token sources: local text / pre-tokenised / chat datasets, mixtures, packing, truncation."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from helpers_models import BOS_ID, PAD_ID, make_tokenizer

from sae_diff.data.sources import DatasetSpec, TensorTokenSource, TokenSource, mix_documents

TEXTS = ["the cat sat on the mat.", "a dog ran far away!", "birds sing", "hello there, friend"]
CHATS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    [{"role": "user", "content": "why?"}, {"role": "assistant", "content": "because."}],
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def tok():
    return make_tokenizer()


def test_text_packing_like_saelens(tmp_path: Path, tok) -> None:
    f = _jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS * 3])
    src = TokenSource(str(f), tok, context_size=16)
    batches = list(src.batches(4))
    toks = torch.cat([b.tokens for b in batches])
    assert toks.shape[1] == 16 and (toks[:, 0] == BOS_ID).all()
    # the packed stream (minus the row-start BOS of continued docs) is the documents with BOS
    stream = [BOS_ID] + tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    assert toks[0, : len(stream)].tolist() == stream[:16]
    starts = torch.cat([b.doc_starts for b in batches])
    assert starts[0, 0] and (toks[starts] == BOS_ID).all()
    assert torch.cat([b.row_index for b in batches]).tolist() == list(range(toks.shape[0]))
    assert not src.is_chat and src.stats.documents == 12
    # deterministic and resumable by skipping rows
    again = torch.cat([b.tokens for b in src.batches(3, start_row=2)])
    torch.testing.assert_close(again, toks[2:])


def test_truncation_counts_and_pads(tmp_path: Path, tok) -> None:
    f = _jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS])
    src = TokenSource(str(f), tok, context_size=12, packing=False)
    b = next(src.batches(10))
    assert b.tokens.shape == (4, 12)
    lens = [len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in TEXTS]
    assert b.attention_mask.sum(1).tolist() == [min(n, 12) for n in lens]
    assert (b.tokens[~b.attention_mask] == PAD_ID).all()
    assert src.stats.truncated_tokens == sum(max(n - 12, 0) for n in lens) > 0


def test_pretokenised_parquet_and_disk_folder(tmp_path: Path, tok) -> None:
    rows = [{"input_ids": list(range(5, 5 + 10))} for _ in range(4)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "x.parquet"))
    ds.save_to_disk(str(tmp_path / "folder"))
    for path in (tmp_path / "x.parquet", tmp_path / "folder"):
        src = TokenSource(
            DatasetSpec(str(path), kind="tokens"), tok, context_size=11, packing=False
        )
        b = next(src.batches(4))
        assert b.tokens[0].tolist() == [BOS_ID, *range(5, 15)]
    # streaming from a local file
    src = TokenSource(
        DatasetSpec(str(tmp_path / "x.parquet"), streaming=True), tok, 11, packing=False
    )
    assert next(src.batches(2)).tokens.shape == (2, 11)


def test_chat_rendered_with_template_and_mixture(tmp_path: Path, tok) -> None:
    text = _jsonl(tmp_path / "text.jsonl", [{"text": t * 3} for t in TEXTS * 20])
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS * 40])
    csrc = TokenSource(str(chat), tok, context_size=64, packing=False)
    assert csrc.is_chat
    b = next(csrc.batches(1))
    expected = tok(tok.apply_chat_template(CHATS[0], tokenize=False), add_special_tokens=False)[
        "input_ids"
    ]
    assert b.tokens[0, : len(expected)].tolist() == expected and bool(b.is_chat[0])

    mix = TokenSource([str(text), str(chat)], tok, context_size=32, proportions=[3, 1], max_rows=20)
    rows = list(mix.batches(5))
    assert sum(len(r) for r in rows) == 20
    got = mix.stats.per_dataset_tokens
    assert abs(got[0] / sum(got) - 0.75) < 0.1
    assert mix.describe()["proportions"] == [3.0, 1.0]


def test_mix_documents_deficit_schedule() -> None:
    a = iter([[1] * 10] * 100)
    b = iter([[2] * 10] * 100)
    picks = [i for i, _ in itertools_take(mix_documents([a, b], [1, 3]), 40)]
    assert picks.count(1) == 30


def itertools_take(it, n):
    import itertools

    return list(itertools.islice(it, n))


def test_bad_inputs(tmp_path: Path, tok) -> None:
    f = _jsonl(tmp_path / "t.jsonl", [{"body": "x"}])
    with pytest.raises(ValueError, match="cannot find a auto column"):
        list(TokenSource(str(f), tok, 8).batches(1))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(TokenSource(str(tmp_path / "nope.jsonl"), tok, 8).batches(1))
    with pytest.raises(ValueError, match="proportions"):
        TokenSource([str(f), str(f)], tok, 8, proportions=[1.0])
    chat = _jsonl(tmp_path / "c.jsonl", [{"messages": CHATS[0]}])
    with pytest.raises(ValueError, match="chat template"):
        list(TokenSource(str(chat), make_tokenizer(chat_template=None), 8).batches(1))


def test_tensor_source() -> None:
    t = torch.arange(40).reshape(5, 8) % 30
    src = TensorTokenSource(t)
    got = torch.cat([b.tokens for b in src.batches(2)])
    torch.testing.assert_close(got, t)
    assert [len(b) for b in src.batches(2, start_row=1)] == [2, 2]


def test_chat_masks_travel_with_truncated_rows(tmp_path: Path, tok) -> None:
    from sae_diff.pairing.masks import encode_chat

    chat = _jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in CHATS])
    b = next(TokenSource(str(chat), tok, context_size=40, packing=False).batches(2))
    for r, msgs in enumerate(CHATS):
        enc = encode_chat(msgs, tok)
        n = len(enc.input_ids)
        assert b.assistant[r, :n].tolist() == enc.assistant
        assert b.template[r, :n].tolist() == enc.template
        assert not b.assistant[r, n:].any() and not b.template[r, n:].any()  # padding


def test_text_sources_carry_no_chat_masks_and_describe_is_stable(tmp_path: Path, tok) -> None:
    from sae_diff.data.documents import iter_documents

    f = _jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS])
    src = TokenSource(str(f), tok, context_size=8)
    b = next(src.batches(2))
    assert b.assistant is None and b.template is None
    # the manifest description keeps its keys (caches harvested before still resume)
    assert set(src.describe()) == {
        "datasets",
        "proportions",
        "context_size",
        "packing",
        "prepend_bos",
        "max_rows",
    }
    docs = list(iter_documents(str(f), tok))
    assert docs[0] == tok(TEXTS[0], add_special_tokens=False)["input_ids"]


def test_tensor_source_left_padding_doc_start() -> None:
    t = torch.arange(12).reshape(2, 6) % 30 + 5
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    b = next(TensorTokenSource(t, am).batches(2))
    assert b.doc_starts.nonzero().tolist() == [[0, 2], [1, 0]]
    assert torch.equal(b.attention_mask, am)
