"""Autograd through frozen weights without a gradient for them, a copy of them, or keeping them.

API
- ``frozen_alias(t) -> Tensor``: a normal (non-inference) tensor on ``t``'s very storage, no copy, that
  does not require grad. ComfyUI runs a prompt under ``torch.inference_mode()``, so a checkpoint's
  weights are inference tensors that autograd refuses to save for backward; an alias can be saved, and
  a weight that does not require grad gets no gradient computed. When an alias cannot be made (a
  tensor subclass, a storage that refuses it) it is a copy, made once (``FrozenWeights`` counts them).
- ``FrozenWeights(modules)``: a context manager that puts such aliases in place of every parameter and
  buffer of ``modules`` that is an inference tensor or requires grad, for its duration, and puts the
  originals back on exit (the same objects; a slot that someone else replaced meanwhile is left to
  them). ``copied_bytes`` says what the fallback copied (0 when every alias was free).
- ``input_grad_only(x, forward, weight, kind)``: a layer's output whose backward computes only the
  input's gradient, with the weight fetched again by ``weight()`` in the backward pass: nothing of the
  weight, and not the input either, is kept between the passes. For offloaded weights (streamed to
  the device layer by layer): autograd would otherwise keep every streamed copy until backward.
  ``kind``: ``("linear",)`` or ``("conv2d", stride, padding, dilation, groups)``.
- ``non_view(t)``: ``t``'s storage as a tensor autograd does not treat as a view (no copy), for outputs of
  a custom Function that the model then changes in place.
- ``copy_saved_activations()``: a context in which autograd keeps copies of the saved tensors that
  require grad (activations), so that a model adding its residuals in place (ComfyUI's CLIP:
  ``x += ...``) cannot change them; weights and anything else that does not require grad are kept
  by reference.
- ``observe_saved(observer)``: also call ``observer(t)`` for every tensor ``copy_saved_activations``
  keeps (what :class:`dreamid_core.learning.memory.SavedTensors` counts inside it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)


def frozen_alias(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(alias, copied)``: a non-inference, no-grad tensor with ``t``'s values (see the module docstring)."""
    try:
        alias = torch.empty(0, dtype=t.dtype, device=t.device)
        alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
        if alias.is_inference() or alias.data_ptr() != t.data_ptr():
            raise RuntimeError("not an alias")
        return alias, False
    except (RuntimeError, TypeError, NotImplementedError):
        with torch.inference_mode(False), torch.no_grad():
            return t.detach().clone(), True


class FrozenWeights:
    """Aliases for the weights of ``modules`` while active (see the module docstring)."""

    def __init__(self, modules: Iterable[torch.nn.Module]) -> None:
        self.modules = [m for m in modules if m is not None]
        self._saved: list[tuple[dict, str, torch.Tensor, torch.Tensor]] = []
        self.copied_bytes = 0

    def __enter__(self) -> FrozenWeights:
        seen: set[int] = set()
        for root in self.modules:
            for module in root.modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                for slots, param in ((module._parameters, True), (module._buffers, False)):
                    for name, t in list(slots.items()):
                        if t is None or not (t.is_inference() or t.requires_grad):
                            continue
                        alias, copied = frozen_alias(t)
                        if copied:
                            self.copied_bytes += t.numel() * t.element_size()
                        new = torch.nn.Parameter(alias, requires_grad=False) if param else alias
                        slots[name] = new
                        self._saved.append((slots, name, t, new))
        if self.copied_bytes:
            logger.info("frozen weights: %.1f MiB copied once (no alias possible)", self.copied_bytes / 2**20)
        return self

    def __exit__(self, *exc: object) -> None:
        for slots, name, original, new in reversed(self._saved):
            if slots.get(name) is new:
                slots[name] = original
        self._saved.clear()

    @property
    def count(self) -> int:
        return len(self._saved)


def non_view(t: torch.Tensor) -> torch.Tensor:
    """A tensor on ``t``'s very storage that autograd does not treat as a view (no copy): what a custom
    Function may return when the model goes on to change it in place."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.size(),
                                                               t.stride())


class _InputGradOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor],
                weight: Callable[[torch.Tensor], torch.Tensor], kind: tuple) -> torch.Tensor:
        ctx.forward, ctx.weight, ctx.kind, ctx.shape = forward, weight, kind, x.shape
        with torch.no_grad():
            out = forward(x)
        if out._is_view() or out is x:
            # the model may add into this output in place (ComfyUI's FLUX: ``txt += ...``), which autograd
            # forbids on a view made inside a Function: hand out a plain tensor on the same storage (no copy)
            out = non_view(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        with torch.no_grad():
            w = ctx.weight(grad)
            if ctx.kind[0] == "linear":
                dx = grad @ w.to(grad.dtype)
            else:
                _, stride, padding, dilation, groups = ctx.kind
                dx = torch.nn.grad.conv2d_input(ctx.shape, w.to(grad.dtype), grad, stride, padding, dilation, groups)
        return dx, None, None, None


def input_grad_only(x: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor],
                    weight: Callable[[torch.Tensor], torch.Tensor], kind: tuple) -> torch.Tensor:
    """``forward(x)`` with a backward that only computes ``x``'s gradient (see the module docstring)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return forward(x)
    return _InputGradOnly.apply(x, forward, weight, kind)


_OBSERVERS: list[Callable[[torch.Tensor], None]] = []


@contextlib.contextmanager
def observe_saved(observer: Callable[[torch.Tensor], None]) -> Iterator[None]:
    _OBSERVERS.append(observer)
    try:
        yield
    finally:
        _OBSERVERS.remove(observer)


def _observe(t: torch.Tensor) -> torch.Tensor:
    for observer in _OBSERVERS:
        observer(t)
    return t


@contextlib.contextmanager
def copy_saved_activations() -> Iterator[None]:
    """Keep copies of saved tensors that require grad (see the module docstring)."""
    with torch.autograd.graph.saved_tensors_hooks(lambda t: _observe(t.clone() if t.requires_grad else t),
                                                  lambda t: t):
        yield
