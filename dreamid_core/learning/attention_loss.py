"""The face-wise attention loss of Beyond Inserting, on attention PROBABILITIES (tensors, no modules).

API
- ``attention_probs(q, k, heads) -> [B, heads, Nq, Nk]``: ``softmax(q k^T / sqrt(d))`` in float32 from
  projected ``q [B, Nq, heads*d]``, ``k [B, Nk, heads*d]``; ``attention_output(probs, v, heads) ->
  [B, Nq, heads*d]`` (``probs @ v``, heads merged, in ``v``'s dtype). An attention patch that records
  maps computes the output with these two (so the maps it records are the ones the model used).
- ``resize_mask(mask [B, H, W], hw) -> [B, hw]``: a latent-resolution mask averaged down to the grid of
  an attention layer with ``hw`` queries (H/2^l x W/2^l, ceil-rounded like the UNet's downsampling).
- ``token_distribution(maps [B, heads, HW, T]) -> [B, HW, T]``: each token's attention averaged over
  heads and normalised over the image, i.e. WHERE the token acts (sums to 1 over HW).
- ``face_mass(maps, positions, mask [B, HW]) -> [B]``: share of the identity tokens' attention inside
  the mask, ``mean_i sum_hw M * a_i``; the test/evaluation metric.
- ``face_attention_loss(maps, ref_maps, mask, id_positions, class_positions, pairs, *, context_weight=1,
  class_weight=1, face_weight=1) -> (loss, parts)``; the caller multiplies by ``attn_weight``
  (0.003 by default, the authors' best).

The formula (a = token_distribution(maps) with the identity prompt, r = the same for the reference
prompt with the class word instead of the identity, computed without gradient; M the soft face mask
at the layer's grid; TV(p, q) = 1/2 sum_hw |p - q| in [0, 1]):

    L_context = mean over (p, q) in pairs      TV(a_p, r_q)          every other word keeps its map
    L_class   = mean over i in id_positions    TV(a_i, r_class)      identity acts where "person" would
    L_face    = mean over i in id_positions    1 - sum_hw M * a_i    and inside the face
    L         = context_weight * L_context + class_weight * L_class + face_weight * L_face

``pairs`` maps each non-identity content token of the identity prompt to the same word in the
reference prompt (their positions differ once k identity rows replace one class word); ``r_class`` is
the mean distribution of the class word's tokens. All terms are per batch item, then averaged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d))`` per head, float32: ``[B, heads, Nq, Nk]``."""
    b, nq, inner = q.shape
    if inner % heads:
        raise ValueError(f"query width {inner} is not divisible by {heads} heads")
    d = inner // heads
    qh = q.float().reshape(b, nq, heads, d).transpose(1, 2)  # [B, heads, Nq, d]
    kh = k.float().reshape(k.shape[0], k.shape[1], heads, d).transpose(1, 2)  # [B, heads, Nk, d]
    return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)


def attention_output(probs: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """``probs [B, heads, Nq, Nk] @ v [B, Nk, heads*d]`` -> ``[B, Nq, heads*d]`` in ``v``'s dtype."""
    b, nk, inner = v.shape
    vh = v.float().reshape(b, nk, heads, inner // heads).transpose(1, 2)  # [B, heads, Nk, d]
    out = probs @ vh  # [B, heads, Nq, d]
    return out.transpose(1, 2).reshape(b, probs.shape[2], inner).to(v.dtype)


def _layer_grid(h: int, w: int, hw: int) -> tuple[int, int]:
    for level in range(8):
        f = 2 ** level
        gh, gw = -(-h // f), -(-w // f)
        if gh * gw == hw:
            return gh, gw
    raise ValueError(f"an attention layer with {hw} queries does not match a {h}x{w} latent at any level")


def resize_mask(mask: torch.Tensor, hw: int) -> torch.Tensor:
    """``[B, H, W]`` -> ``[B, hw]`` (area average onto the layer's grid)."""
    b, h, w = mask.shape
    gh, gw = _layer_grid(h, w, hw)
    if (gh, gw) == (h, w):
        return mask.reshape(b, hw)
    return F.adaptive_avg_pool2d(mask[:, None].float(), (gh, gw)).reshape(b, hw)


def token_distribution(maps: torch.Tensor) -> torch.Tensor:
    """``[B, heads, HW, T]`` -> ``[B, HW, T]``: head mean, normalised over HW."""
    a = maps.float().mean(dim=1)  # [B, HW, T]
    return a / a.sum(dim=1, keepdim=True).clamp_min(1e-12)


def _tv(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return 0.5 * (p - q).abs().sum(dim=1)  # over HW -> [B, ...]


def face_mass(maps: torch.Tensor, positions: Sequence[int], mask: torch.Tensor) -> torch.Tensor:
    """Share of the attention of the tokens at ``positions`` that falls inside ``mask [B, HW]``: ``[B]``."""
    if not positions:
        raise ValueError("face_mass needs at least one identity token position")
    a = token_distribution(maps)[:, :, list(positions)]  # [B, HW, n]
    return (a * mask.to(a)[:, :, None]).sum(dim=1).mean(dim=1)


def face_attention_loss(maps: torch.Tensor, ref_maps: torch.Tensor, mask: torch.Tensor,
                        id_positions: Sequence[int], class_positions: Sequence[int],
                        pairs: Sequence[tuple[int, int]], *, context_weight: float = 1.0,
                        class_weight: float = 1.0, face_weight: float = 1.0,
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The attention loss of one layer (formula in the module docstring); ``(loss, {"context", "class",
    "face"})``. ``maps``/``ref_maps`` ``[B, heads, HW, T]`` / ``[B, heads, HW, T_ref]``, ``mask [B, HW]``."""
    if maps.shape[:3] != ref_maps.shape[:3]:
        raise ValueError(f"maps {tuple(maps.shape)} and reference maps {tuple(ref_maps.shape)} differ in B/heads/HW")
    if mask.shape != (maps.shape[0], maps.shape[2]):
        raise ValueError(f"mask {tuple(mask.shape)} must be [B, HW] = {(maps.shape[0], maps.shape[2])}")
    if not id_positions or not class_positions:
        raise ValueError("the attention loss needs identity token positions and class word positions")
    a = token_distribution(maps)  # [B, HW, T]
    with torch.no_grad():
        r = token_distribution(ref_maps.detach())  # [B, HW, T_ref]
    ids = list(id_positions)
    a_id = a[:, :, ids]  # [B, HW, n_id]
    r_class = r[:, :, list(class_positions)].mean(dim=2, keepdim=True)  # [B, HW, 1]
    zero = maps.new_zeros((), dtype=torch.float32)
    if pairs:
        p_idx, q_idx = zip(*pairs, strict=True)
        context = _tv(a[:, :, list(p_idx)], r[:, :, list(q_idx)]).mean()
    else:
        context = zero
    cls = _tv(a_id, r_class.expand_as(a_id)).mean()
    face = (1.0 - (a_id * mask.to(a_id)[:, :, None]).sum(dim=1)).mean()
    loss = context_weight * context + class_weight * cls + face_weight * face
    return loss, {"context": context.detach(), "class": cls.detach(), "face": face.detach()}
