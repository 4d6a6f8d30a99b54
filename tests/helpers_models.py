"""Tiny model fixtures for offline CPU tests (no downloads).

Everything here is built in-process: a character-level tokenizer made with ``tokenizers``
(with BOS/EOS/PAD and Gemma-style ``<start_of_turn>``/``<end_of_turn>`` special tokens and
a chat template), tiny ``HookedTransformer`` pairs made from ``HookedTransformerConfig``,
and a tiny GPT-2 pair saved as Hugging Face folders for the real loading code.

Other test modules may import these helpers freely.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

CHARS = "abcdefghijklmnopqrstuvwxyz .,!?'\n"
SPECIAL_TOKENS = ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"]
BOS_ID, EOS_ID, PAD_ID, SOT_ID, EOT_ID = 0, 1, 2, 3, 4

#: Gemma-style chat template (the same shape as Gemma 2's, without the system-role check).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def make_tokenizer(extra_chars: str = "", chat_template: str | None = GEMMA_CHAT_TEMPLATE):
    """A character-level ``PreTrainedTokenizerFast`` (vocab ~ 38 tokens), built offline.

    ``extra_chars`` appends characters to the vocabulary (to build a *different* tokenizer
    for the mismatch tests).
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARS + extra_chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    # Round-trip through a folder, as real tokenizers are loaded (TransformerLens reloads the
    # tokenizer from its ``name_or_path``).
    key = (extra_chars, chat_template)
    if key not in _TOKENIZER_DIRS:
        d = Path(tempfile.mkdtemp(prefix="sae_diff_tok_"))
        fast.save_pretrained(d)
        _TOKENIZER_DIRS[key] = d
    return AutoTokenizer.from_pretrained(_TOKENIZER_DIRS[key])


_TOKENIZER_DIRS: dict[tuple[str, str | None], Path] = {}


def tiny_cfg(
    n_layers: int = 2, d_model: int = 16, d_vocab: int | None = None, n_ctx: int = 32
) -> HookedTransformerConfig:
    """A tiny GPT-style ``HookedTransformerConfig``."""
    if d_vocab is None:
        d_vocab = len(SPECIAL_TOKENS) + len(CHARS)
    return HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_ctx=n_ctx,
        d_head=4,
        n_heads=d_model // 4,
        d_mlp=4 * d_model,
        d_vocab=d_vocab,
        act_fn="gelu",
        normalization_type="LN",
        device="cpu",
        seed=0,
    )


def tiny_pair(
    n_layers: int = 2, d_model: int = 16, n_ctx: int = 32, noise: float = 0.3, tokenizer=None
) -> tuple[HookedTransformer, HookedTransformer]:
    """(base, ft) tiny HookedTransformers: ft = base with every weight perturbed (also the
    embedding and unembedding, so stitching tests catch a wrong owner of those)."""
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
    cfg = tiny_cfg(n_layers=n_layers, d_model=d_model, n_ctx=n_ctx)
    torch.manual_seed(0)
    base = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    ft = HookedTransformer(copy.deepcopy(cfg), tokenizer=tokenizer, default_padding_side="right")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        state = {}
        for k, v in base.state_dict().items():
            if v.is_floating_point() and "IGNORE" not in k and "mask" not in k:
                v = v + noise * v.std().nan_to_num(1.0).clamp_min(0.02) * torch.randn(
                    v.shape, generator=g
                )
            state[k] = v
        ft.load_state_dict(state)
    base.eval()
    ft.eval()
    return base, ft


def save_tiny_gpt2_pair(root: Path, n_layer: int = 2, n_embd: int = 32) -> tuple[Path, Path]:
    """Save a tiny GPT-2 base and a perturbed 'fine-tune' as Hugging Face folders
    (``model.safetensors`` + ``config.json`` + tokenizer files). Returns (base_dir, ft_dir)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tokenizer()
    cfg = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=4,
        n_positions=64,
        n_ctx=64,
        vocab_size=len(tok),
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(0)
    base = GPT2LMHeadModel(cfg)
    ft = copy.deepcopy(base)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    base_dir, ft_dir = Path(root) / "base", Path(root) / "ft"
    for model, d in ((base, base_dir), (ft, ft_dir)):
        model.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
    return base_dir, ft_dir


def random_tokens(batch: int = 3, seq: int = 12, seed: int = 0, bos: bool = True) -> torch.Tensor:
    """Random non-special tokens, with BOS at position 0 when ``bos``."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(
        len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + len(CHARS), (batch, seq), generator=g
    )
    if bos:
        toks[:, 0] = BOS_ID
    return toks
