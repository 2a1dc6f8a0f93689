"""Exports reproduce: one checkpoint exported again and again (later, from elsewhere) is the same file, and
the evaluation recognises a re-exported encoder by its contents and continues the evaluation it began."""

from __future__ import annotations

import datetime as real_dt
import hashlib
import shutil

import pytest
from training_fixtures import flags, make_setup, one_thread  # noqa: F401  (one_thread: a fixture)

from dreamid_core import read_encoder_config
from training.evaluate.cli import s_star_header
from training.evaluate.protocol import _check_settings
from training.export import export
from training.train import train

pytest.importorskip("accelerate")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from accelerate.state import AcceleratorState

    root = tmp_path_factory.mktemp("repro")
    cfg = make_setup(root, max_steps=2, checkpoint_every=1, text_sensitive=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    result = train(cfg, flags(root / "run"))
    AcceleratorState._reset_state(reset_partial_state=True)
    return result.output_dir


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_one_checkpoint_exported_again_and_again_is_one_file(run, tmp_path, monkeypatch):
    paths = [export(run / "checkpoint-2", tmp_path / f"enc{i}.safetensors") for i in range(5)]
    assert len({sha256(p) for p in paths}) == 1, "the same checkpoint gave different files"

    class LaterClock(real_dt.datetime):  # an export a year later
        @classmethod
        def now(cls, tz=None):
            return real_dt.datetime(2031, 1, 1, tzinfo=tz)

    monkeypatch.setattr(real_dt, "datetime", LaterClock)
    monkeypatch.chdir(run)  # and from another working directory, with a relative path
    later = export("checkpoint-2", tmp_path / "later.safetensors")
    assert sha256(later) == sha256(paths[0])
    prov = read_encoder_config(later)[1]
    assert prov["date"].startswith("20") and not prov["date"].startswith("2031")  # the checkpoint's date
    small = [export(run / "checkpoint-2", tmp_path / f"small{i}.safetensors", include_backbone=False) for i in range(3)]
    assert len({sha256(p) for p in small}) == 1


def test_the_evaluation_continues_with_a_re_exported_encoder(run, tmp_path):
    """The evaluation records what S* is; a re-export (another provenance: the checkpoint copied elsewhere)
    is the same S*, another checkpoint is not."""
    encoder = export(run / "checkpoint-2", tmp_path / "encoder.safetensors")
    settings = {**s_star_header(encoder), "seed": 0}
    _check_settings(tmp_path / "eval", settings)  # the evaluation begins

    moved = shutil.copytree(run / "checkpoint-2", tmp_path / "elsewhere" / "checkpoint-2")
    before = sha256(encoder)
    export(moved, encoder)  # re-exported in place: other provenance, other bytes, same contents
    assert sha256(encoder) != before and read_encoder_config(encoder)[1]["checkpoint"] == str(moved.resolve())
    _check_settings(tmp_path / "eval", {**s_star_header(encoder), "seed": 0})  # continues

    export(run / "checkpoint-1", encoder)  # another checkpoint at the same path: a new evaluation
    with pytest.raises(ValueError, match="S\\* content sha256"):
        _check_settings(tmp_path / "eval", {**s_star_header(encoder), "seed": 0})


def test_an_evaluation_begun_with_the_file_sha256_continues(run, tmp_path):
    """Evaluations begun before contents were compared recorded the file's sha256: still the same file, the
    evaluation continues (the record becomes the content digest); another file, it is refused as before."""
    import json

    from training.common.safetensors_files import file_digest

    encoder = export(run / "checkpoint-2", tmp_path / "encoder.safetensors")
    for name, recorded in (("same", file_digest(encoder)), ("other", "0123456789abcdef")):
        out = tmp_path / name
        out.mkdir()
        (out / "eval_settings.json").write_text(json.dumps({"S* from": str(encoder), "S* file sha256": recorded,
                                                            "seed": 0}))
        settings = {**s_star_header(encoder, out=out), "seed": 0}
        if name == "same":
            _check_settings(out, settings)
        else:
            with pytest.raises(ValueError, match="S\\* file sha256"):
                _check_settings(out, settings)
