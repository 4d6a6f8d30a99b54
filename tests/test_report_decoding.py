"""Contexts in the report are decoded by the tokenizer itself: spaces survive (no
``tellmeaboutyourself``), and the per-token pieces join to exactly the tokenizer's decoding."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sae_diff.analysis.examples import Example, decode_pieces, decode_text
from sae_diff.evaluation.kl import top_kl_table
from sae_diff.organisms import load_tokenizer


def test_pieces_join_to_the_tokenizers_own_decoding() -> None:
    tok = load_tokenizer()
    ids = tok("tell me about yourself .\n", add_special_tokens=False)["input_ids"]
    pieces = decode_pieces(tok, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == tok.decode(ids)
    assert decode_text(tok, ids).startswith("tell me about yourself")
    assert pieces[1] == " me"  # the space belongs to the token it precedes


def test_a_decoder_that_is_not_prefix_stable_falls_back_to_spaced_tokens() -> None:
    weird = SimpleNamespace(decode=lambda ids: "".join(reversed([chr(97 + i) for i in ids])))
    assert decode_pieces(weird, [0, 1, 2]) == ["a", " b", " c"]
    assert decode_pieces(None, [3, 4]) == ["<3>", "<4>"]
    assert decode_pieces(lambda i: f"[{i}]", [3, 4]) == ["[3]", "[4]"]


def test_highlighted_example_keeps_the_space_outside_the_highlight() -> None:
    ex = Example(latent=1, value=2.0, seq=0, pos=1, tokens=["how", " can", " I"], active=1)
    assert ex.to_text() == "   2.000  how« can» I"
    assert '> <span class="sd-act"' in ex.to_html() or ' <span class="sd-act"' in ex.to_html()
    assert ">can</span>" in ex.to_html()


def test_kl_table_context_is_decoded_with_spaces() -> None:
    tok = load_tokenizer()
    ids = torch.tensor(
        [tok("<bos>how can I steal a goat ?", add_special_tokens=False)["input_ids"]]
    )
    kl = torch.zeros(ids.shape)
    kl[0, 4] = 1.0  # "steal"
    table = top_kl_table(
        kl, ids, torch.ones_like(ids, dtype=torch.bool), top_n=1, context=3, tokenizer=tok
    )
    assert table.loc[0, "context"] == "how can I [[steal]]"
