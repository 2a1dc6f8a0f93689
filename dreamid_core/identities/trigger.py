"""Finding the trigger word (``S*``) in the prompt TEXT, the way people write it.

CLIP's BPE merges punctuation with the characters around it (``S*`` is ``s</w> *</w>`` but ``S*,`` is
``s</w> *,</w>``), so the trigger is matched in the string, never as a token sequence: a
case-insensitive whole-word match that allows any punctuation, quote, bracket or space on either side
(``S*,`` ``"S*"`` ``S*'s`` ``(S*:1.3)`` ``[S*]``) but not a letter, digit or ``_`` (``S*s``, ``xS*``).
Occurrences inside an ``embedding:NAME`` reference are never matched.

- :func:`check_trigger` validates a trigger word and returns it stripped.
- :func:`find_triggers` returns every occurrence of one or more triggers, longest match first.
- :func:`split_on_triggers` cuts a text into plain pieces and trigger occurrences.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import TriggerNotFoundError

EMBEDDING_PREFIX = "embedding:"
_FORBIDDEN = "()\\:"  # ComfyUI's prompt-weight syntax ``(word:1.2)`` and escapes would cut the trigger apart
_EMBEDDING_REF = re.compile(re.escape(EMBEDDING_PREFIX) + r"\S*", re.IGNORECASE)


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


@dataclass(frozen=True)
class TriggerMatch:
    start: int
    end: int
    trigger: str  # the trigger as configured (not as written: matching ignores case)


def check_trigger(trigger: str) -> str:
    """``trigger`` stripped, or :class:`TriggerNotFoundError` saying what a usable trigger looks like."""
    if not isinstance(trigger, str):
        raise TriggerNotFoundError(f"the trigger word must be text, got {type(trigger).__name__} {trigger!r}")
    word = trigger.strip()
    hint = "Use one word such as 'S*', 'sks', 'ohwx', '<me>' or 'S1*'."
    if not word:
        raise TriggerNotFoundError(f"the trigger word is empty ({trigger!r}). {hint}")
    if any(ch.isspace() for ch in word):
        raise TriggerNotFoundError(f"the trigger word {trigger!r} contains a space; it must be one word. {hint}")
    bad = sorted({ch for ch in word if ch in _FORBIDDEN})
    if bad:
        raise TriggerNotFoundError(
            f"the trigger word {trigger!r} contains {' '.join(bad)}, which ComfyUI's prompt syntax uses for "
            f"weights '(word:1.2)' and escapes. {hint}")
    if not any(_is_word_char(ch) for ch in word):
        raise TriggerNotFoundError(f"the trigger word {trigger!r} has no letter or digit. {hint}")
    return word


def _embedding_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _EMBEDDING_REF.finditer(text)]


def find_triggers(text: str, triggers: Sequence[str]) -> list[TriggerMatch]:
    """Every non-overlapping occurrence of any of ``triggers`` in ``text``, left to right.

    Where two triggers could match at one place the longer wins (``S1*`` over ``S1``)."""
    words = sorted({check_trigger(t) for t in triggers}, key=len, reverse=True)
    if not words:
        return []
    by_fold = {w.casefold(): w for w in words}
    pattern = re.compile("|".join(re.escape(w) for w in words), re.IGNORECASE)
    refs = _embedding_spans(text)
    found: list[TriggerMatch] = []
    pos = 0
    while pos <= len(text):
        m = pattern.search(text, pos)
        if m is None:
            break
        s, e = m.span()
        # a letter, digit or _ next to it makes it part of another word ("S*s", "xS*", "sksx")
        before_ok = s == 0 or not _is_word_char(text[s - 1])
        after_ok = e == len(text) or not _is_word_char(text[e])
        inside_ref = any(a <= s < b for a, b in refs)
        if before_ok and after_ok and not inside_ref:
            found.append(TriggerMatch(s, e, by_fold.get(m.group().casefold(), m.group())))
            pos = e
        else:
            pos = s + 1
    return found


def split_on_triggers(text: str, triggers: Sequence[str]) -> list[str | TriggerMatch]:
    """``text`` as plain pieces (str) and trigger occurrences (:class:`TriggerMatch`), in order.

    Empty pieces are left out; joining the pieces with the matched text gives ``text`` back."""
    out: list[str | TriggerMatch] = []
    pos = 0
    for m in find_triggers(text, triggers):
        if m.start > pos:
            out.append(text[pos:m.start])
        out.append(m)
        pos = m.end
    if pos < len(text):
        out.append(text[pos:])
    return out
