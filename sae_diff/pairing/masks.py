"""Token masks recorded wherever activations are stored (METHODS.md §6).

Every function returns a ``bool`` tensor of shape ``(batch, seq)``, ``True`` where the token
*has* the property (is BOS, is special, is high-norm, ...). Whether a property excludes a
token from training is decided by :class:`MaskConfig`, not here, so stored masks can also
be used to split results (e.g. template tokens vs the rest).

Chat masks (assistant content, template tokens) come from the tokenizer's own chat template
(:func:`encode_chat`): each conversation is rendered once with its real contents and once with
sentinel contents, the sentinel rendering tells where each message's content sits in the
text, and token offsets map that to tokens. This works for any family's template (Gemma,
Llama-3, ChatML/Qwen, Mistral, Phi-3, ...) and is done per conversation, before rows are
packed, so a packed row keeps the masks of a turn continued from the previous row.

Length (~610 lines): every mask of METHODS.md §6 and the chat-template span parsing they
share; one module so that harvest, store and evaluation import one definition of each mask.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from sae_diff.errors import SaeDiffError

MASK_NAMES = ("bos", "special", "high_norm", "first_n", "padding", "assistant", "template")
#: Message roles whose content is "assistant" content (``model`` is Gemma's spelling).
ASSISTANT_ROLES = ("assistant", "model")


def _check_tokens(tokens: torch.Tensor) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError("tokens must be a (batch, seq) tensor of token ids")


def bos_mask(tokens: torch.Tensor, bos_token_id: int | None) -> torch.Tensor:
    """Positions holding the BOS token (False everywhere if the tokenizer has none)."""
    _check_tokens(tokens)
    if bos_token_id is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return tokens == bos_token_id


def special_token_mask(
    tokens: torch.Tensor, special_ids: torch.Tensor | list[int] | set[int] | None
) -> torch.Tensor:
    """Positions holding any of ``special_ids`` (BOS/EOS/PAD, chat-template tokens, ...)."""
    _check_tokens(tokens)
    if special_ids is None or len(special_ids) == 0:
        return torch.zeros_like(tokens, dtype=torch.bool)
    ids = torch.as_tensor(sorted(set(int(i) for i in special_ids)), device=tokens.device)
    return torch.isin(tokens, ids)


def high_norm_mask(
    acts: torch.Tensor, ratio: float = 10.0, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Tokens whose activation norm exceeds ``ratio`` x the median norm (attention sinks).

    Args:
        acts: ``(batch, seq, d)`` or paired ``(batch, seq, n_models, d)``. For paired input a
            token is high-norm if it is so in *any* model, each against its own median.
        ratio: the threshold multiple ``r`` (default 10).
        valid: optional ``(batch, seq)`` bool; the median is taken over valid tokens only
            (e.g. not padding).

    The median is over the tokens given (callers pass a whole shard or batch).
    """
    if ratio <= 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    if acts.dim() not in (3, 4):
        raise ValueError(
            f"acts must be (batch, seq, d) or (batch, seq, n_models, d), got {tuple(acts.shape)}"
        )
    norms = acts.float().norm(dim=-1)  # (b, s) or (b, s, m)
    if norms.dim() == 2:
        norms = norms.unsqueeze(-1)
    sel = norms if valid is None else norms[valid.to(norms.device)]
    sel = sel.reshape(-1, norms.shape[-1])
    if sel.shape[0] == 0:
        return torch.zeros(norms.shape[:2], dtype=torch.bool, device=acts.device)
    median = sel.median(dim=0).values  # (m,)
    return (norms > ratio * median).any(dim=-1)


def _positions_since_start(starts: torch.Tensor) -> torch.Tensor:
    """For each position, its distance from the most recent ``True`` in ``starts`` (the row
    start counts as a start)."""
    b, s = starts.shape
    idx = torch.arange(s, device=starts.device).expand(b, s)
    marks = torch.where(starts, idx, torch.zeros_like(idx))
    last = marks.cummax(dim=1).values
    return idx - last


def first_n_mask(
    tokens: torch.Tensor, n: int, doc_starts: torch.Tensor | None = None
) -> torch.Tensor:
    """The first ``n`` positions of each row: the attention-sink positions.

    This is what ``MaskConfig.first_n`` / ``mask_first_n`` mean (METHODS.md §6, "optionally
    the first n tokens of each sequence", a sequence being a row the model ran on): position
    ``i < n`` of every row, whatever token it holds, so a model without BOS can drop its row
    start (``n = 1``) on its own. BOS tokens elsewhere in a packed row are the BOS mask's job.

    ``doc_starts`` (``(batch, seq)`` bool, True where a document begins) gives instead the
    first ``n`` tokens of every *document* (a document continued from the previous row is
    not re-masked); the training masks do not use that variant.
    """
    _check_tokens(tokens)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if doc_starts is None:
        pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return pos < n
    if doc_starts.shape != tokens.shape:
        raise ValueError("doc_starts must have the shape of tokens")
    dist = _positions_since_start(doc_starts.to(tokens.device).bool())
    # positions before the first start of the row belong to a document continued from the
    # previous row: not "first n" of anything
    started = doc_starts.to(tokens.device).bool().cumsum(dim=1) > 0
    return (dist < n) & started


def padding_mask(
    tokens: torch.Tensor,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Padding positions: ``attention_mask == 0`` when given (preferred: many tokenizers use
    the same id for PAD and EOS/BOS), else ``tokens == pad_token_id``."""
    _check_tokens(tokens)
    if attention_mask is not None:
        if attention_mask.shape != tokens.shape:
            raise ValueError("attention_mask must have the shape of tokens")
        return ~attention_mask.to(tokens.device).bool()
    if pad_token_id is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return tokens == pad_token_id


def _ids(tokenizer: Any, text: str) -> list[int]:
    out = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(out)


# ---------------------------------------------------------------------- chat templates
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


def _render(tokenizer: Any, messages: Sequence[dict[str, Any]], **kwargs: Any) -> str:
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


def _special_id_set(tokenizer: Any) -> set[int]:
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
    tokenizer: Any,
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


def chat_markers(tokenizer: Any, template_kwargs: dict[str, Any] | None = None) -> ChatMarkers:
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
    ids_p = _ids(tokenizer, plain)
    enc_g = tokenizer(gen, add_special_tokens=False, return_offsets_mapping=True)
    ids_g = list(enc_g["input_ids"])
    k = len(os.path.commonprefix([ids_p, ids_g]))
    header = gen[int(enc_g["offset_mapping"][k][0]) :] if k < len(ids_g) else ""
    if not header:
        header = both[both.index(u) + len(u) : both.index(a)]
    after = both[both.index(a) + len(a) :]
    specials = _special_id_set(tokenizer)
    end_ids = [i for i in _ids(tokenizer, after) if i in specials]
    if not header or not end_ids:
        raise ChatTemplateError(
            "cannot read assistant-turn markers off the chat template (no assistant header "
            "or no special end-of-turn token); pass ChatMarkers(header=..., end=...)"
        )
    return ChatMarkers(header=header, end=str(tokenizer.convert_ids_to_tokens(end_ids[0])))


def assistant_mask(
    tokens: torch.Tensor,
    tokenizer: Any,
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
    _check_tokens(tokens)
    if markers is None:
        if start_of_turn is None and role is None and end_of_turn is None:
            markers = chat_markers(tokenizer)
        else:
            markers = ChatMarkers(
                f"{start_of_turn or '<start_of_turn>'}{role or 'model'}\n",
                end_of_turn or "<end_of_turn>",
            )
    header = _ids(tokenizer, markers.header)
    end_ids = _ids(tokenizer, markers.end)
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


@dataclass
class TokenMasks:
    """The masks of one block of tokens, each ``(batch, seq)`` bool or None if not computed.

    ``assistant`` and ``template`` exist for chat data (False on text rows); ``first_n``
    records the first ``MaskConfig.first_n`` positions of each row.
    """

    bos: torch.Tensor | None = None
    special: torch.Tensor | None = None
    high_norm: torch.Tensor | None = None
    first_n: torch.Tensor | None = None
    padding: torch.Tensor | None = None
    assistant: torch.Tensor | None = None
    template: torch.Tensor | None = None

    def to_dict(self) -> dict[str, torch.Tensor]:
        """The computed masks by name (``mask_`` prefixes are added by the cache)."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> TokenMasks:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        return cls(**{k: v.bool() for k, v in d.items() if k in MASK_NAMES})


@dataclass
class MaskConfig:
    """Which masks to compute and which exclude tokens from training data.

    Defaults follow METHODS.md §6: BOS, padding and very high-norm tokens (norm > 10 x
    median) are excluded; special/template tokens are recorded but kept; ``first_n`` and
    ``only_assistant`` are off.

    - ``exclude_bos``: every BOS token, wherever it is in a packed row (row starts and
      document separators). A tokenizer without BOS (Qwen) has none to exclude.
    - ``first_n``: the first ``n`` positions of each row, whatever they hold (the
      attention sinks; ``first_n=1`` drops the row start of a model without BOS). Computed
      from positions, so a cache harvested with another ``first_n`` trains with this one.
    - ``only_assistant``: keep only assistant content and the end-of-turn token closing
      each assistant turn (chat data); ``exclude_template``: drop tokens outside message
      contents (turn headers, end-of-turn tokens, template-added text).
    """

    exclude_bos: bool = True
    exclude_padding: bool = True
    exclude_high_norm: bool = True
    high_norm_ratio: float = 10.0
    exclude_special: bool = False
    first_n: int = 0
    only_assistant: bool = False
    extra_special_ids: list[int] = field(default_factory=list)
    exclude_template: bool = False

    def __post_init__(self) -> None:
        if self.first_n < 0:
            raise ValueError(f"first_n must be >= 0, got {self.first_n}")

    def keep(self, masks: TokenMasks) -> torch.Tensor:
        """``(batch, seq)`` bool: True for tokens that stay in the training data."""
        ref = next(iter(masks.to_dict().values()), None)
        if ref is None:
            raise ValueError("no masks were computed")
        keep = torch.ones_like(ref, dtype=torch.bool)
        for flag, name in (
            (self.exclude_bos, "bos"),
            (self.exclude_padding, "padding"),
            (self.exclude_high_norm, "high_norm"),
            (self.exclude_special, "special"),
            (self.exclude_template, "template"),
        ):
            if flag:
                m = getattr(masks, name)
                if m is None:
                    hint = " (chat data only)" if name == "template" else ""
                    raise ValueError(
                        f"mask {name!r} is needed by this MaskConfig but was not recorded{hint}"
                    )
                keep &= ~m.to(keep.device)
        if self.first_n > 0:
            keep[:, : self.first_n] = False
        if self.only_assistant:
            if masks.assistant is None:
                raise ValueError("only_assistant=True needs the assistant mask (chat data)")
            keep &= masks.assistant.to(keep.device)
        return keep


def special_ids_of(tokenizer: Any, extra: list[int] | None = None) -> list[int]:
    """All special-token ids of a tokenizer (BOS/EOS/PAD/UNK, added specials) plus ``extra``."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or []) if tokenizer is not None else set()
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if v is not None:
            ids.add(int(v))
    ids.update(int(i) for i in (extra or []))
    return sorted(ids)


def compute_masks(
    tokens: torch.Tensor,
    tokenizer: Any = None,
    *,
    acts: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    doc_starts: torch.Tensor | None = None,
    config: MaskConfig | None = None,
    chat: bool = False,
    assistant: torch.Tensor | None = None,
    template: torch.Tensor | None = None,
    markers: ChatMarkers | None = None,
) -> TokenMasks:
    """Compute every applicable mask for a block of tokens.

    ``acts`` (``(batch, seq, [2,] d)``) enables the high-norm mask. ``assistant`` /
    ``template`` are the per-conversation chat masks a :class:`~sae_diff.data.sources.TokenSource`
    carries through packing (prefer ``TokenBatch.masks``, which passes them); without them,
    ``chat=True`` searches the rows for assistant-turn markers (``markers``, else read off
    the tokenizer's template), which misses turns continued from a previous row. The
    first-n mask is the first ``config.first_n`` positions of each row; ``doc_starts`` is
    accepted for callers of the older signature and not used.
    """
    del doc_starts  # first_n is per row (see first_n_mask)
    config = config or MaskConfig()
    bos_id = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    eos_id = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if attention_mask is not None:
        padding = padding_mask(tokens, attention_mask=attention_mask)
    elif pad_id is not None and pad_id not in (bos_id, eos_id):
        padding = padding_mask(tokens, pad_id)
    else:  # PAD shares its id with BOS/EOS: only an attention mask can tell them apart
        padding = torch.zeros_like(tokens, dtype=torch.bool)
    masks = TokenMasks(
        bos=bos_mask(tokens, bos_id),
        special=special_token_mask(tokens, special_ids_of(tokenizer, config.extra_special_ids)),
        first_n=first_n_mask(tokens, config.first_n),
        padding=padding,
    )
    if acts is not None:
        masks.high_norm = high_norm_mask(acts, config.high_norm_ratio, valid=~padding)
    for name, given in (("assistant", assistant), ("template", template)):
        if given is not None:
            if given.shape != tokens.shape:
                raise ValueError(f"the {name} mask must have the shape of tokens")
            setattr(masks, name, given.to(tokens.device).bool())
    if masks.assistant is None and chat:
        if tokenizer is None:
            raise ValueError("the assistant mask needs the tokenizer")
        masks.assistant = assistant_mask(tokens, tokenizer, markers=markers)
    return masks
