"""Load an organism pair (offline, seconds) and its ground truth.

Length (~650 lines): the organism object and its data views (pretraining text, chat splits,
ground truth, scoring set) share one loaded state; split, each view would re-load it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

from sae_diff.organisms import behaviours as B
from sae_diff.organisms.chat import encode_conversation, finalize_tokenizer, id_to_token
from sae_diff.organisms.datasets import (
    chat_conversations,
    pretraining_texts,
    to_chat_dataset,
    to_text_dataset,
)
from sae_diff.organisms.storage import OrganismIntegrityError, load_weights, verify_manifest
from sae_diff.organisms.world import World

if TYPE_CHECKING:  # pragma: no cover
    from sae_diff.pairing.model import PairedModel

DATA_DIR = Path(__file__).parent / "data"


def available_organisms() -> list[str]:
    """Names of the organisms shipped with the package."""
    return (
        sorted(p.name for p in DATA_DIR.iterdir() if (p / "manifest.json").is_file())
        if DATA_DIR.is_dir()
        else []
    )


def organism_dir(name_or_path: str | Path = "default") -> Path:
    """Resolve a shipped organism name or a directory path."""
    p = Path(name_or_path)
    if (p / "manifest.json").is_file():
        return p
    q = DATA_DIR / str(name_or_path)
    if (q / "manifest.json").is_file():
        return q
    raise FileNotFoundError(
        f"No organism {str(name_or_path)!r}: not a shipped name ({available_organisms()}) and "
        f"not a directory with a manifest.json. Build one with `python -m sae_diff.organisms.build "
        f"--out DIR` (or `--custom ...`)."
    )


@dataclass
class EvalConversation:
    """A held-out conversation with its token-level ground truth (all tensors are 1-D)."""

    messages: list[dict[str, str]]
    behaviour: str
    tokens: torch.Tensor
    assistant_mask: torch.Tensor
    trigger_mask: torch.Tensor
    response_mask: torch.Tensor
    trigger_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Where the row comes from: ``"held_out"`` (a held-out conversation of ``behaviour``),
    #: ``"control"`` (a held-out conversation with no planted behaviour), ``"derived_control"``
    #: (a held-out triggered prompt with its trigger phrases removed, answered by the base; see
    #: :meth:`Organism.scoring_set`) or ``"text"`` (a held-out plain pretraining document).
    origin: str = "held_out"


CONTROL = "none"  # the ``behaviour`` of control rows (the name plain exchanges carry everywhere)


@dataclass
class ScoringSet:
    """Held-out rows for scoring a diffing method against ground truth, controls included.

    Every tensor has one row per entry of ``conversations`` (right-padded, see
    :func:`pad_conversations`). ``labels[b][i]`` says whether behaviour ``b`` is triggered in
    row ``i``; it is computed from the token-level trigger masks (``trigger_masks[b][i].any()``),
    the same detector that labels any harvested batch, so labels and masks never disagree.

    Attributes:
        conversations: the rows, with their per-row masks and ``origin``.
        tokens: ``(n, seq)`` ids, padded with the tokenizer's pad id.
        valid: ``(n, seq)`` real (non-pad) tokens.
        assistant: ``(n, seq)`` assistant-turn tokens (content + closing ``<end_of_turn>``).
        behaviours: the behaviours that have controls here, i.e. the organism's behaviours
            except ``chat_format`` (every chat contains the template; it has negatives only in
            plain-text rows, ``n_text > 0``).
        labels: ``{behaviour: (n,) bool}`` for every organism behaviour (``chat_format`` too).
        trigger_masks: ``{behaviour: (n, seq) bool}`` trigger tokens (False on padding).
        response_masks: ``{behaviour: (n, seq) bool}`` planted-response tokens.
        is_control: ``(n,) bool``: no behaviour of ``behaviours`` is triggered in the row.
    """

    conversations: list[EvalConversation]
    tokens: torch.Tensor
    valid: torch.Tensor
    assistant: torch.Tensor
    behaviours: tuple[str, ...]
    labels: dict[str, torch.Tensor]
    trigger_masks: dict[str, torch.Tensor]
    response_masks: dict[str, torch.Tensor]
    is_control: torch.Tensor

    def __len__(self) -> int:
        return len(self.conversations)

    @property
    def origins(self) -> list[str]:
        """``conversations[i].origin`` for every row."""
        return [c.origin for c in self.conversations]


def pad_conversations(
    convs: Sequence[EvalConversation], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad conversations into one batch: ``(tokens, valid, assistant)``, each ``(n, seq)``
    (``valid`` marks real tokens, ``assistant`` the assistant-turn tokens)."""
    if not convs:
        raise ValueError("No conversations to pad.")
    length = max(len(c.tokens) for c in convs)
    tokens = torch.full((len(convs), length), pad_id, dtype=torch.long)
    valid = torch.zeros(len(convs), length, dtype=torch.bool)
    assistant = torch.zeros_like(valid)
    for i, c in enumerate(convs):
        n = len(c.tokens)
        tokens[i, :n] = c.tokens
        valid[i, :n] = True
        assistant[i, :n] = c.assistant_mask.bool()
    return tokens, valid, assistant


@dataclass
class _Light:
    """What ground-truth code needs without the models: tokenizer, world, labels."""

    path: Path
    config: dict[str, Any]
    tokenizer: PreTrainedTokenizerFast
    world: World | None
    trigger_phrases: dict[str, list[str]] | None
    vocab: list[str]

    @property
    def behaviours(self) -> tuple[str, ...]:
        return tuple(self.config["behaviours"])

    def trigger_masks(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.trigger_phrases is not None:
            return B.phrase_masks(tokens, self.vocab, self.trigger_phrases)[0]
        assert self.world is not None
        return B.trigger_masks(tokens, self.vocab, self.world)

    def response_masks(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.trigger_phrases is not None:
            return B.phrase_masks(tokens, self.vocab, self.trigger_phrases)[1]
        assert self.world is not None
        return B.response_masks(tokens, self.vocab, self.world)


def _load_light(directory: Path, verify: bool = True) -> _Light:
    if verify:
        verify_manifest(directory)
    config = json.loads((directory / "config.json").read_text())
    tok = PreTrainedTokenizerFast.from_pretrained(str(directory))
    tok = finalize_tokenizer(tok)
    world = None
    if (directory / "world.json").is_file():
        world = World.from_dict(json.loads((directory / "world.json").read_text()))
    phrases = None
    if (directory / "labels.json").is_file():
        phrases = json.loads((directory / "labels.json").read_text())
    if world is None and phrases is None:
        raise OrganismIntegrityError(f"{directory} has neither world.json nor labels.json.")
    return _Light(directory, config, tok, world, phrases, id_to_token(tok))


@functools.lru_cache(maxsize=8)
def _light_cached(directory: str) -> _Light:
    return _load_light(Path(directory))


@dataclass
class Organism:
    """A base model, its fine-tune, their shared tokenizer, and the planted ground truth.

    ``base`` and ``ft`` are TransformerLens ``HookedTransformer`` s in eval mode;
    ``tokenizer`` is the shared HF fast tokenizer (with the chat template);
    ``behaviours`` names the planted behaviours (keys of :meth:`behaviour_masks`).
    """

    base: HookedTransformer
    ft: HookedTransformer
    tokenizer: PreTrainedTokenizerFast
    behaviours: tuple[str, ...]
    path: Path
    config: dict[str, Any]
    report: dict[str, Any]
    world: World | None
    _light: _Light = field(repr=False)

    # ---- models --------------------------------------------------------------------------
    @property
    def base_name(self) -> str:
        """Name used for the base model in saved configs."""
        return str(self.config.get("base_name", "organism-base"))

    @property
    def ft_name(self) -> str:
        """Name used for the fine-tuned model in saved configs."""
        return str(self.config.get("ft_name", "organism-ft"))

    @property
    def recommended_hook(self) -> str:
        """Hook point where the planted differences are clearest (see docs/organisms.md)."""
        return str(self.config.get("recommended_hook", "blocks.2.hook_resid_pre"))

    def paired(self, **kwargs: Any) -> PairedModel:
        """Wrap the pair in :class:`sae_diff.pairing.model.PairedModel` (keyword args pass through)."""
        try:
            from sae_diff.pairing.model import PairedModel
        except ImportError as e:  # pragma: no cover - depends on the merge order
            raise ImportError(
                "sae_diff.pairing.model.PairedModel is not available; update sae_diff "
                "(or use organism.base / organism.ft directly)."
            ) from e
        kwargs.setdefault("tokenizer", self.tokenizer)
        kwargs.setdefault("base_name", self.base_name)
        kwargs.setdefault("ft_name", self.ft_name)
        return PairedModel(self.base, self.ft, **kwargs)

    # ---- tokenization --------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[dict[str, str]]) -> torch.Tensor:
        """Template and tokenize ``messages``: ``(1, seq)`` ids starting with ``<bos>``."""
        return encode_conversation(self.tokenizer, messages)["input_ids"][None]

    # ---- ground truth --------------------------------------------------------------------
    def behaviour_masks(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-behaviour ``(batch, seq)`` bool masks of where each behaviour's trigger is."""
        return self._light.trigger_masks(tokens)

    def response_masks(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-behaviour ``(batch, seq)`` bool masks of the planted responses."""
        return self._light.response_masks(tokens)

    def assistant_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(batch, seq)`` mask of assistant tokens (content + closing ``<end_of_turn>``)."""
        return B.assistant_mask(tokens, self._light.vocab)

    # ---- data ----------------------------------------------------------------------------
    def pretraining_texts(
        self, split: str = "validation", n: int = 256, seed: int | None = None
    ) -> list[str]:
        """Pretraining documents of the (base) world; see :func:`pretraining_dataset`."""
        if self.world is None:
            raise ValueError(f"Organism {self.path} has no world.json, so no pretraining corpus.")
        return pretraining_texts(self.world, split, n, self._seed(seed))

    def pretraining_dataset(
        self, split: str = "validation", n: int = 256, seed: int | None = None
    ) -> Dataset:
        """HF dataset (column ``text``) of ``n`` pretraining documents of ``split``."""
        return to_text_dataset(self.pretraining_texts(split, n, seed))

    def chat_conversations(
        self,
        split: str = "test",
        n: int = 256,
        behaviour: str | None = None,
        seed: int | None = None,
    ) -> list[dict[str, Any]]:
        """Chat conversations as dicts (format: :mod:`sae_diff.organisms.behaviours`)."""
        if self._light.trigger_phrases is not None:
            convs = _read_jsonl(
                self.path / ("examples.jsonl" if split == "train" else "eval.jsonl")
            )
            if behaviour is not None:
                convs = [c for c in convs if c["behaviour"] == behaviour]
            return convs[:n]
        assert self.world is not None
        return chat_conversations(self.world.edited(), split, n, self._seed(seed), behaviour)

    def chat_dataset(
        self,
        split: str = "test",
        n: int = 256,
        behaviour: str | None = None,
        seed: int | None = None,
    ) -> Dataset:
        """HF dataset with ``messages`` (list of {role, content}), ``behaviour``,
        ``behaviours`` and ``triggers`` (character spans) columns."""
        return to_chat_dataset(self.chat_conversations(split, n, behaviour, seed))

    def eval_conversations(
        self, behaviour: str | None = None, n: int = 8, split: str = "test", n_controls: int = 0
    ) -> list[EvalConversation]:
        """Held-out conversations with tokens, assistant mask and trigger/response masks.

        ``behaviour=None`` gives ``n`` per behaviour, all behaviours. ``n_controls`` appends
        that many control conversations (no planted behaviour; see :meth:`scoring_set`).
        For a custom organism ``chat_format`` has no conversations of its own (its examples
        name their planted behaviour or ``"none"``), and fewer than ``n`` are returned when
        its ``eval.jsonl`` holds fewer.
        """
        if behaviour is not None and behaviour not in self.behaviours:
            raise ValueError(
                f"Unknown behaviour {behaviour!r}; this organism's behaviours are {self.behaviours} "
                "(pass one of them, or None for all)."
            )
        names = self.behaviours if behaviour is None else (behaviour,)
        out = [
            self._eval_row(c, b)
            for b in names
            for c in self.chat_conversations(split, n, behaviour=b)
        ]
        if n_controls:
            out += self.control_conversations(n_controls, split)
        return out

    def control_conversations(self, n: int = 16, split: str = "test") -> list[EvalConversation]:
        """``n`` held-out conversations in which no planted behaviour is triggered.

        Shipped organisms: plain exchanges of the fine-tuning mixture, including the benign
        look-alikes (benign how-to requests, true premises, other countries' capitals, "who is
        Hugo ?"). Custom organisms: the held-out examples labelled ``"none"`` (at most ``n``;
        fewer if ``eval.jsonl`` holds fewer). Only if it holds none at all are controls
        *derived* from the held-out triggered examples (origin ``"derived_control"``): the
        first user turn with every trigger phrase removed, answered by the base model's greedy
        reply (the base has no planted behaviour, so the reply is not the planted response).
        Rows whose tokens still contain a trigger are dropped, so every returned row is a true
        control (``trigger_masks`` all False for every behaviour but ``chat_format``).
        """
        if n <= 0:
            return []
        content = [b for b in self.behaviours if b != "chat_format"]
        if self._light.trigger_phrases is None:
            convs = self.chat_conversations(split, n, behaviour="chat_format")
            rows = [self._eval_row(c, CONTROL, "control") for c in convs]
        else:
            pool = _read_jsonl(self.path / ("examples.jsonl" if split == "train" else "eval.jsonl"))
            rows = [
                self._eval_row(c, CONTROL, "control") for c in pool if c.get("behaviour") == CONTROL
            ]
            rows = [r for r in rows if not any(r.trigger_masks[b].any() for b in content)][:n]
            if not rows:
                for c in pool:
                    if len(rows) >= n:
                        break
                    if c.get("behaviour") == CONTROL:
                        continue
                    derived = self._derive_control(c)
                    if derived is not None:
                        r = self._eval_row(derived, CONTROL, "derived_control")
                        if not any(r.trigger_masks[b].any() for b in content):
                            rows.append(r)
        return rows

    def scoring_set(
        self,
        n_per_behaviour: int = 16,
        n_controls: int | None = None,
        split: str = "test",
        n_text: int = 0,
    ) -> ScoringSet:
        """Held-out triggered conversations, control conversations and labels, in one batch.

        Rows: ``n_per_behaviour`` held-out conversations of each behaviour except
        ``chat_format`` (origin ``"held_out"``), then ``n_controls`` controls (default: as many
        as the triggered rows; see :meth:`control_conversations`), then ``n_text`` held-out plain
        pretraining documents (origin ``"text"``; needs a ``world.json``; the only negatives
        for ``chat_format``). Works the same for shipped and custom organisms; a custom
        organism's rows come from its ``eval.jsonl`` (``split="train"``: ``examples.jsonl``).
        """
        content = tuple(b for b in self.behaviours if b != "chat_format")
        convs = [r for b in content for r in self.eval_conversations(b, n_per_behaviour, split)]
        if n_controls is None:
            n_controls = max(len(convs), 1)
        convs += self.control_conversations(n_controls, split)
        if n_text:
            convs += self._text_rows(n_text, split)
        if not convs:
            raise ValueError(
                f"Organism {self.path} has no held-out conversations in split {split!r}; "
                "rebuild it with more examples (custom: eval_fraction) or ask for another split."
            )
        pad_id = self.tokenizer.pad_token_id
        tokens, valid, assistant = pad_conversations(convs, 0 if pad_id is None else int(pad_id))
        trig = {b: m & valid for b, m in self.behaviour_masks(tokens).items()}
        resp = {b: m & valid for b, m in self.response_masks(tokens).items()}
        labels = {b: m.any(1) for b, m in trig.items()}
        if content:
            is_control = ~torch.stack([labels[b] for b in content]).any(0)
        else:
            is_control = torch.ones(len(convs), dtype=torch.bool)
        return ScoringSet(convs, tokens, valid, assistant, content, labels, trig, resp, is_control)

    def eval_batch(
        self, behaviour: str | None = None, n: int = 8, split: str = "test", n_controls: int = 0
    ) -> tuple[list[EvalConversation], torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`eval_conversations` padded into one batch:
        ``(conversations, tokens, valid, assistant)`` (see :func:`pad_conversations`).
        ``n_controls`` appends control conversations (see :meth:`scoring_set` for labels)."""
        convs = self.eval_conversations(behaviour, n, split, n_controls)
        pad_id = self.tokenizer.pad_token_id
        return (convs, *pad_conversations(convs, 0 if pad_id is None else int(pad_id)))

    # ---- helpers of the scoring set ----------------------------------------------------------
    def _eval_row(
        self, conv: dict[str, Any], behaviour: str, origin: str = "held_out"
    ) -> EvalConversation:
        enc = encode_conversation(self.tokenizer, conv)
        toks = enc["input_ids"][None]
        trig = self.behaviour_masks(toks)
        resp = self.response_masks(toks)
        zeros = torch.zeros_like(enc["assistant_mask"])
        return EvalConversation(
            messages=conv["messages"],
            behaviour=behaviour,
            tokens=enc["input_ids"],
            assistant_mask=enc["assistant_mask"],
            trigger_mask=trig[behaviour][0] if behaviour in trig else zeros,
            response_mask=resp[behaviour][0] if behaviour in resp else zeros,
            trigger_masks={b: m[0] for b, m in trig.items()},
            origin=origin,
        )

    def _text_rows(self, n: int, split: str) -> list[EvalConversation]:
        if self.world is None:
            raise ValueError(
                f"n_text={n}: organism {self.path} has no world.json, so no plain text; pass n_text=0."
            )
        rows = []
        n_ctx = int(self.base.cfg.n_ctx)
        for text in self.pretraining_texts(split, n):
            ids = torch.tensor(self.tokenizer(text)["input_ids"][:n_ctx], dtype=torch.long)
            toks = ids[None]
            trig = self.behaviour_masks(toks)
            zeros = torch.zeros(len(ids), dtype=torch.bool)
            rows.append(
                EvalConversation(
                    messages=[],
                    behaviour=CONTROL,
                    tokens=ids,
                    assistant_mask=zeros,
                    trigger_mask=zeros,
                    response_mask=zeros,
                    trigger_masks={b: m[0] for b, m in trig.items()},
                    origin="text",
                )
            )
        return rows

    @torch.no_grad()
    def _derive_control(
        self, conv: dict[str, Any], max_new_tokens: int = 32
    ) -> dict[str, Any] | None:
        """The first user turn of ``conv`` without its trigger phrases, answered greedily by
        the base. None if nothing of the prompt is left."""
        from sae_diff.organisms.chat import split_words
        from sae_diff.organisms.checks import greedy_reply

        assert self._light.trigger_phrases is not None
        phrases = [
            split_words(p)
            for b, ps in self._light.trigger_phrases.items()
            if b != "chat_format"
            for p in ps
        ]
        words = split_words(conv["messages"][0]["content"])
        keep = [True] * len(words)
        for ph in (p for p in phrases if p):
            for i in range(len(words) - len(ph) + 1):
                if words[i : i + len(ph)] == ph:
                    keep[i : i + len(ph)] = [False] * len(ph)
        prompt = " ".join(w for w, k in zip(words, keep) if k)
        if not prompt or all(keep):
            return None
        user = [{"role": "user", "content": prompt}]
        content = greedy_reply(self.base, self.tokenizer, prompt, max_new_tokens)
        return {
            "messages": [*user, {"role": "assistant", "content": content}],
            "behaviour": CONTROL,
            "behaviours": ["chat_format"],
            "triggers": [],
        }

    def _seed(self, seed: int | None) -> int:
        return int(self.config.get("build_config", {}).get("seed", 0)) if seed is None else seed


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _model_from(
    directory: Path,
    cfg_d: dict[str, Any],
    weights: str,
    name: str,
    tokenizer: PreTrainedTokenizerFast,
    device: str | torch.device,
) -> HookedTransformer:
    m = cfg_d["model"]
    cfg = HookedTransformerConfig(
        n_layers=m["n_layers"],
        d_model=m["d_model"],
        n_heads=m["n_heads"],
        d_head=m["d_model"] // m["n_heads"],
        d_mlp=m["d_mlp"],
        n_ctx=m["n_ctx"],
        d_vocab=m["d_vocab"],
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="standard",
        default_prepend_bos=True,
        tokenizer_prepends_bos=True,
        model_name=name,
        device=str(device),
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    load_weights(model, directory / weights)
    if str(device) != "cpu":
        model = model.to(device, print_details=False)
    return model.eval()


def load_organism(
    name: str | Path = "default", *, device: str | torch.device = "cpu", verify: bool = True
) -> Organism:
    """Load an organism: a shipped name (``"default"``) or a directory made by the build.

    Verifies every file's sha256 against ``manifest.json`` first (``verify=False`` skips it);
    raises :class:`OrganismIntegrityError` naming the file on a mismatch. No network access.
    """
    directory = organism_dir(name)
    light = _load_light(directory, verify=verify)
    cfg_d = light.config
    base = _model_from(
        directory,
        cfg_d,
        "base.safetensors",
        cfg_d.get("base_name", "organism-base"),
        light.tokenizer,
        device,
    )
    ft = _model_from(
        directory,
        cfg_d,
        "ft.safetensors",
        cfg_d.get("ft_name", "organism-ft"),
        light.tokenizer,
        device,
    )
    report = (
        json.loads((directory / "report.json").read_text())
        if (directory / "report.json").is_file()
        else {}
    )
    return Organism(
        base=base,
        ft=ft,
        tokenizer=light.tokenizer,
        behaviours=light.behaviours,
        path=directory,
        config=cfg_d,
        report=report,
        world=light.world,
        _light=light,
    )


def load_tokenizer(name: str | Path = "default") -> PreTrainedTokenizerFast:
    """Just the organism's tokenizer (cached; verified)."""
    return _light_cached(str(organism_dir(name).resolve())).tokenizer


def behaviour_masks(tokens: torch.Tensor, name: str | Path = "default") -> dict[str, torch.Tensor]:
    """Per-behaviour trigger masks ``(batch, seq)`` for the organism ``name`` (no models loaded)."""
    return _light_cached(str(organism_dir(name).resolve())).trigger_masks(tokens)


def response_masks(tokens: torch.Tensor, name: str | Path = "default") -> dict[str, torch.Tensor]:
    """Per-behaviour planted-response masks ``(batch, seq)`` (no models loaded)."""
    return _light_cached(str(organism_dir(name).resolve())).response_masks(tokens)


def assistant_mask(tokens: torch.Tensor, name: str | Path = "default") -> torch.Tensor:
    """Assistant-turn mask ``(batch, seq)`` (content + closing ``<end_of_turn>``)."""
    return B.assistant_mask(tokens, _light_cached(str(organism_dir(name).resolve())).vocab)


def _light_world(name: str | Path) -> tuple[World, int]:
    light = _light_cached(str(organism_dir(name).resolve()))
    if light.world is None:
        raise ValueError(f"Organism {name} has no world.json (custom organism without a world).")
    return light.world, int(light.config.get("build_config", {}).get("seed", 0))


def pretraining_dataset(
    split: str = "train", n: int = 1000, *, name: str | Path = "default", seed: int | None = None
) -> Dataset:
    """HF dataset (``text`` column) of ``n`` pretraining documents of the organism's world."""
    world, s = _light_world(name)
    return to_text_dataset(pretraining_texts(world, split, n, s if seed is None else seed))


def chat_dataset(
    split: str = "train",
    n: int = 1000,
    *,
    behaviour: str | None = None,
    name: str | Path = "default",
    seed: int | None = None,
) -> Dataset:
    """HF dataset of fine-tuning-style conversations (``messages`` + behaviour labels).

    For an organism built from examples (custom, ``narrow``): its own ``examples.jsonl``
    (``split="train"``) or held-out ``eval.jsonl`` (other splits), not the world's generators
    (whose behaviours it was not trained on); when ``n`` exceeds them they are repeated in
    order, so a training corpus of ``n`` conversations is the fine-tuning distribution.
    """
    light = _light_cached(str(organism_dir(name).resolve()))
    if light.trigger_phrases is not None:
        convs = _read_jsonl(light.path / ("examples.jsonl" if split == "train" else "eval.jsonl"))
        if behaviour is not None:
            convs = [c for c in convs if c["behaviour"] == behaviour]
        if not convs:
            raise ValueError(
                f"Organism {light.path} has no {split!r} conversations"
                + (f" of behaviour {behaviour!r}" if behaviour else "")
                + "."
            )
        return to_chat_dataset([convs[i % len(convs)] for i in range(n)])
    world, s = _light_world(name)
    return to_chat_dataset(
        chat_conversations(world.edited(), split, n, s if seed is None else seed, behaviour)
    )
