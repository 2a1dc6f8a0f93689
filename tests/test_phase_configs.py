"""One config style across the training phases (dataset, training, evaluation, identity learning): each phase's
settings are a dataclass that refuses a value that cannot work when it is made, with a ConfigError (a DreamIDError
and a ValueError) naming the setting."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from dreamid_core import ConfigError, DreamIDError  # noqa: E402
from dreamid_core.identities.learned_identity import IdentityConfig  # noqa: E402
from dreamid_core.learning import RunOptions, check_settings  # noqa: E402
from training.build_dataset.steps import BuildConfig  # noqa: E402
from training.evaluate.protocol import EvalConfig  # noqa: E402
from training.train.config import ExperimentConfig  # noqa: E402

CASES = {
    # stage: (make the bad config, what the message must name)
    "train lr": (lambda out: ExperimentConfig(random_backbone=True, lr=-1.0), r"\.lr = -1"),
    "train k": (lambda out: ExperimentConfig(random_backbone=True, num_tokens=0), r"num_tokens"),
    "train recon_fraction": (lambda out: ExperimentConfig(random_backbone=True, recon_fraction=1.5), r"recon_fraction"),
    "dataset images": (lambda out: BuildConfig(out=out, images_per_name=0), r"--images-per-name.*0"),
    "dataset min face": (lambda out: BuildConfig(out=out, min_face=-1), r"--min-face.*-1"),
    "dataset keep": (lambda out: BuildConfig(out=out, keep_fraction=0.0), r"--keep-fraction.*0"),
    "dataset combine": (lambda out: BuildConfig(out=out, combine="max"), r"--combine.*'max'"),
    "dataset templates": (lambda out: BuildConfig(out=out, templates=("no-such",)), r"no-such"),
    "dataset shard": (lambda out: BuildConfig(out=out, shard=3, num_shards=2), r"--shard 3"),
    "evaluate images": (lambda out: EvalConfig(out=out, images_per_prompt=0), r"--images-per-prompt.*0"),
    "evaluate grid": (lambda out: EvalConfig(out=out, grid_rows=0), r"--grid-rows.*0"),
    "evaluate shards": (lambda out: EvalConfig(out=out, num_shards=0), r"--num-shards.*0"),
    "learn layout": (lambda out: IdentityConfig(layout="grid"), r"layout.*'grid'"),
    "learn stages": (lambda out: IdentityConfig(num_stages=0), r"num_stages.*0"),
    "learn steps": (lambda out: check_settings(IdentityConfig(steps=0), RunOptions()), r"steps=0"),
    "learn lr": (lambda out: check_settings(IdentityConfig(steps=10, lr=float("nan")), RunOptions()), r"learning_rate=NaN"),
    "learn batch": (lambda out: check_settings(IdentityConfig(steps=10), RunOptions(batch_size=0)), r"batch_size=0"),
    "learn resolution": (lambda out: check_settings(IdentityConfig(steps=10, resolution=500), RunOptions()),
                         r"resolution=500"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_setting_is_a_config_error_that_names_it(case, tmp_path):
    make, named = CASES[case]
    with pytest.raises(ConfigError, match=named) as info:
        make(tmp_path)
    assert isinstance(info.value, DreamIDError) and isinstance(info.value, ValueError)


def test_the_defaults_of_every_stage_are_valid(tmp_path):
    ExperimentConfig(random_backbone=True)
    BuildConfig(out=tmp_path)
    EvalConfig(out=tmp_path)
    check_settings(IdentityConfig(steps=1), RunOptions())
