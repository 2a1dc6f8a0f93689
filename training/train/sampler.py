"""Which sample comes next: a deterministic, resumable mix of reconstruction and editing samples.

Every sample has a global position ``p`` (0, 1, 2, ... over the whole run, across processes).
What sits at ``p`` is a pure function of ``(seed, p)`` and the dataset sizes, so the sampler's
whole state is one integer, the number of samples consumed, and a resumed run continues the
exact data order of an uninterrupted one.

- Source: stratified, not random. Position ``p`` is a reconstruction sample when
  ``floor((p + 1) * f) > floor(p * f)`` for ``f = recon_fraction``; every window of n samples
  holds ``n * f`` of them, rounded.
- Index within a source: the c-th sample of a source with n items is ``perm_e[c % n]``, where
  ``perm_e`` is a permutation seeded by ``(seed, source, e = c // n)``: each epoch a fresh order.
- Prompt template (reconstruction only): drawn from ``(seed, p)``.

With several processes, micro-batch m holds positions ``[m * B * W, (m + 1) * B * W)``; process r
takes the slice ``[r * B, (r + 1) * B)`` of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any

import numpy as np

SOURCES = ("recon", "edit")
_SOURCE_ID = {"recon": 1, "edit": 2}
_TEMPLATE_STREAM = 3


@dataclass(frozen=True)
class SampleRef:
    """One sample: which dataset, which item in it, its global position and prompt template."""

    source: str
    index: int
    position: int
    template: int


@lru_cache(maxsize=8)
def _permutation(seed: int, source: str, epoch: int, size: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _SOURCE_ID[source], epoch])))
    return rng.permutation(size)


class MixSampler:
    """Global position -> :class:`SampleRef`; iterate micro-batches from any position."""

    def __init__(self, *, sizes: dict[str, int], recon_fraction: float, seed: int, num_templates: int = 1) -> None:
        self.sizes = {s: int(sizes.get(s, 0)) for s in SOURCES}
        self.fraction = Fraction(recon_fraction).limit_denominator(10_000)
        self.seed = int(seed)
        self.num_templates = max(1, int(num_templates))
        self.position = 0  # samples consumed so far (all processes together)
        if self.fraction > 0 and self.sizes["recon"] == 0:
            raise ValueError(f"recon_fraction is {float(self.fraction)} but the reconstruction set is empty: "
                             "check recon_dir and the data report, or set recon_fraction to 0")
        if self.fraction < 1 and self.sizes["edit"] == 0:
            raise ValueError(f"recon_fraction is {float(self.fraction)} but the editing set is empty (no kept lines "
                             "in the manifest): check edit_manifest and the data report, or set recon_fraction to 1")

    def _recon_before(self, p: int) -> int:
        """Reconstruction samples at positions < p."""
        return int(p * self.fraction)  # Fraction arithmetic: exact floor

    def ref(self, p: int) -> SampleRef:
        recon_count = self._recon_before(p)
        if self._recon_before(p + 1) > recon_count:
            source, c = "recon", recon_count
        else:
            source, c = "edit", p - recon_count
        n = self.sizes[source]
        epoch, offset = divmod(c, n)
        index = int(_permutation(self.seed, source, epoch, n)[offset])
        template = 0
        if source == "recon" and self.num_templates > 1:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, _TEMPLATE_STREAM, p])))
            template = int(rng.integers(self.num_templates))
        return SampleRef(source=source, index=index, position=p, template=template)

    def micro_batches(self, *, batch_size: int, num_processes: int = 1, rank: int = 0,
                      start: int | None = None) -> Iterator[list[SampleRef]]:
        """This process's micro-batches, forever, from global position ``start`` (default: ``position``)."""
        start = self.position if start is None else start
        span = batch_size * num_processes
        if start % span:
            raise ValueError(f"sampler position {start} is not a multiple of batch_size x processes = {span}; "
                             "resume with the batch size and number of processes the checkpoint was written with")
        base = start
        while True:
            first = base + rank * batch_size
            yield [self.ref(p) for p in range(first, first + batch_size)]
            base += span

    def advance(self, samples: int) -> None:
        self.position += int(samples)

    # -- checkpoint state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.seed, "sizes": dict(self.sizes),
                "recon_fraction": str(self.fraction), "num_templates": self.num_templates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        changed = {k: (state.get(k), mine[k]) for k in ("seed", "sizes", "recon_fraction", "num_templates")
                   if state.get(k) != mine[k]}
        if changed:
            raise ValueError(
                "the checkpoint's data order cannot be continued: " +
                "; ".join(f"{k} was {old!r}, now {new!r}" for k, (old, new) in changed.items()) +
                ". The datasets or mix changed since the checkpoint (a photo added or removed, a different "
                "manifest). Restore the data, or start a new run from the exported encoder.")
        self.position = int(state["position"])
