"""Seeded draws that do not depend on what ran before them (what makes a resumed run equal one run).

``step_generator(seed, step, micro=0, rank=0) -> torch.Generator``: a CPU generator for one
(micro-)step, seeded from ``(seed, step, micro, rank)`` through numpy's ``SeedSequence``: the draws of
step n are the same whether steps 0..n-1 ran in this process, in another one, or not at all. Identity
learning and encoder training both draw their batches, timesteps and noise from it.
"""

from __future__ import annotations

import numpy as np
import torch


def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    """A CPU generator for one micro-step, independent of every other micro-step's."""
    state = np.random.SeedSequence([int(seed), int(step), int(micro), int(rank)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
