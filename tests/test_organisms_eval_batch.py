"""Organism.eval_batch / pad_conversations: held-out conversations as one padded batch."""

from __future__ import annotations

import pytest
import torch

from sae_diff.organisms import load_organism, pad_conversations


def test_eval_batch_pads_and_masks() -> None:
    org = load_organism()
    convs, tokens, valid, assistant = org.eval_batch(n=2)
    assert len(convs) == 2 * len(org.behaviours) == tokens.shape[0]
    pad_id = org.tokenizer.pad_token_id
    for i, c in enumerate(convs):
        n = len(c.tokens)
        assert (
            torch.equal(tokens[i, :n], c.tokens)
            and bool(valid[i, :n].all())
            and not valid[i, n:].any()
        )
        assert (tokens[i, n:] == pad_id).all()
        assert torch.equal(assistant[i, :n], c.assistant_mask.bool()) and not assistant[i, n:].any()


def test_pad_conversations_rejects_empty() -> None:
    with pytest.raises(ValueError, match="No conversations"):
        pad_conversations([], 0)
