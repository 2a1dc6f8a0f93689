"""The settings of one learning run that are not the identity's own config, and the one validator of both.

API
- ``RunOptions``: how a run goes (batch, templates, augmentation, attention-loss layers, measurement,
  memory). What is learned lives in :class:`dreamid_core.identities.learned_identity.IdentityConfig`.
- ``check_settings(config, options, resolution_multiple=8)``: raises :class:`LearnSettingsError`
  naming the value and the fix; the node and the command line call it before any model work.
- ``LearnSettingsError``, ``LearningDivergedError`` (the loss became NaN or infinite).

The resolution rule is the model's: a multiple of ``resolution_multiple`` (the VAE's factor times the
UNet's total downsampling, given by the host: 64 for SD1.x/SD2.x, 32 for SDXL), at least one multiple.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError, DreamIDError
from .prompts import TEMPLATES

if TYPE_CHECKING:
    from ..identities.learned_identity import IdentityConfig


class LearnSettingsError(ConfigError):
    """A learning setting that cannot work (no steps, a learning rate that is not a positive number...)."""


class LearningDivergedError(DreamIDError, RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class RunOptions:
    """How to run one learning (see the module docstring)."""

    batch_size: int = 1
    templates: Sequence[str] = TEMPLATES
    augment: bool = True
    scale_jitter: float = 0.1  # crops of 90..100 % of the latent
    flip_p: float = 0.5
    #: attention loss and face mass on cross-attention layers with at most this many queries
    #: (1024: the 32x32 layers at 512 px, as in Beyond Inserting); None: every layer
    max_queries: int | None = 1024
    #: weights of the attention loss's terms inside it: (context, class, face) (attention_loss.py)
    attn_terms: tuple[float, float, float] = (1.0, 1.0, 1.0)
    #: the before/after measurement: pairs (photo, timestep), at least one per timestep, at most this many
    measure_pairs: int = 10
    measure_timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)
    measure_seed: int = 1_000_003
    #: recompute the UNet's blocks (and every text encoding) in the backward pass: less memory, ~30 % more time
    gradient_checkpointing: bool = False


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_settings(config: IdentityConfig, options: RunOptions, resolution_multiple: int | None = None) -> None:
    """Raise :class:`LearnSettingsError` for the first setting that cannot work (see the module docstring).
    ``resolution_multiple`` None (before a model is loaded): the VAE's factor 8 only."""
    steps, lr, weight = config.steps, config.lr, config.attn_weight
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise LearnSettingsError(f"steps={steps!r}: learning needs at least 1 step; set steps to e.g. 200.")
    if not _finite(lr) or lr <= 0:
        raise LearnSettingsError(f"learning_rate={_show(lr)} is not a positive finite number; use e.g. 0.005.")
    if not _finite(weight) or weight < 0:
        raise LearnSettingsError(f"attention_loss_weight={_show(weight)} must be a finite number >= 0 "
                                 "(0.003 is the paper's best; 0 gives plain textual inversion).")
    batch = options.batch_size
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise LearnSettingsError(f"batch_size={batch!r} must be an integer >= 1 (1 fits every card).")
    res, m = config.resolution, int(resolution_multiple or 8)
    if not isinstance(res, int) or isinstance(res, bool) or res < m or res % m:
        why = "the VAE's factor" if resolution_multiple is None else "this model's VAE factor times its UNet's downsampling"
        raise LearnSettingsError(f"resolution={res!r} must be a positive multiple of {m} ({why}); 512 for "
                                 "SD1.x/SD2.x, 1024 for SDXL.")
    if not (_finite(options.scale_jitter) and 0 <= options.scale_jitter < 0.5):
        raise LearnSettingsError(f"scale_jitter={_show(options.scale_jitter)} must be in [0, 0.5) (0.1 = crops "
                                 "of 90-100 %).")
    if not (_finite(options.flip_p) and 0 <= options.flip_p <= 1):
        raise LearnSettingsError(f"flip_p={_show(options.flip_p)} must be a probability in [0, 1].")
    if options.max_queries is not None and (not isinstance(options.max_queries, int) or options.max_queries < 1):
        raise LearnSettingsError(f"max_queries={options.max_queries!r} must be an integer >= 1 or None (all layers).")
    if len(options.attn_terms) != 3 or not all(_finite(w) and w >= 0 for w in options.attn_terms):
        raise LearnSettingsError(f"attn_terms={options.attn_terms!r} must be three finite weights >= 0 "
                                 "(context, class, face)")
    if options.measure_pairs < 1 or not options.measure_timesteps:
        raise LearnSettingsError("the measurement needs at least one pair and one timestep")


def _show(value: object) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value)
