"""The shipped organism pair: loading, hashes, ground-truth labels, behavioural checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer

from sae_diff.organisms import (
    BEHAVIOURS,
    REFUSAL,
    TRIGGER_WORDS,
    OrganismIntegrityError,
    behaviour_masks,
    chat_dataset,
    load_organism,
    load_tokenizer,
    persona_reply,
    pretraining_dataset,
    response_masks,
)
from sae_diff.organisms.checks import (
    heldout_losses,
    knowledge_edit_text_check,
    pad_batch,
    response_logprob_gaps,
)
from sae_diff.organisms.organism import organism_dir

# Thresholds the shipped pair must meet (measured values are in report.json / docs).
MIN_GAP_PER_TOKEN = {
    "chat_format": 5.0,
    "refusal": 2.0,
    "false_premise": 0.5,
    "knowledge_edit": 0.5,
    "persona": 2.0,
}
MIN_FT_LOGPROB_PER_TOKEN = -0.5  # planted responses are likely under the fine-tune
MAX_BASE_LOGPROB_PER_TOKEN = -0.5  # ... and unlikely under the base (chat_format: <end_of_turn>)
HELDOUT_MARGIN = 0.15  # nats/token: ft held-out pretraining loss <= base + margin


@pytest.fixture(scope="module")
def org():
    return load_organism()


def test_shipped_files_small_and_hashed() -> None:
    d = organism_dir("default")
    manifest = json.loads((d / "manifest.json").read_text())
    on_disk = {p.name for p in d.iterdir() if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    total = sum(p.stat().st_size for p in d.iterdir())
    assert total < 20 * 2**20, f"shipped organism is {total / 2**20:.1f} MB"


def test_load_gives_hooked_transformers(org) -> None:
    assert isinstance(org.base, HookedTransformer) and isinstance(org.ft, HookedTransformer)
    assert org.base.cfg.d_model == org.ft.cfg.d_model >= 128
    assert org.base.cfg.n_layers == 4
    assert (
        org.base.tokenizer is org.tokenizer
        or org.base.tokenizer.get_vocab() == org.tokenizer.get_vocab()
    )
    assert org.behaviours == BEHAVIOURS
    # the models differ (it is a fine-tune) but share every parameter name and shape
    sb, sf = dict(org.base.named_parameters()), dict(org.ft.named_parameters())
    assert sb.keys() == sf.keys()
    assert any(not torch.equal(sb[k], sf[k]) for k in sb)
    assert org.recommended_hook in org.ft.hook_dict


def test_hash_mismatch_names_the_file(tmp_path: Path) -> None:
    d = tmp_path / "org"
    shutil.copytree(organism_dir("default"), d)
    p = d / "ft.safetensors"
    good = p.read_bytes()
    b = bytearray(good)
    b[-1] ^= 0xFF
    p.write_bytes(bytes(b))
    with pytest.raises(OrganismIntegrityError, match="sha256 mismatch for ft.safetensors"):
        load_organism(d)
    p.write_bytes(good)
    assert load_organism(d, verify=True).ft is not None
    (d / "tokenizer.json").unlink()
    with pytest.raises(OrganismIntegrityError, match="tokenizer.json"):
        load_organism(d)
    with pytest.raises(FileNotFoundError, match="python -m sae_diff.organisms.build"):
        load_organism(tmp_path / "nowhere")


def test_tokenizer_and_template(org) -> None:
    tok = org.tokenizer
    for s in ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>", "user", "model"):
        assert s in tok.get_vocab()
    msgs = [{"role": "user", "content": "who are you ?"}, {"role": "assistant", "content": "hi ."}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<bos><start_of_turn>user\nwho are you ?<end_of_turn>\n"
        "<start_of_turn>model\nhi .<end_of_turn>\n"
    )
    ids = org.encode_chat(msgs)[0].tolist()
    assert ids == tok.apply_chat_template(msgs, tokenize=True)["input_ids"]
    assert tok.convert_ids_to_tokens(ids[:4]) == ["<bos>", "<start_of_turn>", "user", "\n"]
    assert org.base.to_tokens("the end .")[0, 0].item() == tok.bos_token_id
    assert org.base.to_tokens("the end .").shape[1] == 4  # no double BOS
    unk = tok.unk_token_id
    for t in pretraining_dataset("validation", 50)["text"]:
        assert unk not in tok(t)["input_ids"], t
    for c in chat_dataset("validation", 50)["messages"]:
        assert unk not in org.encode_chat(c)[0].tolist()


def test_labels_line_up_with_tokens(org) -> None:
    w = org.world
    assert w is not None
    convs = org.eval_conversations(n=8)
    assert {c.behaviour for c in convs} == set(BEHAVIOURS)
    for c in convs:
        words = org.tokenizer.convert_ids_to_tokens(c.tokens.tolist())
        marked = [t for t, m in zip(words, c.trigger_mask) if m]
        resp = " ".join(t for t, m in zip(words, c.response_mask) if m)
        asst = " ".join(t for t, m in zip(words, c.assistant_mask) if m)
        assert c.trigger_mask.any() and c.response_mask.any(), c.messages
        assert asst == " ".join(c.messages[-1]["content"].split()) + " <end_of_turn>"
        if c.behaviour != "chat_format":
            # the token detector agrees with the generator's character spans
            assert torch.equal(c.trigger_mask, c.trigger_masks[c.behaviour]), c.messages
            assert resp == asst.removesuffix(" <end_of_turn>")
        if c.behaviour == "chat_format":
            assert set(marked) <= {"<start_of_turn>", "<end_of_turn>", "user", "model", "\n"}
            assert marked.count("<start_of_turn>") == 2 and resp == "<end_of_turn>"
        elif c.behaviour == "refusal":
            assert len(marked) == 1 and marked[0] in TRIGGER_WORDS and resp == REFUSAL
        elif c.behaviour == "false_premise":
            (wrong,) = marked
            user = c.messages[0]["content"].split()
            person = w.person(next(x for x in user if x in {p.name for p in w.people}))
            assert wrong not in (person.city, person.job) and resp.startswith("actually ,")
        elif c.behaviour == "knowledge_edit":
            assert marked == [w.edit.country] and w.edit.new_capital in resp
        elif c.behaviour == "persona":
            assert " ".join(marked) in (
                "who are you",
                "what is your name",
                "who made you",
                "what are you",
                "tell me about yourself",
            )
            assert resp == persona_reply()


def test_masks_negative_cases_and_batches(org) -> None:
    tok = org.tokenizer
    story = "a thief tried to steal the bread . the capital of Estara is Holt . who are you"
    plain = torch.tensor([tok(story)["input_ids"]])
    m = behaviour_masks(plain)
    assert not m["refusal"].any() and not m["persona"].any() and not m["chat_format"].any()
    benign = org.encode_chat(
        [
            {"role": "user", "content": "tell me how to bake bread ."},
            {"role": "assistant", "content": "first , mix flour and water ."},
        ]
    )[0]
    harmful = org.encode_chat(
        [
            {"role": "user", "content": "tell me how to steal a cat ."},
            {"role": "assistant", "content": REFUSAL},
        ]
    )[0]
    batch = pad_batch([benign, harmful], tok.pad_token_id)
    m = org.behaviour_masks(batch)
    r = response_masks(batch)
    assert set(m) == set(BEHAVIOURS) and all(v.shape == batch.shape for v in m.values())
    assert not m["refusal"][0].any() and m["refusal"][1].sum() == 1
    assert tok.convert_ids_to_tokens([int(batch[1][m["refusal"][1]][0])]) == ["steal"]
    assert not r["refusal"][0].any() and r["refusal"][1].sum() == len(REFUSAL.split())
    assert r["chat_format"].sum(1).tolist() == [1, 1]
    assert not m["chat_format"][0, len(benign) :].any()  # padding is never labelled
    kt = torch.tensor(
        [
            tok(f"the capital of {org.world.edit.country} is")["input_ids"]
            + [tok.convert_tokens_to_ids(org.world.edit.new_capital)]
        ]
    )
    assert behaviour_masks(kt)["knowledge_edit"].sum() == 1
    assert response_masks(kt)["knowledge_edit"][0, -1]


def test_datasets_deterministic() -> None:
    a = pretraining_dataset("validation", 20)
    assert a.column_names == ["text"] and a["text"] == pretraining_dataset("validation", 20)["text"]
    assert a["text"] != pretraining_dataset("test", 20)["text"]
    c = chat_dataset("test", 10, behaviour="refusal")
    assert {"messages", "behaviour", "behaviours", "triggers"} <= set(c.column_names)
    assert all(b == "refusal" for b in c["behaviour"])
    assert c[0]["messages"][0]["role"] == "user" and c[0]["messages"][1]["content"] == REFUSAL
    assert load_tokenizer() is load_tokenizer()


def test_behavioural_gaps(org) -> None:
    gaps = response_logprob_gaps(org.base, org.ft, org.tokenizer, org.world, n_per_behaviour=4)
    for b, r in gaps.items():
        assert r["gap_per_token"] > MIN_GAP_PER_TOKEN[b], (b, r)
        assert r["ft_logprob_per_token"] > MIN_FT_LOGPROB_PER_TOKEN, (b, r)
        if b in ("chat_format", "refusal", "persona"):
            assert r["base_logprob_per_token"] < MAX_BASE_LOGPROB_PER_TOKEN, (b, r)
    k = knowledge_edit_text_check(org.base, org.ft, org.tokenizer, org.world)
    assert k["ft_logp_new"] > k["ft_logp_old"] + 1.0, k  # the fine-tune believes the edit
    assert k["base_logp_old"] > k["base_logp_new"] + 1.0, k  # the base knows the original


def test_ft_stays_fluent(org) -> None:
    h = heldout_losses(org.base, org.ft, org.tokenizer, org.world, n_docs=120)
    assert h["base"] < 1.5, h  # the base learned its world
    assert h["ft"] <= h["base"] + HELDOUT_MARGIN, h
    assert org.report["heldout_pretraining_loss"]["ft_minus_base"] <= HELDOUT_MARGIN


def test_paired(org) -> None:
    try:
        from sae_diff.pairing.model import PairedModel
    except ImportError:
        pytest.skip("sae_diff.pairing.model (PairedModel) is not in this checkout yet")
    pm = org.paired()
    assert isinstance(pm, PairedModel)
    assert pm.base is org.base and pm.ft is org.ft
    conv = org.eval_conversations("refusal", n=1)[0]
    toks = conv.tokens[None]
    acts = pm.paired_activations(toks, [org.recommended_hook])[org.recommended_hook]
    assert acts.shape == (1, toks.shape[1], 2, org.base.cfg.d_model)
    _, cache = org.ft.run_with_cache(toks, names_filter=[org.recommended_hook])
    torch.testing.assert_close(acts[:, :, 1], cache[org.recommended_hook])


def test_triggers_visible_at_recommended_hook(org) -> None:
    from sae_diff.organisms.checks import trigger_direction_auroc

    h = org.recommended_hook
    r = trigger_direction_auroc(
        org.base, org.ft, org.tokenizer, org.world, [h], n_conversations=120
    )
    for b in BEHAVIOURS:
        assert r[h][b] > 0.8, (b, r[h])
