"""Where a learned identity starts: a word's embedding, the encoder's S*, or an identity (file or node).

API
- ``from_word_rows(rows, k) -> {key: [k, D]}``: the init from a word whose tokens have the embedding
  rows ``rows[key] [m, D]``: the word's own rows when it has exactly k tokens, else the mean of its
  rows, k times (one rule for both hosts: a 1-token word like "person" gives k copies of itself; a
  word of another length keeps its meaning as one averaged vector instead of being cut or repeated).
- ``start_tensors(layout, tensors, *, k, num_stages) -> {key: [k, D] | [S, 2, k, D]}``: start
  tensors for ``layout`` from words ``[k, D]`` or per-stage ``[S, 2, k, D]`` tensors (words -> every
  stage's key and value; per-stage -> the same per-stage tensors; per-stage -> words is refused).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


def from_word_rows(rows: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, r in rows.items():
        if r.ndim != 2 or r.shape[0] < 1:
            raise ValueError(f"word embedding rows for {key} must be [m >= 1, D], got {tuple(r.shape)}")
        r = r.detach().to("cpu", torch.float32)
        out[key] = r.clone() if r.shape[0] == k else r.mean(0, keepdim=True).repeat(k, 1)
    return out


def start_tensors(layout: str, tensors: dict[str, torch.Tensor], *, k: int, num_stages: int) -> dict[str, torch.Tensor]:
    """Start tensors for ``layout`` (see the module docstring)."""
    first = next(iter(tensors.values()))
    if first.shape[-2] != k:
        raise ConfigError(f"the start holds {first.shape[-2]} token(s) per identity but num_tokens is {k}; match "
                          "them (an encoder or an identity brings its own k)")
    if first.ndim == 2:
        if layout == "words":
            return {key: t.detach().float().clone() for key, t in tensors.items()}
        return {key: t.detach().float()[None, None].expand(num_stages, 2, -1, -1).clone() for key, t in tensors.items()}
    if first.ndim != 4 or first.shape[1] != 2:
        raise ConfigError(f"start tensors must be [k, D] (words) or [S, 2, k, D] (per_stage), got {tuple(first.shape)}")
    if layout == "words":
        raise ConfigError("a per_stage identity cannot start a words identity (it has no single S*); learn with "
                          "layout per_stage or start from a word or a words identity")
    if first.shape[0] != num_stages:
        raise ConfigError(f"the start identity has {first.shape[0]} stages but num_stages is {num_stages}; match them")
    return {key: t.detach().float().clone() for key, t in tensors.items()}
