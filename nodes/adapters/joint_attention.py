"""The JOINT attention of a diffusion transformer (FLUX.1, SD3) as identity learning and per-stage identities
need it: explicit maps for the attention loss, and separate key / value text streams.

FLUX.1 and SD3 have no cross-attention: text and image tokens attend together, text first
(``[txt; img]``, FLUX's double and single blocks, SD3's joint blocks). :class:`JointAttention` is set as
ComfyUI's ``optimized_attention_override`` (``transformer_options``, the documented hook every attention
function of ComfyUI honours). It acts on the joint calls, those with ``txt_len + img_len`` tokens and no
mask; every other call (SD3.5's image-only self-attention, another pack's calls) goes to the override that
was there before (``prior``, another pack's) or to ComfyUI's ``func``, as do all the sub-calls below.

**Recording** (``recording``, ``img_len <= max_queries``): the image rows are computed explicitly,
``softmax(q_img k^T / sqrt(d)) v`` over all keys, and the image queries' probabilities on the text keys are
kept, ``[B, heads, img_len, L]`` (float32, with gradients): the layout of a UNet cross-attention map, so the
face-wise attention loss reads them unchanged. The text rows are ComfyUI's own attention.

**Two text streams** (``stream_len = L > 0``, per-stage identities): the model reads the prompt twice,
``[keys' prompt (L); values' prompt (L); img]`` (``txt_len = 2L``), each text stream running through the
blocks as a prompt of its own. In every joint call

- the keys' stream's queries attend to ``[its keys; image keys]`` with ``[its values; image values]``;
- the values' stream's queries the same with its own;
- the image queries attend to the KEYS of the keys' stream and the image, and read the VALUES of the
  values' stream and the image: where the identity acts comes from the stage's key vectors, what it puts
  there from its value vectors, as a UNet's per-stage cross-attention reads ``context_attn2`` /
  ``value_attn2``.

With both prompts equal every row sees exactly the keys and values of the one-stream call, so the output is
the words path's. ``calls`` counts the joint calls served with two streams (a model whose attention never
matched them is an error for the caller to raise, not a silent words path).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch


class JointAttention:
    """``optimized_attention_override`` for joint attention (see the module docstring)."""

    def __init__(self, max_queries: int | None = 1024) -> None:
        self.max_queries = max_queries
        self.recording = False  # compute joint calls explicitly (kept through a checkpoint's recomputation)
        self.collecting = False  # and keep their maps in ``maps``
        self.txt_len = self.img_len = self.stream_len = 0
        self.prior: Callable[..., Any] | None = None
        self.maps: list[torch.Tensor] = []
        self.sink: list[torch.Tensor] | None = None
        self.calls = 0

    def start(self, record: bool, txt_len: int, img_len: int, prior: Callable[..., Any] | None,
              stream_len: int = 0) -> None:
        if stream_len and txt_len != 2 * stream_len:
            raise ValueError(f"two text streams of {stream_len} tokens make {2 * stream_len} text tokens, not {txt_len}")
        self.recording = self.collecting = record
        self.txt_len, self.img_len, self.stream_len, self.prior = txt_len, img_len, stream_len, prior
        self.maps = []
        self.calls = 0

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

    def _joint(self, n: int, kwargs: dict[str, Any]) -> bool:
        return (n == self.txt_len + self.img_len and self.txt_len > 0 and kwargs.get("mask") is None
                and not kwargs.get("skip_output_reshape"))

    def _explicit(self) -> bool:
        return self.recording and (self.max_queries is None or self.img_len <= self.max_queries)

    def __call__(self, func: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        q, k, v = args[:3]
        skip = bool(kwargs.get("skip_reshape"))  # [B, heads, N, d] instead of [B, N, heads * d]
        dim = 2 if skip else 1
        n = q.shape[dim]
        call = functools.partial(self.prior or _plain_call, func)
        if not self._joint(n, kwargs) or not (self.stream_len or self._explicit()):
            return call(*args, **kwargs)

        def rows(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
            return t.narrow(dim, a, b - a)

        def sub(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
            return call(qs, ks, vs, *args[3:], **kwargs)  # [B, rows, heads * d]

        T = self.txt_len
        if self.stream_len:
            L = self.stream_len
            k_img, v_img = rows(k, T, n), rows(v, T, n)
            k_key, v_key = torch.cat([rows(k, 0, L), k_img], dim), torch.cat([rows(v, 0, L), v_img], dim)
            k_val, v_val = torch.cat([rows(k, L, T), k_img], dim), torch.cat([rows(v, L, T), v_img], dim)
            out_txt = torch.cat([sub(rows(q, 0, L), k_key, v_key), sub(rows(q, L, T), k_val, v_val)], dim=1)
            k_i, v_i = k_key, v_val
            self.calls += 1
        else:
            out_txt, k_i, v_i = sub(rows(q, 0, T), k, v), k, v
        q_img = rows(q, T, n)
        if self._explicit():
            heads = args[3] if len(args) > 3 else kwargs["heads"]
            out_img = self._record(q_img, k_i, v_i, heads, skip, out_txt.dtype)
        else:
            out_img = sub(q_img, k_i, v_i)
        return torch.cat([out_txt, out_img], dim=1)

    def _record(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, skip: bool,
                dtype: torch.dtype) -> torch.Tensor:
        """The image rows ``softmax(q k^T / sqrt(d)) v``, keeping the probabilities on the text keys."""
        if skip:  # [B, heads, N, d]
            qh, kh, vh = q, k, v
        else:  # [B, N, heads * d]
            inner = q.shape[-1]
            qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, inner // heads).transpose(1, 2) for t in (q, k, v))
        b, h, m, d = qh.shape
        # kept by reference for backward: nothing here is changed in place (the host copies what the model's
        # own blocks save, because they add in place)
        with torch.autograd.graph.saved_tensors_hooks(_same, _same):
            probs = torch.softmax(qh.float() @ kh.float().transpose(-1, -2) / math.sqrt(d), dim=-1)  # [B, h, m, L+m]
            out = (probs @ vh.float()).transpose(1, 2).reshape(b, m, h * d).to(dtype)
        maps = probs[..., :kh.shape[2] - m]
        if not torch.is_grad_enabled():  # nothing keeps ``probs`` for backward: keep only the text columns
            maps = maps.clone()
        if self.sink is not None:
            self.sink.append(maps)
        elif self.collecting:
            self.maps.append(maps)
        return out


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _plain_call(func: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
    return func(*args, **kwargs)
