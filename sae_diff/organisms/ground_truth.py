"""An organism's files without its models: where it lives, its tokenizer, world and labels.

Everything here reads only the organism's directory (tokenizer, ``config.json``, ``world.json``
or ``labels.json``, the example files), never its weights, so ground-truth masks and datasets
cost milliseconds; :mod:`sae_diff.organisms.organism` adds the two models on top.
:class:`GroundTruth` is that view; the module-level functions serve it by organism name,
cached.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerFast

from sae_diff.organisms import detectors
from sae_diff.organisms.chat import finalize_tokenizer, id_to_token
from sae_diff.organisms.datasets import (
    chat_conversations,
    pretraining_texts,
    to_chat_dataset,
    to_text_dataset,
)
from sae_diff.organisms.storage import OrganismIntegrityError, verify_manifest
from sae_diff.organisms.world import World

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


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class GroundTruth:
    """What ground-truth code needs without the models: tokenizer, world, labels.

    A shipped organism has a ``world`` (its behaviours are detected from the world's facts); an
    organism built from examples (custom, ``narrow``) has ``trigger_phrases`` instead.
    """

    path: Path
    config: dict[str, Any]
    tokenizer: PreTrainedTokenizerFast
    world: World | None
    trigger_phrases: dict[str, list[str]] | None
    vocab: list[str]

    @property
    def behaviours(self) -> tuple[str, ...]:
        """The planted behaviours (``config.json``'s order)."""
        return tuple(self.config["behaviours"])

    @property
    def seed(self) -> int:
        """The build's seed (the default seed of the world's generated data)."""
        return int(self.config.get("build_config", {}).get("seed", 0))

    def trigger_masks(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-behaviour ``(batch, seq)`` trigger masks of ``tokens``."""
        if self.trigger_phrases is not None:
            return detectors.phrase_masks(tokens, self.vocab, self.trigger_phrases)[0]
        assert self.world is not None
        return detectors.trigger_masks(tokens, self.vocab, self.world)

    def response_masks(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-behaviour ``(batch, seq)`` planted-response masks of ``tokens``."""
        if self.trigger_phrases is not None:
            return detectors.phrase_masks(tokens, self.vocab, self.trigger_phrases)[1]
        assert self.world is not None
        return detectors.response_masks(tokens, self.vocab, self.world)

    def assistant_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(batch, seq)`` assistant tokens (content + closing ``<end_of_turn>``)."""
        return detectors.assistant_mask(tokens, self.vocab)

    def examples(self, split: str, behaviour: str | None = None) -> list[dict[str, Any]]:
        """An example-built organism's conversations: ``examples.jsonl`` for ``split="train"``,
        the held-out ``eval.jsonl`` otherwise (only those of ``behaviour`` when given)."""
        convs = read_jsonl(self.path / ("examples.jsonl" if split == "train" else "eval.jsonl"))
        if behaviour is not None:
            convs = [c for c in convs if c["behaviour"] == behaviour]
        return convs


def load_ground_truth(directory: Path, verify: bool = True) -> GroundTruth:
    """Read an organism directory's tokenizer and labels (sha256-verified unless ``verify=False``).

    Raises:
        OrganismIntegrityError: a file does not match the manifest, or there are no labels.
    """
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
    return GroundTruth(directory, config, tok, world, phrases, id_to_token(tok))


@functools.lru_cache(maxsize=8)
def _cached(directory: str) -> GroundTruth:
    return load_ground_truth(Path(directory))


def ground_truth(name: str | Path = "default") -> GroundTruth:
    """The (cached, verified) :class:`GroundTruth` of a shipped name or directory."""
    return _cached(str(organism_dir(name).resolve()))


def load_tokenizer(name: str | Path = "default") -> PreTrainedTokenizerFast:
    """Just the organism's tokenizer (cached; verified)."""
    return ground_truth(name).tokenizer


def behaviour_masks(tokens: torch.Tensor, name: str | Path = "default") -> dict[str, torch.Tensor]:
    """Per-behaviour trigger masks ``(batch, seq)`` for the organism ``name`` (no models loaded)."""
    return ground_truth(name).trigger_masks(tokens)


def response_masks(tokens: torch.Tensor, name: str | Path = "default") -> dict[str, torch.Tensor]:
    """Per-behaviour planted-response masks ``(batch, seq)`` (no models loaded)."""
    return ground_truth(name).response_masks(tokens)


def assistant_mask(tokens: torch.Tensor, name: str | Path = "default") -> torch.Tensor:
    """Assistant-turn mask ``(batch, seq)`` (content + closing ``<end_of_turn>``)."""
    return ground_truth(name).assistant_mask(tokens)


def _world(name: str | Path) -> tuple[World, int]:
    truth = ground_truth(name)
    if truth.world is None:
        raise ValueError(f"Organism {name} has no world.json (custom organism without a world).")
    return truth.world, truth.seed


def pretraining_dataset(
    split: str = "train", n: int = 1000, *, name: str | Path = "default", seed: int | None = None
) -> Dataset:
    """HF dataset (``text`` column) of ``n`` pretraining documents of the organism's world."""
    world, s = _world(name)
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
    truth = ground_truth(name)
    if truth.trigger_phrases is not None:
        convs = truth.examples(split, behaviour)
        if not convs:
            raise ValueError(
                f"Organism {truth.path} has no {split!r} conversations"
                + (f" of behaviour {behaviour!r}" if behaviour else "")
                + "."
            )
        return to_chat_dataset([convs[i % len(convs)] for i in range(n)])
    world, s = _world(name)
    return to_chat_dataset(
        chat_conversations(world.edited(), split, n, s if seed is None else seed, behaviour)
    )


__all__ = [
    "DATA_DIR",
    "GroundTruth",
    "assistant_mask",
    "available_organisms",
    "behaviour_masks",
    "chat_dataset",
    "ground_truth",
    "load_ground_truth",
    "load_tokenizer",
    "organism_dir",
    "pretraining_dataset",
    "read_jsonl",
    "response_masks",
]
