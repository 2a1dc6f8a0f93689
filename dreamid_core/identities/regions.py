"""Identity regions: each identity's tokens act only inside its own region of the canvas.

Faces blend when two people share a prompt because every pixel's cross-attention reads every
identity token. Here the cross-attention logits of identity i's token positions get ``log(m_i)``
added at each query pixel, ``m_i`` being its region mask resized to that layer's grid: inside the
region nothing changes, at soft edges the attention is scaled by the mask, and outside it is scaled
by ``floor`` (1e-6: effectively zero). All other tokens (the scene, the style) stay global, so the
image is still one coherent scene from one forward pass — unlike conditioning areas, which denoise
each region with a prompt of its own and average the results.

- :func:`mask_on_grid` resizes a region mask to a layer's query grid (area average).
- :func:`region_bias` builds the additive logit bias ``[h*w, L]`` for a context of length ``L``.
- :func:`biased_attention` / :func:`attention_probs` compute cross-attention with that bias (the
  output, and the probabilities the tests measure), on ComfyUI's ``[B, N, heads*d]`` layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from ..errors import DreamIDError

FLOOR = 1e-6


class RegionError(DreamIDError, ValueError):
    """A region mask that cannot be used with this image (empty, wrong shape or aspect)."""


def check_region_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """A ComfyUI MASK (``[H, W]`` or ``[1, H, W]``) as float ``[H, W]`` in 0..1, or a clear error."""
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise RegionError(f"{name} must be one mask [H, W] (a MASK of batch 1), got shape {tuple(mask.shape)}")
    mask = mask.detach().float().clamp(0, 1)
    if not torch.isfinite(mask).all() or float(mask.max()) <= 0:
        raise RegionError(f"{name} ({mask.shape[1]}x{mask.shape[0]}) is empty: paint the region where this person "
                          "goes (white = inside), or leave the mask input unconnected to let the identity act "
                          "everywhere.")
    return mask


def check_aspect(mask: torch.Tensor, grid: tuple[int, int], name: str = "mask", tol: float = 0.02) -> None:
    """The mask must cover the image: same aspect ratio as the latent grid ``(h, w)``."""
    mh, mw = mask.shape[-2:]
    h, w = grid
    if abs(math.log((mw / mh) / (w / h))) > tol:
        raise RegionError(f"{name} is {mw}x{mh} but the image being generated is {w * 8}x{h * 8} (latent {w}x{h}): "
                          "the region mask must have the image's aspect ratio. Make the mask at the image size "
                          "(e.g. from DreamID_ScenePosition's head_masks, or a SolidMask of that size).")


def mask_on_grid(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[H, W]`` mask -> ``[h*w]`` fraction of each grid cell inside the region."""
    small = F.adaptive_avg_pool2d(mask[None, None].float(), grid)  # [1, 1, h, w]
    return rearrange(small, "1 1 h w -> (h w)")


def region_bias(masks: Sequence[torch.Tensor], positions: Sequence[Sequence[int]], context_len: int,
                grid: tuple[int, int], floor: float = FLOOR) -> torch.Tensor:
    """Additive cross-attention bias ``[h*w, context_len]``: ``log(max(m_i, floor))`` on identity i's
    token positions, 0 elsewhere. ``positions[i]`` index into the context (positions past
    ``context_len`` are an error: the context was not made from this prompt)."""
    if len(masks) != len(positions):
        raise ValueError(f"{len(masks)} masks for {len(positions)} identities")
    bias = torch.zeros(grid[0] * grid[1], context_len)
    for mask, pos in zip(masks, positions, strict=True):
        if not pos:
            continue
        if max(pos) >= context_len:
            raise RegionError(f"identity token position {max(pos)} is past the context length {context_len}: the "
                              "conditioning was not made from this prompt")
        m = mask_on_grid(mask, grid).clamp_min(floor).log()  # [h*w]
        bias[:, list(pos)] = m[:, None]
    return bias


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return rearrange(t, "b n (h d) -> b h n d", h=heads)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias)`` in fp32: ``[B, heads, N_q, N_k]`` (q, k: ``[B, N, heads*d]``)."""
    qh, kh = _heads(q.float(), heads), _heads(k.float(), heads)
    logits = torch.einsum("bhid,bhjd->bhij", qh, kh) * qh.shape[-1] ** -0.5
    if bias is not None:
        logits = logits + bias.to(logits.device)[:, None] if bias.ndim == 3 else logits + bias.to(logits.device)
    return logits.softmax(-1)


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                     bias: torch.Tensor) -> torch.Tensor:
    """Cross-attention output ``[B, N_q, heads*d]`` with an additive ``bias`` (``[N_q, N_k]`` or
    ``[B, N_q, N_k]``), computed in fp32 and returned in q's dtype."""
    qh, kh, vh = (_heads(t.float(), heads) for t in (q, k, v))
    b = bias.to(qh.device, torch.float32)
    b = b[:, None] if b.ndim == 3 else b[None, None]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=b)
    return rearrange(out, "b h n d -> b n (h d)").to(q.dtype)
