"""Every error the pack raises on purpose. Each message names the value at fault and the fix.

They derive from built-in types where one fits (``ValueError``, ``FileNotFoundError``) so callers
that catch those keep working; ``DreamIDError`` catches them all.
"""

from __future__ import annotations


class DreamIDError(Exception):
    """Base class of the pack's own errors."""


class ImageInputError(DreamIDError, ValueError):
    """An image that cannot be used: wrong shape, too small, empty batch."""


class FaceNotFoundError(DreamIDError, ValueError):
    """No face in an image, after every retry the pipeline knows."""


class FaceSelectionError(DreamIDError, ValueError):
    """A face index that does not exist among the faces found."""


class WeightFormatError(DreamIDError, ValueError):
    """A weights file that is not what it claims: corrupt, a pickle, wrong shapes, newer format."""


class IncompatibleEncoderError(DreamIDError, ValueError):
    """An encoder whose embedding widths do not match the text encoder it is used with."""


class TriggerNotFoundError(DreamIDError, ValueError):
    """A prompt that does not contain the trigger word S* is meant to replace."""


class ModelFilesError(DreamIDError, FileNotFoundError):
    """Model files missing or incomplete: insightface packs, detector weights, folders."""


class MissingDependencyError(DreamIDError, ImportError):
    """An optional package that a feature needs is not installed."""


class ConfigError(DreamIDError, ValueError):
    """A setting that cannot work (a config field, a command-line flag); the message names it and the fix.

    Every stage of the training stack validates its config dataclass with it (``ExperimentConfig``,
    ``BuildConfig``, ``EvalConfig``, identity learning's ``IdentityConfig`` + ``RunOptions``)."""
