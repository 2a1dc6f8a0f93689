"""Whether a snapshot can continue a run with the settings given now, and what differs.

API
- ``METHOD_FIELDS``: the settings that define what is learned; a snapshot learned with other values of
  these cannot be continued (layout, k, stages and their kind for per-stage identities, model family,
  norm constraint).
- ``check_resume(config, run, snapshot) -> list[str]``: raises :class:`LearnSettingsError` naming both
  values of the first method setting that differs (or when the snapshot's step already reaches
  ``config.steps``); returns one note per other difference that changes the continuation's draws or
  loss (seed, attention weight, class word, resolution, batch size, augmentation, photos) so the node
  and the command line can say it. Steps and the learning rate are what a user changes on purpose:
  they are neither refused nor noted.
"""

from __future__ import annotations

from typing import Any

from ..identities.learned_identity import IdentityConfig, LearnedIdentity
from .settings import LearnSettingsError

METHOD_FIELDS = ("layout", "num_tokens", "target", "norm")
PER_STAGE_FIELDS = ("num_stages", "stage_kind")
NOTED_FIELDS = ("seed", "attn_weight", "class_word", "resolution")
NOTED_RUN = ("batch_size", "augment", "photos")


def check_resume(config: IdentityConfig, run: dict[str, Any], snapshot: LearnedIdentity) -> list[str]:
    """See the module docstring."""
    if snapshot.resume is None:
        raise LearnSettingsError("this identity is not a snapshot of a run (it holds no optimizer state); use it as "
                                 "a start instead, or load a snapshot from models/dreamidentity/identities")
    old = snapshot.config
    fields = METHOD_FIELDS + (PER_STAGE_FIELDS if config.layout == "per_stage" else ())
    for name in fields:
        a, b = getattr(old, name), getattr(config, name)
        if name == "target" and a != b:
            raise LearnSettingsError(
                f"the snapshot (step {snapshot.resume.step}) was learned on a {a} model, this run's model is {b}; a "
                f"run continues only on the model family it was learned on. Connect the {a} checkpoint, or start a "
                "new run.")
        if a != b:
            raise LearnSettingsError(
                f"the snapshot (step {snapshot.resume.step}) was learned with {name}={a!r}, this run has {name}={b!r}; "
                f"{name} decides what is learned, so the run cannot continue. Set {name} to {a!r} to resume, or "
                "start a new run.")
    if snapshot.resume.step >= config.steps:
        raise LearnSettingsError(f"the snapshot is at step {snapshot.resume.step} and steps is {config.steps}: "
                                 f"nothing is left to learn; set steps above {snapshot.resume.step} to continue")
    notes = [f"{name} {getattr(old, name)!r} -> {getattr(config, name)!r}" for name in NOTED_FIELDS
             if getattr(old, name) != getattr(config, name)]
    notes += [f"{name} {snapshot.resume.run.get(name)!r} -> {run.get(name)!r}" for name in NOTED_RUN
              if name in snapshot.resume.run and snapshot.resume.run.get(name) != run.get(name)]
    return notes
