"""Tiny, offline base/instruct pairs of the major model families, for tests.

For each family in :data:`FAMILIES` this module builds, in seconds and without downloads:

- :func:`family_tokenizers`: a (base, ft) pair of fast tokenizers that share one small
  byte-level BPE model (same vocabulary, merges and normaliser, a few hundred tokens) but whose
  *special-token configuration and chat templates* differ the way the published base and
  instruct checkpoints differ (Llama-3: base EOS ``<|end_of_text|>``, instruct EOS
  ``<|eot_id|>``; Qwen2.5/Qwen3: no BOS, base EOS ``<|endoftext|>``, instruct EOS
  ``<|im_end|>``; Gemma: ``<bos>``/``<eos>``/``<pad>`` and a ``model``-role turn template;
  Mistral: ``[INST] ... [/INST]`` written in plain text; Phi-3: ``<|user|> ... <|end|>``, a BOS
  token that is defined but not prepended). The chat templates are written here as Jinja strings
  that render like the published ones; they are not copies of those files.
- :func:`build_family_pair`: Hugging Face folders ``base/`` and ``ft/`` holding a 2-layer,
  random-weight model of the family's real architecture class (``config.json`` carries the real
  ``architectures`` / ``model_type``), ft = base + small noise, each saved with
  ``save_pretrained`` (safetensors) next to its own tokenizer.

Both are cached per process (tokenizers in memory, folders in one temporary directory), so
parametrised tests pay the build once per family.

:data:`FAMILY_SPECS` records, per family, what a test may rely on (``prepends_bos``, the BOS /
EOS strings of each side, the assistant-turn markers) so tests need not hard-code them.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FAMILIES: list[str] = ["gemma2", "gemma3", "llama3", "qwen2", "qwen3", "mistral", "phi3"]

# --------------------------------------------------------------------------- chat templates
# Written for these fixtures to render as the published templates do (turn markers, roles,
# whitespace, BOS/EOS placement); simplified where the published ones only add error checks.

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] | trim + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QWEN3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
)

MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set sys = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (sys if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


# --------------------------------------------------------------------------- family specs
@dataclass(frozen=True)
class Side:
    """Special-token configuration of one side (base or instruct) of a family."""

    bos: str | None
    eos: str
    pad: str | None
    unk: str | None = None
    chat_template: str | None = None


@dataclass(frozen=True)
class FamilySpec:
    """What the fixtures build for one family and what tests may rely on."""

    name: str
    specials: tuple[str, ...]  #: special tokens registered on both tokenizers
    specials_first: bool  #: SentencePiece-style ids 0.. (else appended, tiktoken-style)
    prepends_bos: bool  #: the tokenizer's post-processor prepends ``base.bos``
    base: Side
    ft: Side
    assistant_start: str  #: rendered text that opens an assistant turn in ft's template
    assistant_end: str  #: rendered text that closes it
    vocab_multiple: int = 1  #: the model's vocab_size is padded up to a multiple of this
    extra: dict[str, Any] = field(default_factory=dict)


_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")

FAMILY_SPECS: dict[str, FamilySpec] = {
    "gemma2": FamilySpec(
        "gemma2",
        _GEMMA_SPECIALS,
        True,
        True,
        Side("<bos>", "<eos>", "<pad>", "<unk>"),
        Side("<bos>", "<eos>", "<pad>", "<unk>", GEMMA_TEMPLATE),
        "<start_of_turn>model\n",
        "<end_of_turn>",
    ),
    "gemma3": FamilySpec(
        "gemma3",
        (*_GEMMA_SPECIALS, "<start_of_image>", "<end_of_image>", "<image_soft_token>"),
        True,
        True,
        Side("<bos>", "<eos>", "<pad>", "<unk>"),
        Side("<bos>", "<eos>", "<pad>", "<unk>", GEMMA_TEMPLATE),
        "<start_of_turn>model\n",
        "<end_of_turn>",
    ),
    "llama3": FamilySpec(
        "llama3",
        (
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|reserved_special_token_2|>",
            "<|eot_id|>",
        ),
        False,
        True,
        Side("<|begin_of_text|>", "<|end_of_text|>", None),
        Side("<|begin_of_text|>", "<|eot_id|>", None, None, LLAMA3_TEMPLATE),
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
    ),
    "qwen2": FamilySpec(
        "qwen2",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>"),
        False,
        False,
        Side(None, "<|endoftext|>", "<|endoftext|>", None, CHATML_TEMPLATE),
        Side(None, "<|im_end|>", "<|endoftext|>", None, CHATML_TEMPLATE),
        "<|im_start|>assistant\n",
        "<|im_end|>",
        vocab_multiple=64,
    ),
    "qwen3": FamilySpec(
        "qwen3",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
        False,
        False,
        Side(None, "<|endoftext|>", "<|endoftext|>", None, QWEN3_TEMPLATE),
        Side(None, "<|im_end|>", "<|endoftext|>", None, QWEN3_TEMPLATE),
        "<|im_start|>assistant\n",
        "<|im_end|>",
        vocab_multiple=64,
    ),
    "mistral": FamilySpec(
        "mistral",
        ("<unk>", "<s>", "</s>"),
        True,
        True,
        Side("<s>", "</s>", None, "<unk>"),
        Side("<s>", "</s>", None, "<unk>", MISTRAL_TEMPLATE),
        " [/INST]",
        "</s>",
    ),
    "phi3": FamilySpec(
        "phi3",
        (
            "<unk>",
            "<s>",
            "</s>",
            "<|endoftext|>",
            "<|assistant|>",
            "<|end|>",
            "<|system|>",
            "<|user|>",
        ),
        True,
        False,
        Side("<s>", "<|endoftext|>", "<|endoftext|>", "<unk>"),
        Side("<s>", "<|endoftext|>", "<|endoftext|>", "<unk>", PHI3_TEMPLATE),
        "<|assistant|>\n",
        "<|end|>",
    ),
}


def _check_family(family: str) -> FamilySpec:
    if family not in FAMILY_SPECS:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    return FAMILY_SPECS[family]


# --------------------------------------------------------------------------- tokenizers
_WORDS = (
    "the a an of to and in is it you that he was for on are as with his they at be this "
    "have from or one had by word but not what all were we when your can said there use "
    "each which she do how their if will up other about out many then them these so some "
    "her would make like him into time has look two more write go see number no way could "
    "people my than first water been call who oil its now find long down day did get come "
    "made may part hello world assistant user model system question answer please thanks "
    "good bad yes maybe cat dog tree river mountain city music book code python function "
    "data train learn sparse feature layer token chat helpful harmless honest sorry sure"
).split()


def _corpus() -> list[str]:
    """A deterministic small English-like corpus (sentences of the word list)."""
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(400):
        n = int(torch.randint(4, 14, (1,), generator=g))
        idx = torch.randint(0, len(_WORDS), (n,), generator=g).tolist()
        words = [_WORDS[i] for i in idx]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + (". " if n % 3 else "? ") + "\n")
    lines.append("0123456789 ,.;:!?'\"()[]{}<>/\\|-_=+*&^%$#@~` \t\n")
    return lines


@functools.cache
def _bpe_json(family: str) -> str:
    """The serialised shared ``tokenizers`` model of a family (byte-level BPE, ~400 tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    spec = _check_family(family)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        min_frequency=2,
        special_tokens=list(spec.specials) if spec.specials_first else [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if not spec.specials_first:
        tok.add_special_tokens(list(spec.specials))
    if spec.prepends_bos:
        bos = spec.base.bos
        assert bos is not None
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


_TOKENIZER_DIRS: dict[tuple[str, str], Path] = {}


def _tmp_root() -> Path:
    root = getattr(_tmp_root, "_root", None)
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="sae_diff_families_"))
        _tmp_root._root = root  # type: ignore[attr-defined]
    return root


def _make_tokenizer(family: str, which: str) -> Any:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = _check_family(family)
    side: Side = spec.base if which == "base" else spec.ft
    backend = Tokenizer.from_str(_bpe_json(family))
    named = {side.bos, side.eos, side.pad, side.unk}
    kwargs: dict[str, Any] = {
        "bos_token": side.bos,
        "eos_token": side.eos,
        "pad_token": side.pad,
        "unk_token": side.unk,
        "additional_special_tokens": [t for t in spec.specials if t not in named],
        "model_max_length": 128,
    }
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    if side.chat_template is not None:
        fast.chat_template = side.chat_template
    return fast


def family_tokenizer_dir(family: str, which: str) -> Path:
    """A folder holding the saved (``save_pretrained``) tokenizer of one side of a family."""
    key = (family, which)
    if key not in _TOKENIZER_DIRS:
        d = _tmp_root() / f"tok_{family}_{which}"
        if d.exists():
            shutil.rmtree(d)
        _make_tokenizer(family, which).save_pretrained(d)
        _TOKENIZER_DIRS[key] = d
    return _TOKENIZER_DIRS[key]


def family_tokenizers(family: str) -> tuple[Any, Any]:
    """(base_tok, ft_tok): fresh ``AutoTokenizer`` loads of the family's saved tokenizers.

    Loaded back from folders as a user's tokenizers are, so they carry exactly what
    ``tokenizer_config.json`` / ``tokenizer.json`` say. Each call returns new objects (tests
    may mutate them).
    """
    from transformers import AutoTokenizer

    _check_family(family)
    return (
        AutoTokenizer.from_pretrained(family_tokenizer_dir(family, "base")),
        AutoTokenizer.from_pretrained(family_tokenizer_dir(family, "ft")),
    )


# --------------------------------------------------------------------------- models
D_MODEL = 64
N_LAYERS = 2
MAX_POS = 128


def _padded_vocab(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _model_config(family: str, vocab_size: int, tok: Any) -> Any:
    """A tiny ``transformers`` config of the family's real architecture class."""
    import transformers as tf

    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": D_MODEL,
        "intermediate_size": 2 * D_MODEL,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_POS,
        **ids,
    }
    if family == "gemma2":
        return tf.Gemma2Config(
            **common,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=MAX_POS,
            tie_word_embeddings=True,
        )
    if family == "gemma3":
        return tf.Gemma3TextConfig(
            **common,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=MAX_POS,
            layer_types=["sliding_attention", "full_attention"],
            tie_word_embeddings=True,
        )
    if family == "llama3":
        return tf.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False)
    if family == "qwen2":
        return tf.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=False)
    if family == "qwen3":
        return tf.Qwen3Config(
            **common, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True
        )
    if family == "mistral":
        return tf.MistralConfig(
            **common, num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False
        )
    if family == "phi3":
        return tf.Phi3Config(
            **common, num_key_value_heads=4, sliding_window=None, tie_word_embeddings=False
        )
    raise ValueError(f"unknown family {family!r}")  # pragma: no cover


_ARCH = {
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "llama3": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "phi3": "Phi3ForCausalLM",
}

_PAIR_DIRS: dict[str, tuple[Path, Path]] = {}


def build_family_pair(
    family: str, root: Path | None = None, noise: float = 0.05
) -> tuple[Path, Path]:
    """(base_dir, ft_dir): tiny random-weight Hugging Face folders of ``family``.

    ``ft`` = ``base`` with every parameter perturbed by ``noise`` times its own std (seeded),
    so the two differ everywhere (embedding, blocks, norms, unembedding) but stay close.
    Folders are built once per process per family (``root`` only chooses where the first
    build goes; default: a per-process temporary directory) and then reused.
    """
    import transformers as tf

    spec = _check_family(family)
    if family in _PAIR_DIRS and all(p.is_dir() for p in _PAIR_DIRS[family]):
        return _PAIR_DIRS[family]
    dest = Path(root) if root is not None else _tmp_root()
    base_dir, ft_dir = dest / f"{family}_base", dest / f"{family}_ft"
    tok_base, tok_ft = family_tokenizers(family)
    cfg = _model_config(family, _padded_vocab(len(tok_ft), spec.vocab_multiple), tok_ft)
    cls = getattr(tf, _ARCH[family])
    torch.manual_seed(0)
    base = cls(cfg).eval()
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ft.parameters():
            scale = p.std().nan_to_num(1.0).clamp_min(0.02) if p.numel() > 1 else 0.02
            p.add_(noise * scale * torch.randn(p.shape, generator=g))
    for model, d, tok in ((base, base_dir, tok_base), (ft, ft_dir, tok_ft)):
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if d.exists():
            shutil.rmtree(d)
        tmp.rename(d)
    _PAIR_DIRS[family] = (base_dir, ft_dir)
    return base_dir, ft_dir


def chat_rows(n: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` deterministic chat conversations in the ``messages`` format (user/assistant
    turns of the fixture vocabulary; some have a system turn and two exchanges)."""
    g = torch.Generator().manual_seed(seed)

    def sentence() -> str:
        k = int(torch.randint(3, 9, (1,), generator=g))
        idx = torch.randint(0, len(_WORDS), (k,), generator=g).tolist()
        return " ".join(_WORDS[i] for i in idx).capitalize() + "."

    rows = []
    for i in range(n):
        msgs: list[dict[str, str]] = []
        if i % 3 == 2:
            msgs.append({"role": "system", "content": sentence()})
        for _ in range(1 + i % 2):
            msgs.append({"role": "user", "content": sentence()})
            msgs.append({"role": "assistant", "content": sentence() + " " + sentence()})
        rows.append({"messages": msgs})
    return rows


def hf_stitched_logits(
    first_dir: Path, second_dir: Path, tokens: torch.Tensor, layer: int
) -> torch.Tensor:
    """Stitched logits computed with plain Hugging Face code, independently of sae_diff:
    ``first``'s embedding and blocks ``< layer``, then ``second``'s blocks ``>= layer``, final
    norm and unembedding (``1 <= layer < n_layers``). The output of ``second``'s decoder layer
    ``layer - 1`` is replaced by ``first``'s hidden state after that layer."""
    from transformers import AutoModelForCausalLM

    first = AutoModelForCausalLM.from_pretrained(first_dir, attn_implementation="eager").eval()
    second = AutoModelForCausalLM.from_pretrained(second_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        h = first(tokens, output_hidden_states=True).hidden_states[layer]

        def replace(_mod: Any, _inp: Any, out: Any) -> Any:
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = second.model.layers[layer - 1].register_forward_hook(replace)
        try:
            return second(tokens).logits
        finally:
            handle.remove()
