"""Token splicing: put the k vectors of S* where the trigger word's tokens are.

Pure functions over ComfyUI's token layout (no comfy import): a prompt is a list of chunks, each
exactly ``chunk_len`` (77 for CLIP) items ``(token, weight)`` or ``(token, weight, word_id)``,
laid out as ``start, content (<= 75), end, pad...``. A token is an int id or an embedding vector.

Every occurrence of the trigger's id sequence is replaced by k vectors that keep the trigger's
weight. Chunks keep their original boundaries; a chunk that grows past 75 content items spills
into a new chunk after it (an S* group is never split), and an occurrence that straddles a
boundary moves whole into the later chunk. With k vectors equal to the trigger's own word
embeddings (k = its token count), the result encodes exactly like the plain prompt.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch

from .errors import TriggerNotFoundError

Item = tuple  # (token, weight) or (token, weight, word_id)


def _is_id(token: Any, value: int | None) -> bool:
    return value is not None and isinstance(token, numbers.Integral) and int(token) == value


def _content_bounds(chunk: Sequence[Item], start_token: int | None, end_token: int | None) -> tuple[int, int]:
    first = 1 if chunk and _is_id(chunk[0][0], start_token) else 0
    for i in range(first, len(chunk)):
        if _is_id(chunk[i][0], end_token):
            return first, i
    return first, len(chunk)


def chunk_contents(chunks: Sequence[Sequence[Item]], start_token: int | None,
                   end_token: int | None) -> list[list[Item]]:
    """The content items of each chunk (no start, end or padding)."""
    out = []
    for chunk in chunks:
        a, b = _content_bounds(chunk, start_token, end_token)
        out.append(list(chunk[a:b]))
    return out


def trigger_ids_from_chunks(chunks: Sequence[Sequence[Item]], start_token: int | None, end_token: int | None,
                            trigger: str = "") -> list[int]:
    """Token ids of a trigger word tokenized on its own (its content tokens)."""
    ids = [int(it[0]) for c in chunk_contents(chunks, start_token, end_token) for it in c
           if isinstance(it[0], numbers.Integral)]
    if not ids:
        raise TriggerNotFoundError(f"the trigger word {trigger!r} gives no tokens; choose a word such as 'S*' or "
                                   "'sks' (letters, not only spaces or punctuation the tokenizer drops)")
    return ids


def find_occurrences(ids: Sequence[Any], trigger_ids: Sequence[int]) -> list[int]:
    """Start indices of non-overlapping occurrences of ``trigger_ids`` in ``ids`` (non-ints never match)."""
    n = len(trigger_ids)
    if n == 0:
        raise ValueError("trigger_ids is empty")
    found, i = [], 0
    while i + n <= len(ids):
        if all(_is_id(ids[i + j], trigger_ids[j]) for j in range(n)):
            found.append(i)
            i += n
        else:
            i += 1
    return found


def splice_ids(ids: Sequence[int], trigger_ids: Sequence[int], k: int,
               placeholder: int = -1) -> tuple[list[int], list[int]]:
    """Replace each trigger occurrence in a flat id list with ``k`` placeholders.

    Returns the new ids and the placeholder positions (occurrence-major: occurrence 0's k
    positions, then occurrence 1's...). Used by training, where sequences are not chunked.
    """
    starts = find_occurrences(ids, trigger_ids)
    out: list[int] = []
    positions: list[int] = []
    i = 0
    for s in starts:
        out.extend(ids[i:s])
        positions.extend(range(len(out), len(out) + k))
        out.extend([placeholder] * k)
        i = s + len(trigger_ids)
    out.extend(ids[i:])
    return out, positions


def splice_chunks(chunks: Sequence[Sequence[Item]], trigger_ids: Sequence[int], vectors: torch.Tensor, *,
                  start_token: int | None, end_token: int | None, pad_token: int,
                  chunk_len: int | None = None, prompt: str = "") -> tuple[list[list[Item]], int]:
    """Replace every trigger occurrence with the rows of ``vectors`` ``[k, D]``.

    Returns the new chunks (each ``chunk_len`` long) and the number of occurrences replaced.
    Raises :class:`TriggerNotFoundError` when there is none.
    """
    if not chunks:
        raise ValueError("no token chunks given")
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"vectors must be [k, D] with k >= 1, got {tuple(vectors.shape)}")
    chunk_len = chunk_len or len(chunks[0])
    with_ids = len(chunks[0][0]) >= 3
    specials = int(start_token is not None) + int(end_token is not None)
    capacity = chunk_len - specials
    if vectors.shape[0] > capacity:
        raise ValueError(f"k = {vectors.shape[0]} vectors do not fit in one {chunk_len}-token chunk")
    rows = [v for v in vectors.detach().to("cpu", torch.float32)]

    contents = chunk_contents(chunks, start_token, end_token)
    flat = [(ci, item) for ci, c in enumerate(contents) for item in c]  # (chunk index, item)
    starts = set(find_occurrences([item[0] for _, item in flat], trigger_ids))
    # new contents as lists of "units"; a unit is a list of items that must stay in one chunk
    units: list[list[list[Item]]] = [[] for _ in contents]
    i = 0
    while i < len(flat):
        if i in starts:
            last_chunk = flat[i + len(trigger_ids) - 1][0]
            first = flat[i][1]
            weight = first[1]
            extra = tuple(first[2:3]) if with_ids else ()
            units[last_chunk].append([(row, weight, *extra) for row in rows])
            i += len(trigger_ids)
        else:
            ci, item = flat[i]
            units[ci].append([item])
            i += 1
    if not starts:
        shown = f" {prompt!r}" if prompt else ""
        raise TriggerNotFoundError(
            f"the prompt{shown} does not contain the trigger word (token ids {list(trigger_ids)}). Write the "
            "trigger where the identity goes, e.g. 'a photo of S* as a chef', or set the trigger input to the "
            "word your prompt uses.")

    def finish(content: list[Item]) -> list[Item]:
        tail = (1.0, 0) if with_ids else (1.0,)
        out: list[Item] = [(start_token, *tail)] if start_token is not None else []
        out.extend(content)
        if end_token is not None:
            out.append((end_token, *tail))
        out.extend([(pad_token, *tail)] * (chunk_len - len(out)))
        return out

    new_chunks: list[list[Item]] = []
    for ci, chunk_units in enumerate(units):
        if not chunk_units and contents[ci]:
            continue  # its only content was the start of an occurrence that moved to the next chunk
        current: list[Item] = []
        for unit in chunk_units:
            if len(current) + len(unit) > capacity:
                new_chunks.append(finish(current))
                current = []
            current.extend(unit)
        new_chunks.append(finish(current))
    return new_chunks, len(starts)
