"""Choosing the edit triplets to train on: combine the two scores, keep the top fraction per template.

The paper keeps, "for every prompt", the top 25 % of (source face, prompt with S*, edited image)
triplets "ranked by identity similarity and CLIP score" without saying how the two combine. The
two scores live on different scales (identity cosine ~0-0.8, raw CLIP cosine ~0.2-0.35) and the
CLIP score's level differs between templates, so both combinations offered are computed WITHIN
one template's items:

- ``"rank"`` (default): each score becomes its percentile rank among the template's scored items
  (0 = worst, 1 = best; ties share their average rank), then
  ``combined = id_weight * rank(id) + (1 - id_weight) * rank(clip)``. Robust to outliers and scale.
- ``"zscore"``: ``combined = id_weight * z(id) + (1 - id_weight) * z(clip)`` with z the score minus the
  template's mean over its standard deviation (0 when all scores are equal). Keeps margins.

How many: ``ceil(keep_fraction * n_template)`` where ``n_template`` counts ALL of the template's
items, faceless and unreadable ones included (they rank below every scored item: an edit that lost
the face is a failed edit), capped at the number of scored items. With few items ceil keeps at
least one per template; at the paper's scale ceil and floor differ by at most one item.
Ties in ``combined`` are broken by the item key, so selection is deterministic.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from dreamid_core.errors import ConfigError

COMBINE_METHODS = ("rank", "zscore")


def _percentile_ranks(values: Sequence[float]) -> list[float]:
    n = len(values)
    if n == 1:
        return [1.0]
    order = sorted(range(n), key=lambda i: values[i])
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and values[order[j + 1]] == values[order[i]]:
            j += 1
        avg = (i + j) / 2.0
        for t in range(i, j + 1):
            ranks[order[t]] = avg / (n - 1)
        i = j + 1
    return ranks


def _zscores(values: Sequence[float]) -> list[float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return [0.0 if std < 1e-12 else (v - mean) / std for v in values]


def combine_scores(id_scores: Sequence[float], clip_scores: Sequence[float], method: str = "rank",
                   id_weight: float = 0.5) -> list[float]:
    """The combined score of each item of ONE template (see the module doc)."""
    if method not in COMBINE_METHODS:
        raise ConfigError(f"score combination must be one of {COMBINE_METHODS}, got {method!r}")
    if not 0.0 <= id_weight <= 1.0:
        raise ConfigError(f"id_weight must be in 0..1 (the identity score's share), got {id_weight}")
    if len(id_scores) != len(clip_scores):
        raise ValueError(f"{len(id_scores)} identity scores but {len(clip_scores)} CLIP scores")
    if not id_scores:
        return []
    norm = _percentile_ranks if method == "rank" else _zscores
    a, b = norm(id_scores), norm(clip_scores)
    return [id_weight * x + (1.0 - id_weight) * y for x, y in zip(a, b, strict=True)]


def keep_count(n_total: int, n_scored: int, keep_fraction: float) -> int:
    """``min(n_scored, ceil(keep_fraction * n_total))`` (a 1e-9 guard keeps 0.1 * 30 at 3)."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ConfigError(f"--keep-fraction must be in (0, 1], got {keep_fraction}")
    return min(n_scored, math.ceil(keep_fraction * n_total - 1e-9))


def select_top(items: list[dict[str, Any]], *, keep_fraction: float = 0.25, method: str = "rank",
               id_weight: float = 0.5) -> list[dict[str, Any]]:
    """Mark every item ``kept`` True/False, per ``template``, and add its ``combined`` score (None
    when it could not be scored). Items need ``key``, ``template``, ``id_score``, ``clip_score``
    (None = missing). Returns the same dicts, in their input order."""
    by_template: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in items:
        by_template[item["template"]].append(item)
    for group in by_template.values():
        scored = [it for it in group if it.get("id_score") is not None and it.get("clip_score") is not None]
        combined = combine_scores([it["id_score"] for it in scored], [it["clip_score"] for it in scored],
                                  method, id_weight)
        for it in group:
            it["combined"] = None
            it["kept"] = False
        order = sorted(range(len(scored)), key=lambda i: (-combined[i], scored[i]["key"]))
        for i, c in enumerate(combined):
            scored[i]["combined"] = round(c, 6)
        for i in order[:keep_count(len(group), len(scored), keep_fraction)]:
            scored[i]["kept"] = True
    return items
