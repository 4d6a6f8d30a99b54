"""Chat masks (assistant content, template tokens) read off the tokenizer's own chat template.

:func:`encode_chat` renders each conversation once with its real contents and once with
sentinel contents; the sentinel rendering tells where each message's content sits in the
text, and token offsets map that to tokens. This works for any family's template (Gemma,
Llama-3, ChatML/Qwen, Mistral, Phi-3, ...) and is done per conversation, before rows are
packed, so a packed row keeps the masks of a turn continued from the previous row.
:func:`assistant_mask` is the token-level fallback for pre-tokenised rows (marker search).
Import these from :mod:`sae_diff.pairing.masks`, the one import point of every mask.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from sae_diff.errors import SaeDiffError
from sae_diff.pairing.token_masks import check_tokens, special_ids_of, text_ids

#: Message roles whose content is "assistant" content (``model`` is Gemma's spelling).
ASSISTANT_ROLES = ("assistant", "model")


class ChatTemplateError(SaeDiffError, ValueError):
    """A chat template cannot be aligned with its rendering (or the tokenizer cannot map
    characters to tokens); the message names the conversation's problem and the fix."""


@dataclass(frozen=True)
class ChatMarkers:
    """Explicit assistant-turn markers, for templates the automatic alignment cannot read
    and for pre-tokenised chat rows.

    Args:
        header: the rendered text that opens an assistant turn's content, e.g.
            ``"<start_of_turn>model\\n"`` (Gemma), ``"<|im_start|>assistant\\n"`` (ChatML),
            ``"<|start_header_id|>assistant<|end_header_id|>\\n\\n"`` (Llama-3).
        end: the single token that closes the turn, e.g. ``"<end_of_turn>"``,
            ``"<|im_end|>"``, ``"<|eot_id|>"``.
    """

    header: str
    end: str


#: Sentinel standing for message ``i``'s content while rendering; no whitespace or
#: template syntax, so ``| trim`` and friends leave it alone.
_SENTINEL = "\u27e6sae-diff-{}\u27e7"
_SENTINEL_RE = re.compile("\u27e6sae-diff-(\\d+)\u27e7")


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]], **kwargs: Any
) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            "chat data needs a tokenizer with a chat template; this tokenizer has none "
            "(set tokenizer.chat_template, or load the fine-tune's own tokenizer)"
        )
    out = tokenizer.apply_chat_template(list(messages), tokenize=False, **kwargs)
    if not isinstance(out, str):
        raise ChatTemplateError(
            f"apply_chat_template(tokenize=False) returned a {type(out).__name__}, not text"
        )
    return out


def _special_id_set(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Special ids: the named ones plus every added token flagged ``special``
    (``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``, ...)."""
    ids = set(special_ids_of(tokenizer))
    for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(t, "special", False):
            ids.add(int(i))
    return ids


def _locate_contents(
    text: str, sentinel_text: str, contents: list[str]
) -> list[tuple[int, int] | None]:
    """Character span of each message's content in ``text`` (None: not rendered).

    ``sentinel_text`` is the same conversation rendered with sentinel contents; the text
    between sentinels is the template's own text, which must appear verbatim around each
    content in ``text``. A content the template trimmed is found by trying the stripped
    variants; otherwise the content ends where the next template piece begins.
    """
    parts = _SENTINEL_RE.split(sentinel_text)
    pieces, order = parts[0::2], [int(i) for i in parts[1::2]]
    if len(set(order)) != len(order):
        raise ChatTemplateError(
            "the chat template writes a message's content more than once, so its tokens "
            "cannot be attributed; pass explicit ChatMarkers"
        )
    if not text.startswith(pieces[0]):
        raise ChatTemplateError(
            "the chat template renders this conversation differently from the same "
            f"conversation with placeholder contents (expected it to start with "
            f"{pieces[0][:60]!r}); pass explicit ChatMarkers"
        )
    spans: list[tuple[int, int] | None] = [None] * len(contents)
    pos = len(pieces[0])
    for k, m in enumerate(order):
        nxt, last = pieces[k + 1], k == len(order) - 1
        c = contents[m]
        end: int | None = None
        for cand in dict.fromkeys((c, c.strip(), c.rstrip(), c.lstrip())):
            e = pos + len(cand)
            if not text.startswith(cand, pos):
                continue
            if (last and e + len(nxt) == len(text) and text.endswith(nxt)) or (
                not last and text.startswith(nxt, e)
            ):
                end = e
                break
        if end is None:  # the template changed the content: it ends where the next piece starts
            if last:
                j = len(text) - len(nxt) if text.endswith(nxt) else -1
            else:
                j = text.find(nxt, pos)
            if j < pos:
                raise ChatTemplateError(
                    f"cannot find message {m}'s content in the rendered conversation (the "
                    f"template text after it, {nxt[:60]!r}, does not follow); pass explicit "
                    "ChatMarkers"
                )
            end = j
        spans[m] = (pos, end)
        pos = end + len(nxt)
    return spans


@dataclass
class ChatEncoding:
    """One conversation rendered with the tokenizer's chat template, with per-token masks.

    ``assistant``: tokens of assistant contents plus the template's end-of-turn token that
    closes each assistant turn (the model must predict it; the organisms' convention).
    ``template``: tokens outside every message's content (turn headers, end-of-turn tokens,
    BOS, default system prompts the template adds). A token straddling content and template
    text counts as content. ``spans``: each message's content as a character span of
    ``text`` (None if the template did not render it).
    """

    input_ids: list[int]
    assistant: list[bool]
    template: list[bool]
    text: str
    spans: list[tuple[int, int] | None]


def encode_chat(
    messages: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    markers: ChatMarkers | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> ChatEncoding:
    """Render ``messages`` with the tokenizer's chat template and compute its chat masks.

    The ids are exactly ``tokenizer(apply_chat_template(messages, tokenize=False),
    add_special_tokens=False)`` (the template writes its own special tokens). Content spans
    come from a second rendering with sentinel contents (see :func:`_locate_contents`),
    token spans from the fast tokenizer's offsets. With ``markers`` the assistant mask comes
    from those markers instead (:func:`assistant_mask`); the template mask is then all
    False if the template cannot be aligned. ``template_kwargs`` go to both renderings
    (e.g. ``{"enable_thinking": False}``).
    """
    kw = dict(template_kwargs or {})
    msgs = list(messages)
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatTemplateError(
                f"message {i} is {m!r}; chat data must be lists of "
                "{'role': ..., 'content': ...} dicts"
            )
        if not isinstance(m["content"], str):
            raise ChatTemplateError(
                f"message {i} has {type(m['content']).__name__} content; masks need plain "
                "string contents (join multi-part text contents first)"
            )
    text = _render(tokenizer, msgs, **kw)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:
        raise ChatTemplateError(
            "chat masks need a fast tokenizer (character offsets); load it with use_fast=True"
        ) from e
    ids = [int(i) for i in enc["input_ids"]]
    offs = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    n = len(ids)
    sentinel = [{**m, "content": _SENTINEL.format(i)} for i, m in enumerate(msgs)]
    try:
        spans = _locate_contents(
            text, _render(tokenizer, sentinel, **kw), [m["content"] for m in msgs]
        )
    except ChatTemplateError:
        if markers is None:
            raise
        warnings.warn(
            "the chat template cannot be aligned with its rendering; the template mask of "
            "these conversations is all False (the assistant mask uses the given markers)",
            stacklevel=2,
        )
        asst = assistant_mask(torch.tensor([ids]), tokenizer, markers=markers)[0]
        return ChatEncoding(ids, asst.tolist(), [False] * n, text, [None] * len(msgs))
    owner = [-1] * n  # the message whose content each token overlaps (-1: template)
    for k, sp in enumerate(spans):
        if sp is None:
            continue
        lo, hi = sp
        for i, (a, b) in enumerate(offs):
            if b > a and a < hi and b > lo:
                owner[i] = k
    template = [o < 0 for o in owner]
    if markers is not None:
        asst_list = assistant_mask(torch.tensor([ids]), tokenizer, markers=markers)[0].tolist()
        return ChatEncoding(ids, asst_list, template, text, spans)
    specials = _special_id_set(tokenizer)
    assistant = [o >= 0 and msgs[o]["role"] in ASSISTANT_ROLES for o in owner]
    for k, sp in enumerate(spans):
        if sp is None or msgs[k]["role"] not in ASSISTANT_ROLES:
            continue
        # the closing end-of-turn: the first special token after the content, with only
        # whitespace tokens in between (those are generated too)
        j = next((i for i, (a, _) in enumerate(offs) if a >= sp[1] and owner[i] != k), n)
        q = j
        while (
            q < n
            and owner[q] < 0
            and ids[q] not in specials
            and not text[offs[q][0] : offs[q][1]].strip()
        ):
            q += 1
        if q < n and owner[q] < 0 and ids[q] in specials:
            for i in range(j, q + 1):
                assistant[i] = True
    return ChatEncoding(ids, assistant, template, text, spans)


def chat_markers(
    tokenizer: PreTrainedTokenizerBase, template_kwargs: dict[str, Any] | None = None
) -> ChatMarkers:
    """Assistant-turn markers read off the tokenizer's chat template (for pre-tokenised
    chat rows, where no conversation structure is left to align).

    The header is the generation prompt (``add_generation_prompt=True`` minus the plain
    rendering); a template without one (Mistral's) gives the text between a user content
    and the following assistant content instead. The end marker is the first special token
    after an assistant content.
    """
    kw = dict(template_kwargs or {})
    u, a = _SENTINEL.format(0), _SENTINEL.format(1)
    user = [{"role": "user", "content": u}]
    plain = _render(tokenizer, user, **kw)
    gen = _render(tokenizer, user, add_generation_prompt=True, **kw)
    both = _render(tokenizer, [*user, {"role": "assistant", "content": a}], **kw)
    if u not in both or a not in both:
        raise ChatTemplateError(
            "the chat template does not render a user/assistant exchange; pass ChatMarkers"
        )
    # the generation prompt: where the two renderings' tokens part (a template may end a
    # plain rendering differently, e.g. Phi-3 with EOS, so this is not a plain suffix)
    ids_p = text_ids(tokenizer, plain)
    enc_g = tokenizer(gen, add_special_tokens=False, return_offsets_mapping=True)
    ids_g = list(enc_g["input_ids"])
    k = len(os.path.commonprefix([ids_p, ids_g]))
    header = gen[int(enc_g["offset_mapping"][k][0]) :] if k < len(ids_g) else ""
    if not header:
        header = both[both.index(u) + len(u) : both.index(a)]
    after = both[both.index(a) + len(a) :]
    specials = _special_id_set(tokenizer)
    end_ids = [i for i in text_ids(tokenizer, after) if i in specials]
    if not header or not end_ids:
        raise ChatTemplateError(
            "cannot read assistant-turn markers off the chat template (no assistant header "
            "or no special end-of-turn token); pass ChatMarkers(header=..., end=...)"
        )
    return ChatMarkers(header=header, end=str(tokenizer.convert_ids_to_tokens(end_ids[0])))


def assistant_mask(
    tokens: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
    *,
    start_of_turn: str | None = None,
    role: str | None = None,
    end_of_turn: str | None = None,
    include_end: bool = True,
    markers: ChatMarkers | None = None,
) -> torch.Tensor:
    """Assistant-turn tokens found by marker tokens in already tokenised rows.

    Chat *conversations* get exact masks from :func:`encode_chat` (per conversation, before
    packing); this token-level search is for pre-tokenised chat rows. A turn opens after
    the header tokens and closes at the end token, included when ``include_end`` (the model
    must predict it). A turn cut off at the row end is masked to the row end; tokens of a
    turn begun in an earlier row are not found (no header in this row).

    Markers: ``markers``; else Gemma-style ``f"{start_of_turn}{role}\\n"`` / ``end_of_turn``
    when any of these is given (defaults ``<start_of_turn>``, ``model``, ``<end_of_turn>``);
    else read off the tokenizer's chat template (:func:`chat_markers`).
    """
    check_tokens(tokens)
    if markers is None:
        if start_of_turn is None and role is None and end_of_turn is None:
            markers = chat_markers(tokenizer)
        else:
            markers = ChatMarkers(
                f"{start_of_turn or '<start_of_turn>'}{role or 'model'}\n",
                end_of_turn or "<end_of_turn>",
            )
    header = text_ids(tokenizer, markers.header)
    end_ids = text_ids(tokenizer, markers.end)
    if not header or len(end_ids) != 1:
        raise ValueError(
            f"the tokenizer does not encode the chat markers {markers.header!r}/{markers.end!r} "
            "as expected (the end marker must be a single token); pass this template's markers"
        )
    end_id = end_ids[0]
    b, s = tokens.shape
    h = len(header)
    opens = torch.zeros(b, s + 1, dtype=torch.bool, device=tokens.device)
    if s >= h:
        windows = tokens.unfold(1, h, 1)  # (b, s - h + 1, h)
        hdr = torch.as_tensor(header, device=tokens.device)
        found = (windows == hdr).all(dim=-1)
        opens[:, h : s + 1] = found  # content starts right after the header
    closes = torch.zeros(b, s + 1, dtype=torch.bool, device=tokens.device)
    closes[:, (1 if include_end else 0) : s + (1 if include_end else 0)] = tokens == end_id
    idx = torch.arange(s + 1, device=tokens.device).expand(b, s + 1)
    last_open = torch.where(opens, idx, torch.full_like(idx, -1)).cummax(dim=1).values
    last_close = torch.where(closes, idx, torch.full_like(idx, -1)).cummax(dim=1).values
    inside = (last_open >= 0) & (last_open > last_close)
    return inside[:, :s]


__all__ = [
    "ASSISTANT_ROLES",
    "ChatEncoding",
    "ChatMarkers",
    "ChatTemplateError",
    "assistant_mask",
    "chat_markers",
    "encode_chat",
]
