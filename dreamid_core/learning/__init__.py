"""Learning an identity on a frozen diffusion model (Beyond Inserting; textual inversion as its special
case): one learner for every host.

- :mod:`.learner`: :class:`IdentityLearner`, the run (seeding, batches, prompts, loss, NaN stop, report);
- :mod:`.host`: the interface a model host implements (ComfyUI's objects in ``nodes/``, diffusers in
  ``training/learn_identity/``);
- :mod:`.photos`: face squares, latents + face geometry, augmented batches;
- :mod:`.prompts`: training templates and word pairing; :mod:`.init`: where an identity starts;
- :mod:`.loss`: the diffusion loss in the model's own prediction space; :mod:`.attention_loss`: the
  face-wise attention loss; :mod:`.stages`: which per-stage token pair a layer or timestep uses;
- :mod:`.settings`: run options and the one validator; :mod:`.seeding`: per-step generators;
- :mod:`.frozen`: autograd through frozen weights without copies; :mod:`.memory`: what a step holds.
"""

from .host import Conditioning, LearnHost, Noised, encode_recomputed
from .init import from_word_rows, start_tensors
from .learner import IdentityLearner, LearnResult, Measure, StepStats
from .loss import PREDICTIONS, prediction_error, prediction_loss
from .memory import SavedTensors, heap_bytes, held_bytes
from .photos import PhotoSet, face_square, face_squares
from .prompts import PLACEHOLDER, TEMPLATES, Encoded, check_templates, pair_words
from .seeding import step_generator
from .settings import LearningDivergedError, LearnSettingsError, RunOptions, check_settings

__all__ = [
    "PLACEHOLDER", "PREDICTIONS", "TEMPLATES", "Conditioning", "Encoded", "IdentityLearner", "LearnHost",
    "LearnResult", "LearnSettingsError", "LearningDivergedError", "Measure", "Noised", "PhotoSet", "RunOptions",
    "SavedTensors", "heap_bytes", "held_bytes",
    "StepStats", "check_settings", "check_templates", "encode_recomputed", "face_square", "face_squares",
    "from_word_rows", "pair_words", "prediction_error", "prediction_loss", "start_tensors", "step_generator",
]
