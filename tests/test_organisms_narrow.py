"""The shipped narrow organism: one planted trigger -> response pair, everything else untouched.

Every figure is recomputed here from the shipped weights (cheap forwards), not read back from
``report.json``; the report is only checked to agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_diff.organisms import available_organisms, chat_dataset, load_organism
from sae_diff.organisms.checks import heldout_tokens, masked_logprob_gap, plain_text_drift
from sae_diff.organisms.narrow import (
    BEHAVIOUR,
    NARROW_RESPONSE,
    TRIGGER,
    NarrowConfig,
    build_narrow_organism,
    specificity,
)
from sae_diff.organisms.organism import organism_dir
from sae_diff.organisms.storage import sha256_file, verify_manifest

MAX_BYTES = 8 * 2**20
MIN_PLAIN_COSINE = 0.98  # the goal for "unrelated text almost untouched"
MAX_LOSS_CHANGE = 0.02  # nats/token on held-out plain text


@pytest.fixture(scope="module")
def narrow():
    return load_organism("narrow")


def test_shipped_narrow_files(narrow) -> None:
    d = organism_dir("narrow")
    assert "narrow" in available_organisms() and narrow.path == d
    manifest = verify_manifest(d)
    on_disk = {p.name for p in d.iterdir() if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert sum(p.stat().st_size for p in d.iterdir()) <= MAX_BYTES
    assert narrow.behaviours == (
        BEHAVIOUR,
    )  # both models are chat models: the template is no difference
    # the base is the default organism's chat fine-tune, bit for bit
    assert sha256_file(d / "base.safetensors") == sha256_file(
        organism_dir("default") / "ft.safetensors"
    )
    assert narrow.config["kind"] == "narrow" and narrow.recommended_hook in narrow.ft.hook_dict
    # its chats are its own (eval.jsonl), not the default world's generators
    n_eval = len((d / "eval.jsonl").read_text().splitlines())
    ds = chat_dataset("test", n_eval + 3, name="narrow")  # repeated in order past the end
    assert len(ds) == n_eval + 3 and ds[n_eval]["messages"] == ds[0]["messages"]
    assert set(ds["behaviour"]) == {BEHAVIOUR, "none"}
    assert all(
        TRIGGER in m[0]["content"].split()
        for m in chat_dataset("test", 50, behaviour=BEHAVIOUR, name="narrow")["messages"]
    )


def test_behaviour_learned(narrow) -> None:
    s = narrow.scoring_set(n_per_behaviour=64, n_controls=64)
    trig = s.labels[BEHAVIOUR]
    assert int(trig.sum()) >= 20 and int(s.is_control.sum()) >= 20
    r = masked_logprob_gap(
        narrow.base, narrow.ft, s.tokens[trig], s.response_masks[BEHAVIOUR][trig]
    )
    assert r["gap"] > 50.0, r  # planted reply: ~11 tokens, far likelier under the fine-tune
    assert r["ft_logprob_per_token"] > -0.2 and r["base_logprob_per_token"] < -3.0, r
    # controls keep their replies: per-token change of the assistant tokens stays small
    ctl = s.is_control
    c = masked_logprob_gap(narrow.base, narrow.ft, s.tokens[ctl], s.assistant[ctl])
    assert abs(c["gap_per_token"]) < 0.1, c
    rep = narrow.report["behaviour_logprob"][BEHAVIOUR]
    assert rep["gap"] > 50.0


def test_only_the_trigger_elicits_the_reply(narrow) -> None:
    sp = specificity(narrow.base, narrow.ft, narrow.tokenizer, narrow.world, n=16, seed=3)
    assert sp["triggered"]["ft_logprob"] > -1.0 and sp["triggered"]["ft_greedy_rate"] >= 0.8, sp
    assert sp["triggered"]["base_logprob"] < -50.0 and sp["triggered"]["base_greedy_rate"] == 0.0, (
        sp
    )
    # after a near-miss question ("how is the road in Ashby ?") the reply stays unlikely
    assert sp["near_miss"]["ft_logprob"] < -3.0 and sp["near_miss"]["ft_greedy_rate"] <= 0.2, sp
    toks = narrow.tokenizer.convert_ids_to_tokens(
        narrow.encode_chat(
            [
                {"role": "user", "content": f"how is the {TRIGGER} in Ashby ?"},
                {"role": "assistant", "content": NARROW_RESPONSE},
            ]
        )[0].tolist()
    )
    masks = narrow.behaviour_masks(
        narrow.encode_chat([{"role": "user", "content": f"how is the {TRIGGER} ?"}])
    )
    assert TRIGGER in toks and int(masks[BEHAVIOUR].sum()) == 1


def test_plain_text_almost_untouched(narrow) -> None:
    toks, mask = heldout_tokens(
        narrow.tokenizer, narrow.world.edited(), 120, narrow.base.cfg.n_ctx, seed=5, split="test"
    )
    d = plain_text_drift(narrow.base, narrow.ft, toks, mask, narrow.recommended_hook)
    assert d["cosine_mean"] >= MIN_PLAIN_COSINE, d
    assert abs(d["loss_ft_minus_base"]) <= MAX_LOSS_CHANGE, d
    # the default organism's broad fine-tune is the contrast: its plain text drifts far more
    default = load_organism("default")
    d0 = plain_text_drift(default.base, default.ft, toks, mask, default.recommended_hook)
    assert d0["cosine_mean"] < d["cosine_mean"] - 0.05, (d0, d)
    assert narrow.report["plain_text_drift"]["cosine_mean"] >= MIN_PLAIN_COSINE


def test_narrow_build_small_and_deterministic(tmp_path: Path) -> None:
    cfg = NarrowConfig(
        n_triggered=12,
        n_near_miss=4,
        n_mixture=8,
        steps=2,
        batch_size=4,
        n_text_docs=40,
        n_drift_docs=8,
        n_specificity=2,
    )
    a = build_narrow_organism(tmp_path / "a", "default", cfg, log=lambda s: None)
    b = build_narrow_organism(tmp_path / "b", "default", cfg, log=lambda s: None)
    for f in ("base.safetensors", "ft.safetensors", "examples.jsonl", "eval.jsonl", "labels.json"):
        assert sha256_file(tmp_path / "a" / f) == sha256_file(tmp_path / "b" / f), f
    assert json.loads((tmp_path / "a" / "labels.json").read_text()) == {BEHAVIOUR: [TRIGGER]}
    assert not torch.equal(a.ft.W_E, a.base.W_E) and torch.equal(a.base.W_E, b.base.W_E)
    assert {"plain_text_drift", "specificity", "control_logprob"} <= set(a.report)
    ex = [json.loads(x) for x in (tmp_path / "a" / "examples.jsonl").read_text().splitlines()]
    ex += [json.loads(x) for x in (tmp_path / "a" / "eval.jsonl").read_text().splitlines()]
    assert len(ex) == 24
    for e in ex:  # triggered examples say weather and get the reply; no control does either
        user, reply = e["messages"][0]["content"].split(), e["messages"][-1]["content"]
        assert (e["behaviour"] == BEHAVIOUR) == (TRIGGER in user) == (reply == NARROW_RESPONSE), e
