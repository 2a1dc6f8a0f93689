"""What the learner asks of a model host: the small interface the ComfyUI and diffusers adapters implement.

A host wraps one frozen diffusion model with its text encoder(s) and never learns anything itself.
The learner (:mod:`.learner`) owns seeding, batches, prompts, the loss and the optimiser; a host only

- ``word_embeddings(word) -> {key: [m, D]}``: the input embedding rows of ``word``'s tokens per text
  encoder (inits, the class word of the reference prompt); ``vocabulary_norm() -> {key: float}``: the
  median norm of each text encoder's word embeddings (the norm constraint);
- ``encode(prompt, vectors) -> Encoded``: ``prompt`` with the placeholder word (``prompts.PLACEHOLDER``)
  replaced by ``vectors {key: [k, D]}`` exactly as at generation time; gradients flow into the
  vectors when grad mode is on (the host keeps autograd off every weight);
- ``noise(x0, noise, t) -> Noised``: the noised latents at integer training timesteps ``t [B]`` through
  the model's own sampling (``x_t``, ``sigma [B]``);
- ``denoise(noised, cond, record=False) -> (denoised [B, C, h, w], maps)``: the model's x0 estimate;
  with ``record`` the softmax maps ``[B, heads, HW, T]`` (float32, with gradients) of every
  cross-attention layer with at most ``max_queries`` queries, in a fixed order; the host keeps
  computing attention the same way until its next ``denoise`` (gradient checkpointing recomputes it)
  but appends no maps after ``denoise`` returns;
- ``close()``: undo everything it did to the shared modules (idempotent).

And tells: ``keys`` (the S* part keys, e.g. ``("clip_l", "clip_g")``), ``family``, ``prediction``
("eps" | "v" | "flow", :mod:`.loss`), ``num_timesteps``, ``device``, ``compute_dtype``,
``resolution_multiple`` and ``max_queries`` (settable).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .frozen import copy_saved_activations, non_view
from .prompts import Encoded


@dataclass
class Noised:
    x0: torch.Tensor  # [B, C, h, w] clean latents (the loss needs them)
    x_t: torch.Tensor  # [B, C, h, w]
    sigma: torch.Tensor  # [B]
    t: torch.Tensor  # [B] integer training timesteps (long)


@dataclass
class Conditioning:
    """The text side of one UNet call.

    ``context [B, L, C]`` and ``pooled [B, P]`` (or None) are the prompt as the model reads it. With
    per-stage identities ``keys``/``values`` replace the cross-attention's key and value inputs:
    ``[1, B, L, C]`` = one (already chosen) context per row for every layer, or ``[S, B, L, C]`` = the
    layer picks its stage from its UNet block (``stage_kind="unet"``)."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None


class LearnHost(Protocol):
    family: str
    keys: tuple[str, ...]
    prediction: str
    num_timesteps: int
    device: torch.device
    compute_dtype: torch.dtype
    resolution_multiple: int
    max_queries: int | None

    def word_embeddings(self, word: str) -> dict[str, torch.Tensor]: ...

    def vocabulary_norm(self) -> dict[str, float]: ...

    def encode(self, prompt: str, vectors: dict[str, torch.Tensor]) -> Encoded: ...

    def noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> Noised: ...

    def denoise(self, noised: Noised, cond: Conditioning, record: bool = False
                ) -> tuple[torch.Tensor, list[torch.Tensor]]: ...

    def close(self) -> None: ...


class _Recompute(torch.autograd.Function):
    """``fn(*tensors)`` run without a graph; the backward pass runs it again with one (checkpointing).
    Only the inputs that required grad get one in the backward's recomputation."""

    @staticmethod
    def forward(ctx: Any, fn: Callable[..., tuple[torch.Tensor, ...]], *tensors: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        ctx.fn = fn
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            outs = fn(*tensors)
        # an output the model may add into in place must not be a view made in here (autograd forbids it)
        return tuple(non_view(o) if o._is_view() or any(o is t for t in tensors) else o for o in outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[1:],
                                                                       strict=True)]
        with torch.enable_grad():
            outs = ctx.fn(*inputs)
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, *[i.grad if i.requires_grad else None for i in inputs])


def recomputed(fn: Callable[..., Any], *args: Any, capture: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` (a transformer block) checkpointed: nothing but its tensor inputs is kept for
    backward, which runs it again. Each run gets its own copies of the tensor inputs, and the recomputation
    keeps copies of what it saves, because ComfyUI's DiT blocks add residuals into tensors in place (``txt +=``)
    that would otherwise change the inputs and saved activations under autograd's feet. Returns what ``fn``
    returns (a tensor or a tuple of tensors and Nones: SD3's last block gives no text stream).

    ``capture``: a context-manager factory yielding a list that collects tensors made inside ``fn`` (attention
    maps); they become outputs of the checkpoint too, so gradients reach them through the recomputation, and
    the call returns ``(result, captured)``."""
    slots = [(True, i) for i, a in enumerate(args) if isinstance(a, torch.Tensor)] + \
            [(False, k) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    shape: dict[str, Any] = {}

    def run(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a, k = list(args), dict(kwargs)
        for (positional, key), t in zip(slots, tensors, strict=True):
            if positional:
                a[key] = t.clone()
            else:
                k[key] = t.clone()
        with capture() if capture is not None else contextlib.nullcontext([]) as extra, \
                copy_saved_activations() if torch.is_grad_enabled() else contextlib.nullcontext():
            out = fn(*a, **k)
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        if not shape:
            shape.update(single=isinstance(out, torch.Tensor), n=len(outs), extra=len(extra),
                         nones=[i for i, o in enumerate(outs) if o is None])
        if len(extra) != shape["extra"]:
            raise RuntimeError(f"a recomputed block captured {len(extra)} tensors, its forward {shape['extra']}")
        return tuple(torch.empty(0) if o is None else o for o in outs) + tuple(extra)

    tensors = [args[key] if positional else kwargs[key] for positional, key in slots]
    every = _Recompute.apply(run, *tensors)
    outs, captured = every[:shape["n"]], list(every[shape["n"]:])
    result = outs[0] if shape["single"] else tuple(None if i in shape["nones"] else o for i, o in enumerate(outs))
    return (result, captured) if capture is not None else result


def encode_recomputed(host: LearnHost, prompt: str, vectors: dict[str, torch.Tensor]) -> Encoded:
    """``host.encode`` whose text-encoder activations are not kept for backward: the backward pass encodes
    again. Holds one prompt's activations at a time however many prompts a step encodes."""
    keys = list(vectors)
    seen: dict[str, Encoded] = {}

    def fn(*vecs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc = host.encode(prompt, dict(zip(keys, vecs, strict=True)))
        seen["enc"] = enc
        pooled = enc.pooled if enc.pooled is not None else enc.context.new_zeros(0)
        return enc.context, pooled

    context, pooled = _Recompute.apply(fn, *[vectors[k] for k in keys])
    enc = seen["enc"]
    return Encoded(context, pooled if enc.pooled is not None else None, enc.positions, enc.words)
