"""The training prompts, and which word of an identity prompt is which word of its reference prompt.

API
- ``TEMPLATES``: textual inversion's "a photo of {}" family, kept to prompts that describe a portrait;
  ``{}`` is where the identity (or, in the reference prompt, the class word) goes.
- ``PLACEHOLDER = "S*"``: the word the learner writes for the identity in a template (hosts splice the
  identity's vectors where it stands, exactly as at generation time).
- ``check_templates(templates) -> list[str]``: each non-empty template holds ``{}`` once.
- ``Encoded``: what a host returns for one encoded prompt: ``context [1, L, C]``, ``pooled [1, P]`` or
  None, ``positions`` (the context rows of the spliced vectors) and ``words`` (``(position, token id)`` of
  every other content token: after the start token, before the first end token).
- ``pair_words(prompt, reference) -> tuple[(p, q), ...]``: the other words of an identity prompt
  paired with the same words of its reference prompt, for the attention loss's context term. The rule:
  both prompts' other words, read in order, must be the same token ids; then the i-th is paired with
  the i-th. When they differ (a template whose words tokenize differently next to the identity than
  next to the class word) there are no pairs and the context term is left out for that template
  (logged once), rather than pairing unrelated words.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

PLACEHOLDER = "S*"

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


def check_templates(templates: Sequence[str]) -> list[str]:
    out = [t for t in templates if isinstance(t, str) and t.strip()]
    if not out:
        raise ValueError("no prompt templates given; each template holds '{}' where the identity goes")
    for t in out:
        if t.count("{}") != 1:
            raise ValueError(f"prompt template {t!r} must contain '{{}}' exactly once (where the identity goes), "
                             "e.g. 'a photo of {}'")
    return out


@dataclass
class Encoded:
    """One encoded prompt (see the module docstring)."""

    context: torch.Tensor  # [1, L, C]
    pooled: torch.Tensor | None  # [1, P]
    positions: tuple[int, ...]
    words: tuple[tuple[int, int], ...]


_warned: set[str] = set()


def pair_words(prompt: Encoded, reference: Encoded, template: str = "") -> tuple[tuple[int, int], ...]:
    """Same-word position pairs of an identity prompt and its reference (see the module docstring)."""
    mine, theirs = [t for _, t in prompt.words], [t for _, t in reference.words]
    if mine != theirs:
        if template not in _warned:
            _warned.add(template)
            logger.warning("template %r: the words around the identity tokenize differently than around the class "
                           "word; its context term is left out", template)
        return ()
    return tuple((p, q) for (p, _), (q, _) in zip(prompt.words, reference.words, strict=True))
