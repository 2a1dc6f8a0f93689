"""The training prompts and, for the attention loss, which token of the identity prompt is which
token of the reference prompt.

Each step's prompts come from :data:`TEMPLATES` (textual inversion's "a photo of {}" family, kept
to ones that describe a portrait). The identity prompt has the trigger (k identity rows once
tokenized); the reference prompt has the class word instead ("a photo of person"). Their token
positions differ after the identity, so :func:`template_tokens` pairs every other content word
of the identity prompt with the same word in the reference prompt (BOS, EOS and padding excluded).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..common.prompt_encoding import tokenize_with_trigger

logger = logging.getLogger(__name__)

TEMPLATES = (
    "a photo of {}",
    "a close-up photo of {}",
    "a portrait of {}",
    "a photo of the face of {}",
    "a good photo of {}",
    "a cropped photo of {}",
    "a bright photo of {}",
    "a photo of {} looking at the camera",
)


@dataclass(frozen=True)
class TemplateTokens:
    """One template's prompts and the token bookkeeping the attention loss needs."""

    prompt: str  # with the trigger
    reference: str  # with the class word
    id_positions: tuple[int, ...]
    class_positions: tuple[int, ...]
    pairs: tuple[tuple[int, int], ...]  # (identity-prompt position, reference position) of the other words


def check_templates(templates: Sequence[str]) -> list[str]:
    out = [t for t in templates if t.strip()]
    if not out:
        raise ValueError("no prompt templates given; each template holds '{}' where the identity goes")
    for t in out:
        if t.count("{}") != 1:
            raise ValueError(f"prompt template {t!r} must contain '{{}}' exactly once (where the identity goes), "
                             "e.g. 'a photo of {}'")
    return out


def _content(ids: torch.Tensor, bos: int, eos: int) -> list[int]:
    """Positions of the real words: after BOS, before the first EOS."""
    row = ids.tolist()
    end = row.index(eos, 1) if eos in row[1:] else len(row)
    return [i for i in range(1 if row and row[0] == bos else 0, end)]


def template_tokens(tokenizer, template: str, trigger: str, k: int, class_word: str) -> TemplateTokens:
    prompt, reference = template.format(trigger), template.format(class_word)
    ident = tokenize_with_trigger(tokenizer, [prompt], trigger, k)
    n_class = len(tokenizer(class_word, add_special_tokens=False).input_ids)
    if n_class < 1:
        raise ValueError(f"class word {class_word!r} tokenizes to nothing; use a word such as 'person'")
    ref = tokenize_with_trigger(tokenizer, [reference], class_word, n_class)
    plain = tokenize_with_trigger(tokenizer, [reference], class_word, None, require_trigger=False)
    id_pos, class_pos = tuple(ident.positions[0]), tuple(ref.positions[0])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    mine = [p for p in _content(ident.input_ids[0], bos, eos) if p not in id_pos]
    theirs = [p for p in _content(plain.input_ids[0], bos, eos) if p not in class_pos]
    same = len(mine) == len(theirs) and all(
        int(ident.input_ids[0, p]) == int(plain.input_ids[0, q]) for p, q in zip(mine, theirs, strict=True))
    if not same:
        logger.warning("template %r: the words around the identity tokenize differently with %r and %r; its "
                       "context term is left out", template, trigger, class_word)
    pairs = tuple(zip(mine, theirs, strict=True)) if same else ()
    return TemplateTokens(prompt, reference, id_pos, class_pos, pairs)
