"""Phase 2, training the ID encoder: ``python -m training.train`` (:mod:`.cli`).

:mod:`.run` sets a run up, :mod:`.loop` runs its steps, :mod:`.loss` is the DreamIdentity loss; the
experiment config and run flags are :mod:`.config`; :mod:`.prepare` builds the model, optimizer and data
(:mod:`.data`, :mod:`.recon`, :mod:`.sampler`); :mod:`.checkpoint`, :mod:`.resume`, :mod:`.launch` and
:mod:`.divergence` make a run survive kills, relaunches and NaNs.
"""

from .cli import main
from .config import ExperimentConfig, RunFlags
from .divergence import TrainingDivergedError
from .loop import TrainResult
from .run import train

__all__ = ["ExperimentConfig", "RunFlags", "TrainResult", "TrainingDivergedError", "main", "train"]
