"""What a learning step holds in memory, measured (benchmarks and tests).

API
- ``heap_bytes() -> int | None``: bytes the C heap has in use now (glibc ``mallinfo2``: small blocks
  plus mmapped ones), which is where PyTorch's CPU tensors live; None where it cannot be read (not
  glibc). ``held_bytes(fn) -> (result, bytes)``: what ``fn()`` leaves allocated while its result lives,
  e.g. a loss with its graph: everything autograd keeps for backward, by whatever mechanism
  (saved tensors, gradient checkpointing's inputs, recorded maps).
- ``SavedTensors(weights)``: a context that accounts for what autograd keeps through saved-tensor hooks
  while it is active (also inside :func:`dreamid_core.learning.frozen.copy_saved_activations`): unique
  storages, split into the given weights' own storages (kept by reference: no memory of their own) and
  everything else; ``copies_of(weights)`` lists kept tensors that hold a weight's values in another
  storage (a copy of a weight). Regions under gradient checkpointing save through their own hooks and
  are not seen: use :func:`held_bytes` to compare memory modes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .frozen import observe_saved


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def heap_bytes() -> int | None:
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


def held_bytes(fn: Callable[[], Any]) -> tuple[Any, int | None]:
    """``(fn(), bytes it left allocated)`` (see the module docstring)."""
    gc.collect()
    before = heap_bytes()
    result = fn()
    gc.collect()
    after = heap_bytes()
    return result, (after - before) if before is not None and after is not None else None


class SavedTensors:
    """What autograd keeps for backward while active (see the module docstring)."""

    def __init__(self, weights: Iterable[torch.Tensor] = ()) -> None:
        self._weights = {w.untyped_storage().data_ptr() for w in weights}
        self.kept: dict[int, torch.Tensor] = {}  # storage pointer -> one tensor on it
        self._hooks = None

    def _record(self, t: torch.Tensor) -> None:
        self.kept.setdefault(t.untyped_storage().data_ptr(), t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._record(t)
        return t

    def __enter__(self) -> SavedTensors:
        self._observing = observe_saved(self._record)
        self._observing.__enter__()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        self._observing.__exit__(*exc)

    @property
    def weight_storages(self) -> int:
        return sum(1 for p in self.kept if p in self._weights)

    @property
    def other_bytes(self) -> int:
        """Bytes of kept storages that are not the weights' own (activations, and any copy)."""
        return sum(t.untyped_storage().nbytes() for p, t in self.kept.items() if p not in self._weights)

    def copies_of(self, weights: Iterable[torch.Tensor]) -> list[tuple[int, ...]]:
        """Shapes of kept tensors, outside the weights' storages, equal to one of ``weights`` (a copy)."""
        by_shape: dict[tuple, list[torch.Tensor]] = {}
        for w in weights:
            by_shape.setdefault(tuple(w.shape), []).append(w)
        out = []
        for p, t in self.kept.items():
            if p in self._weights or tuple(t.shape) not in by_shape:
                continue
            if any(torch.equal(t.detach().to(w.dtype), w.detach()) for w in by_shape[tuple(t.shape)]):
                out.append(tuple(t.shape))
        return out
