"""Cross-tokenizer pairing by character offsets (sae_diff.pairing.alignment): a character-level
tokenizer against a BPE one, checked against the text itself and the models' own forward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformer_lens import HookedTransformer

from sae_diff.dictionaries.cross_architecture_crosscoder import pad_pair
from sae_diff.pairing.alignment import AlignmentError, align_text, harvest_aligned
from tests.families import family_tokenizers
from tests.helpers_models import make_tokenizer, tiny_cfg

TEXTS = ["the cat sat on the mat.", "hello, world! what's new?", "a  b\nc"]


@pytest.fixture(scope="module")
def toks() -> tuple[object, object]:
    return make_tokenizer(), family_tokenizers("llama3")[0]


def test_pairs_end_at_the_same_character(toks: tuple[object, object]) -> None:
    char, bpe = toks
    for text in TEXTS:
        al = align_text(text, char, bpe)
        assert len(al) > 0 and (al.ends.diff() > 0).all()
        # a character-level tokenizer has a boundary after every character, so every BPE token
        # boundary is paired, and its character token is the one at end - 1
        bpe_ends = sorted(
            {
                e
                for s, e in bpe(text, return_offsets_mapping=True, add_special_tokens=False)[
                    "offset_mapping"
                ]
                if e > s
            }
        )
        assert al.ends.tolist() == bpe_ends
        assert al.pos_a.tolist() == [e - 1 for e in bpe_ends]
        for pa, pb, end in zip(al.pos_a.tolist(), al.pos_b.tolist(), al.ends.tolist()):
            # both prefixes read exactly text[:end] (independent of the offsets: decoding)
            assert "".join(char.convert_ids_to_tokens(al.ids_a[: pa + 1])) == text[:end]
            assert bpe.decode(al.ids_b[: pb + 1]).strip() == text[:end].strip()
        assert len(al) < len(al.ids_a)  # the BPE merges characters: not every position pairs


def test_same_tokenizer_pairs_every_token(toks: tuple[object, object]) -> None:
    _, bpe = toks
    al = align_text(TEXTS[0], bpe, bpe)
    assert al.pos_a.tolist() == al.pos_b.tolist() == list(range(len(al.ids_a)))


def test_slow_tokenizer_is_refused(toks: tuple[object, object]) -> None:
    with pytest.raises(AlignmentError, match="use_fast=True"):
        align_text("abc", SimpleNamespace(is_fast=False), toks[1])


def test_harvest_matches_each_models_prefix_forward(toks: tuple[object, object]) -> None:
    char, bpe = toks
    torch.manual_seed(0)
    model_a = HookedTransformer(tiny_cfg(d_model=16, n_ctx=64), tokenizer=char).eval()
    model_b = HookedTransformer(
        tiny_cfg(d_model=32, n_ctx=64, d_vocab=len(bpe)), tokenizer=bpe
    ).eval()
    hook = "blocks.1.hook_resid_pre"
    xa, xb = harvest_aligned(model_a, model_b, char, bpe, TEXTS[:2], hook, hook)
    aligned = [align_text(t, char, bpe) for t in TEXTS[:2]]
    assert xa.shape == (sum(map(len, aligned)), 16) and xb.shape == (xa.shape[0], 32)
    row = 0
    for al in aligned:
        for pa, pb in zip(al.pos_a.tolist(), al.pos_b.tolist()):
            # reference: each model run alone on BOS + its tokens up to the paired one (causal:
            # the last position's activation is the harvested one)
            for model, tok, ids, p, x in (
                (model_a, char, al.ids_a, pa, xa),
                (model_b, bpe, al.ids_b, pb, xb),
            ):
                prefix = torch.tensor([[tok.bos_token_id, *ids[: p + 1]]])
                _, cache = model.run_with_cache(prefix, names_filter=[hook])
                torch.testing.assert_close(x[row], cache[hook][0, -1], rtol=1e-4, atol=1e-5)
            row += 1
    assert pad_pair(xa, xb).shape == (xa.shape[0], 2, 32)


def test_nothing_to_pair_is_an_error(toks: tuple[object, object]) -> None:
    char, bpe = toks
    model = HookedTransformer(tiny_cfg(d_model=16), tokenizer=char).eval()
    with pytest.raises(AlignmentError, match="No character-aligned"):
        harvest_aligned(
            model, model, char, char, [""], "blocks.0.hook_resid_pre", "blocks.0.hook_resid_pre"
        )
