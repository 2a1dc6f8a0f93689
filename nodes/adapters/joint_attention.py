"""The attention maps of a diffusion transformer's JOINT attention (FLUX.1, SD3), for identity learning.

FLUX.1 and SD3 have no cross-attention: text and image tokens attend together, text first
(``[txt; img]``, FLUX's double and single blocks, SD3's joint blocks). :class:`JointAttentionRecorder` is
set as ComfyUI's ``optimized_attention_override`` (``transformer_options``, the documented hook every
attention function of ComfyUI honours) while the learner records. For a joint call with ``txt_len`` text
and ``img_len`` image tokens (``img_len <= max_queries``, no mask) it computes

- the text rows with ComfyUI's own attention function (``func``), unchanged;
- the image rows explicitly: ``softmax(q_img k^T / sqrt(d)) v`` over ALL keys, and keeps the image
  queries' probabilities on the text keys, ``[B, heads, img_len, txt_len]`` (float32, with gradients):
  the same layout as a UNet cross-attention map, so the face-wise attention loss reads them unchanged
  (it normalises each token's map over the image, so a token's map says where it acts).

Every other call goes to the override that was there before (another pack's), or to ``func``. While
``sink`` is a list, maps go there instead of ``maps`` (a checkpointed block returns its own maps, see
``dreamid_core.learning.host.recomputed``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch


class JointAttentionRecorder:
    """``optimized_attention_override`` that records joint-attention maps (see the module docstring)."""

    def __init__(self, max_queries: int | None = 1024) -> None:
        self.max_queries = max_queries
        self.recording = False  # compute joint calls explicitly (kept through a checkpoint's recomputation)
        self.collecting = False  # and keep their maps in ``maps``
        self.txt_len = self.img_len = 0
        self.prior: Callable[..., Any] | None = None
        self.maps: list[torch.Tensor] = []
        self.sink: list[torch.Tensor] | None = None

    def start(self, record: bool, txt_len: int, img_len: int, prior: Callable[..., Any] | None) -> None:
        self.recording = self.collecting = record
        self.txt_len, self.img_len, self.prior = txt_len, img_len, prior
        self.maps = []

    def take(self) -> list[torch.Tensor]:
        maps, self.maps = self.maps, []
        return maps

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[torch.Tensor]]:
        """Maps recorded inside go to the yielded list (one checkpointed block's)."""
        before, self.sink = self.sink, []
        try:
            yield self.sink
        finally:
            self.sink = before

    def _records(self, n: int, kwargs: dict[str, Any]) -> bool:
        return (self.recording and n == self.txt_len + self.img_len and self.txt_len > 0
                and kwargs.get("mask") is None and not kwargs.get("skip_output_reshape")
                and (self.max_queries is None or self.img_len <= self.max_queries))

    def __call__(self, func: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        q, k, v = args[:3]
        skip = bool(kwargs.get("skip_reshape"))
        n = q.shape[2] if skip else q.shape[1]
        if not self._records(n, kwargs):
            return (self.prior or _plain_call)(func, *args, **kwargs)
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        L = self.txt_len
        q_txt = q[:, :, :L] if skip else q[:, :L]
        out_txt = func(q_txt, k, v, *args[3:], **kwargs)  # [B, L, heads * d], ComfyUI's own attention
        if skip:  # [B, heads, N, d]
            qh, kh, vh = q, k, v
        else:  # [B, N, heads * d]
            b, _, inner = q.shape
            qh, kh, vh = (t.reshape(b, t.shape[1], heads, inner // heads).transpose(1, 2) for t in (q, k, v))
        b, h, _, d = qh.shape
        # kept by reference for backward: nothing here is changed in place (the host copies what the model's
        # own blocks save, because they add in place)
        with torch.autograd.graph.saved_tensors_hooks(_same, _same):
            logits = qh[:, :, L:].float() @ kh.float().transpose(-1, -2) / math.sqrt(d)  # [B, heads, img, N]
            probs = torch.softmax(logits, dim=-1)
            out_img = (probs @ vh.float()).transpose(1, 2).reshape(b, n - L, h * d).to(out_txt.dtype)
        maps = probs[..., :L]
        if not torch.is_grad_enabled():  # nothing keeps ``probs`` for backward: keep only the text columns
            maps = maps.clone()
        if self.sink is not None:
            self.sink.append(maps)
        elif self.collecting:
            self.maps.append(maps)
        return torch.cat([out_txt, out_img], dim=1)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _plain_call(func: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
    return func(*args, **kwargs)
