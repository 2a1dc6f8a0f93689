"""Phase 3, evaluation: the paper's protocol (:mod:`.protocol`), run by ``python -m training.evaluate``
(:mod:`.cli`); S* from an encoder, a textual-inversion file or a learned identity (:mod:`.identity_sources`);
several methods in one table: ``python -m training.evaluate_identities`` (:mod:`.compare`); the numbers
(:mod:`.report`) and the image grid (:mod:`.grid`). The scorers are :mod:`training.common.scorers`.
"""

from .cli import main
from .identity_sources import EmbeddingIdentity, EncoderIdentity, LearnedIdentitySource
from .protocol import EXAMPLE_PROMPTS, EvalConfig, evaluate, load_prompts, load_test_faces

__all__ = ["EXAMPLE_PROMPTS", "EmbeddingIdentity", "EncoderIdentity", "EvalConfig", "LearnedIdentitySource", "evaluate",
           "load_prompts", "load_test_faces", "main"]
