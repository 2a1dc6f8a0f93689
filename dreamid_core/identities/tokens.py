"""A prompt with identities in it, as token chunks laid out exactly as ComfyUI lays out ``embedding:NAME``.

Pure functions (no comfy import), shared by the ComfyUI node and by training:

1. The host parses prompt weights into ``segments`` ``[(text, weight)]`` (ComfyUI's own parser in the
   node; ``[(prompt, 1.0)]`` in training).
2. :func:`prompt_groups` finds every trigger in each segment's TEXT (:mod:`dreamid_core.identities.trigger`) and
   cuts the segment there: the text pieces are tokenized by the host's ``tokenize_piece`` (a piece may
   give several groups, e.g. when it holds another ``embedding:``), and each trigger occurrence becomes
   one group of its identity's k items (vectors, or placeholder ids in training), with the segment's
   weight. This is what ComfyUI does with ``embedding:NAME``: the text before, the k embedding rows and
   the text after are separate word groups.
3. :func:`chunk_groups` packs groups into chunks of ``max_length`` (77) items — start, content, end,
   padding — with ComfyUI's rule: a group shorter than ``max_word_length`` (8) that does not fit in the
   current chunk moves whole to the next one; a longer group is split at the chunk boundary.

:func:`tokenize_prompt` runs 2 and 3 and reports where every identity row landed. An identity with k = 0
rows (strength 0) is switched off: its trigger is deleted from the text, so the prompt encodes as if the
trigger had never been written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import TriggerNotFoundError
from .trigger import TriggerMatch, check_trigger, split_on_triggers

logger = logging.getLogger(__name__)

Token = Any  # an int id, or an embedding vector (torch.Tensor [D]) that the text encoder uses as it is
Group = list[tuple[Token, float]]  # one word group: (token, weight) pairs that stay together
TokenizePiece = Callable[[str], list[list[Token]]]  # text piece -> its word groups (tokens only)


@dataclass(frozen=True)
class ChunkLayout:
    """How a tokenizer lays out its chunks (ComfyUI's ``SDTokenizer`` attributes of the same names)."""

    start_token: int | None
    end_token: int | None
    pad_token: int
    max_length: int = 77
    max_word_length: int = 8
    pad_to_max_length: bool = True
    min_length: int | None = None
    min_padding: int | None = None
    pad_left: bool = False


@dataclass
class PromptTokens:
    """Chunks of ``(token, weight)`` (or ``(token, weight, word_id)``) items, each ``max_length`` long when
    the layout pads, and where each identity's rows went: ``positions[trigger]`` lists flat indices
    (``chunk * max_length + i``) occurrence after occurrence, k per occurrence."""

    chunks: list[list[tuple]]
    positions: dict[str, list[int]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def prompt_groups(segments: Sequence[tuple[str, float]], identities: Mapping[str, Sequence[Token]],
                  tokenize_piece: TokenizePiece) -> tuple[list[Group], list[tuple[int, str]], dict[str, int]]:
    """Word groups of a weighted prompt with every trigger replaced by its identity's items.

    Returns ``(groups, slots, counts)``: ``slots`` are ``(group index, trigger)`` of the identity groups,
    ``counts[trigger]`` the occurrences found (also those of a switched-off identity)."""
    identities = {check_trigger(t): list(items) for t, items in identities.items()}
    by_fold = {t.casefold(): t for t in identities}
    if len(by_fold) != len(identities):
        raise TriggerNotFoundError(f"two identities share a trigger word (ignoring case): {sorted(identities)}; "
                                   "give each identity its own trigger, e.g. S1* and S2*")
    groups: list[Group] = []
    slots: list[tuple[int, str]] = []
    counts = {t: 0 for t in identities}

    def add_text(piece: str, weight: float) -> None:
        if piece:
            groups.extend([(tok, weight) for tok in g] for g in tokenize_piece(piece))

    for text, weight in segments:
        pending = ""  # text waiting to be tokenized: pieces around a switched-off trigger are joined
        for part in split_on_triggers(text, list(identities)):
            if isinstance(part, str):
                pending += part
                continue
            assert isinstance(part, TriggerMatch)
            counts[part.trigger] += 1
            items = identities[part.trigger]
            if not items:  # k = 0: the identity is off, the trigger is deleted from the text
                continue
            add_text(pending, weight)
            pending = ""
            slots.append((len(groups), part.trigger))
            groups.append([(item, weight) for item in items])
        add_text(pending, weight)
    return groups, slots, counts


def _pad(batch: list[tuple], amount: int, item: tuple, left: bool) -> None:
    if amount <= 0:
        return
    if left:
        batch[:0] = [item] * amount
    else:
        batch.extend([item] * amount)


def chunk_groups(groups: Sequence[Group], layout: ChunkLayout) -> tuple[list[list[tuple]], list[list[int]]]:
    """Pack word groups into chunks exactly as ComfyUI's ``SDTokenizer.tokenize_with_weights`` does.

    Returns ``(chunks, where)``: items are ``(token, weight, word_id)`` (word id = group index + 1, 0 for
    start/end/padding) and ``where[g]`` the flat indices of group ``g``'s items. Indices count from the
    chunk start as laid out before left padding, which ComfyUI's CLIP tokenizers never use."""
    L = layout
    has_end = 1 if L.end_token is not None else 0
    special = lambda tok: (tok, 1.0, 0)  # noqa: E731
    chunks: list[list[tuple]] = []
    batch: list[tuple] = [special(L.start_token)] if L.start_token is not None else []
    chunks.append(batch)
    where: list[list[int]] = []
    for gi, group in enumerate(groups):
        is_large = len(group) >= L.max_word_length
        rest = list(group)
        positions: list[int] = []
        while rest:
            if len(rest) + len(batch) > L.max_length - has_end:
                remaining = L.max_length - len(batch) - has_end
                if is_large:  # split the group at the boundary
                    positions.extend((len(chunks) - 1) * L.max_length + len(batch) + j for j in range(remaining))
                    batch.extend((t, w, gi + 1) for t, w in rest[:remaining])
                    if L.end_token is not None:
                        batch.append(special(L.end_token))
                    rest = rest[remaining:]
                else:  # close the chunk, the group moves whole to the next one
                    if L.end_token is not None:
                        batch.append(special(L.end_token))
                    if L.pad_to_max_length:
                        _pad(batch, remaining, special(L.pad_token), L.pad_left)
                batch = [special(L.start_token)] if L.start_token is not None else []
                chunks.append(batch)
            else:
                positions.extend((len(chunks) - 1) * L.max_length + len(batch) + j for j in range(len(rest)))
                batch.extend((t, w, gi + 1) for t, w in rest)
                rest = []
        where.append(positions)
    if L.end_token is not None:
        batch.append(special(L.end_token))
    if L.min_padding is not None:
        _pad(batch, L.min_padding, special(L.pad_token), L.pad_left)
    if L.pad_to_max_length and len(batch) < L.max_length:
        _pad(batch, L.max_length - len(batch), special(L.pad_token), L.pad_left)
    if L.min_length is not None and len(batch) < L.min_length:
        _pad(batch, L.min_length - len(batch), special(L.pad_token), L.pad_left)
    return chunks, where


def tokenize_prompt(segments: Sequence[tuple[str, float]], identities: Mapping[str, Sequence[Token]],
                    tokenize_piece: TokenizePiece, layout: ChunkLayout, *, return_word_ids: bool = False,
                    require: bool = True, prompt: str | None = None) -> PromptTokens:
    """:func:`prompt_groups` then :func:`chunk_groups`; raises :class:`TriggerNotFoundError` when
    ``require`` and some trigger does not occur in the prompt."""
    groups, slots, counts = prompt_groups(segments, identities, tokenize_piece)
    missing = [t for t, n in counts.items() if n == 0]
    if require and missing:
        shown = prompt if prompt is not None else "".join(s for s, _ in segments)
        raise TriggerNotFoundError(
            f"the prompt {shown!r} does not contain the trigger word {' / '.join(map(repr, missing))}. Write it "
            f"where the person goes, e.g. 'a photo of {missing[0]} as a chef' ('{missing[0]},' and "
            f"'({missing[0]}:1.2)' work too), or set the trigger input to the word your prompt uses.")
    chunks, where = chunk_groups(groups, layout)
    positions: dict[str, list[int]] = {t: [] for t in identities}
    for gi, trigger in slots:
        positions[trigger].extend(where[gi])
    if not return_word_ids:
        chunks = [[item[:2] for item in chunk] for chunk in chunks]
    return PromptTokens(chunks=chunks, positions=positions, counts=counts)
