"""Token masks: BOS, special, high-norm, first-n, padding, assistant (Gemma chat)."""

from __future__ import annotations

import pytest
import torch
from helpers_models import BOS_ID, EOT_ID, PAD_ID, SOT_ID, make_tokenizer

from sae_diff.pairing.masks import (
    MaskConfig,
    TokenMasks,
    assistant_mask,
    bos_mask,
    compute_masks,
    first_n_mask,
    high_norm_mask,
    padding_mask,
    special_token_mask,
)


def test_bos_special_padding() -> None:
    t = torch.tensor([[BOS_ID, 10, 11, SOT_ID, PAD_ID, PAD_ID]])
    assert bos_mask(t, BOS_ID).tolist() == [[True, False, False, False, False, False]]
    assert bos_mask(t, None).sum() == 0
    assert special_token_mask(t, [SOT_ID, PAD_ID]).tolist() == [
        [False, False, False, True, True, True]
    ]
    assert padding_mask(t, PAD_ID).tolist() == [[False] * 4 + [True] * 2]
    am = torch.tensor([[1, 1, 1, 1, 1, 0]])
    assert padding_mask(t, PAD_ID, attention_mask=am).tolist() == [[False] * 5 + [True]]


def test_high_norm() -> None:
    acts = torch.ones(2, 5, 4)
    acts[0, 0] *= 11.0  # 11x the median norm
    acts[1, 3] *= 9.0
    m = high_norm_mask(acts)
    assert m.tolist() == [[True] + [False] * 4, [False] * 5]
    assert high_norm_mask(acts, ratio=5.0)[1, 3]
    paired = torch.ones(1, 4, 2, 3)
    paired[0, 2, 1] *= 20.0  # only the ft model has a sink at position 2
    assert high_norm_mask(paired).tolist() == [[False, False, True, False]]
    with pytest.raises(ValueError, match="ratio"):
        high_norm_mask(acts, ratio=0)


def test_first_n_rows_and_docs() -> None:
    t = torch.zeros(1, 8, dtype=torch.long)
    assert first_n_mask(t, 2).tolist() == [[True, True] + [False] * 6]
    starts = torch.tensor([[False, False, True, False, False, True, False, False]])
    # tokens 0-1 continue a document from the previous row: not masked
    assert first_n_mask(t, 2, starts).tolist() == [
        [False, False, True, True, False, True, True, False]
    ]
    assert first_n_mask(t, 0).sum() == 0


def test_assistant_mask_gemma_chat() -> None:
    tok = make_tokenizer()
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "no"},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    t = torch.tensor([ids])
    m = assistant_mask(t, tok)

    def kept(mask: torch.Tensor) -> str:
        return "".join(tok.convert_ids_to_tokens([i for i, k in zip(ids, mask[0].tolist()) if k]))

    assert kept(m) == "yo<end_of_turn>no<end_of_turn>"
    m2 = assistant_mask(t, tok, include_end=False)
    assert kept(m2) == "yono"
    # a turn cut off by the row end stays masked to the end
    cut = t[:, : ids.index(EOT_ID, ids.index(EOT_ID) + 1) - 1]
    assert assistant_mask(cut, tok)[0, -1]


def test_compute_masks_and_config() -> None:
    tok = make_tokenizer()
    t = torch.tensor([[BOS_ID, 10, 11, 12, PAD_ID], [BOS_ID, 13, 14, 15, 16]])
    am = (t != PAD_ID).long()
    acts = torch.ones(2, 5, 2, 4)
    acts[:, 0] *= 50.0
    masks = compute_masks(t, tok, acts=acts, attention_mask=am, config=MaskConfig(first_n=2))
    d = masks.to_dict()
    assert set(d) == {"bos", "special", "high_norm", "first_n", "padding"}
    assert d["high_norm"][:, 0].all()
    keep = MaskConfig(first_n=2).keep(masks)
    assert keep.tolist() == [[False, False, True, True, False], [False, False, True, True, True]]
    keep_default = MaskConfig().keep(masks)
    assert keep_default.tolist() == [[False, True, True, True, False], [False] + [True] * 4]
    assert TokenMasks.from_dict(d).to_dict().keys() == d.keys()
    with pytest.raises(ValueError, match="assistant"):
        MaskConfig(only_assistant=True).keep(masks)


def test_keep_first_n_is_positional_and_template_flag() -> None:
    """``first_n`` drops the first n positions of each row whatever the stored first_n mask
    says (a cache harvested with another n, or per-document starts)."""
    t = torch.tensor([[BOS_ID, 10, 11, BOS_ID, 12, 13]])
    starts = torch.tensor([[True, False, False, True, False, False]])
    masks = compute_masks(t, make_tokenizer(), config=MaskConfig(first_n=1))
    assert masks.first_n.tolist() == [[True] + [False] * 5]
    masks.first_n = first_n_mask(t, 2, starts)  # a per-document mask must not leak into keep
    keep = MaskConfig(first_n=2, exclude_high_norm=False).keep(masks)
    assert keep.tolist() == [[False, False, True, False, True, True]]
    with pytest.raises(ValueError, match="template"):
        MaskConfig(exclude_template=True, exclude_high_norm=False).keep(masks)
    masks.template = torch.tensor([[True, False, False, False, False, True]])
    keep = MaskConfig(exclude_template=True, exclude_bos=False, exclude_high_norm=False).keep(masks)
    assert keep.tolist() == [[False, True, True, True, True, False]]
    with pytest.raises(ValueError, match="first_n"):
        MaskConfig(first_n=-1)


def test_compute_masks_uses_given_chat_masks() -> None:
    tok = make_tokenizer()
    t = torch.tensor([[BOS_ID, SOT_ID, 10, 11, EOT_ID]])
    given = torch.tensor([[False, False, True, True, True]])
    m = compute_masks(t, tok, assistant=given, template=~given)
    assert torch.equal(m.assistant, given) and torch.equal(m.template, ~given)
    with pytest.raises(ValueError, match="shape"):
        compute_masks(t, tok, assistant=given[:, :3])
    # without given masks, chat=True searches the row with markers read off the template
    assert compute_masks(t, tok, chat=True).assistant.sum() == 0  # no "model" header here


def test_assistant_mask_markers_inferred_or_explicit() -> None:
    from sae_diff.pairing.masks import ChatMarkers, chat_markers

    tok = make_tokenizer()
    assert chat_markers(tok) == ChatMarkers("<start_of_turn>model\n", "<end_of_turn>")
    ids = tok(
        tok.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            tokenize=False,
        ),
        add_special_tokens=False,
    )["input_ids"]
    t = torch.tensor([ids])
    inferred = assistant_mask(t, tok)
    assert torch.equal(inferred, assistant_mask(t, tok, role="model"))
    assert torch.equal(inferred, assistant_mask(t, tok, markers=chat_markers(tok)))
    with pytest.raises(ValueError, match="single token"):
        assistant_mask(t, tok, markers=ChatMarkers("<start_of_turn>model\n", "ab"))
