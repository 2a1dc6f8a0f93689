"""Export: checkpoint -> the .safetensors the nodes load, giving the training-time S* exactly."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from training_fixtures import make_setup, one_thread  # noqa: F401

from dreamid_core import load_encoder, read_encoder_config
from training.export import export, main
from training.train import RunFlags, train
from training.train.data import load_crop, load_edit_manifest

pytest.importorskip("accelerate")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from accelerate.state import AcceleratorState

    root = tmp_path_factory.mktemp("export")
    cfg = make_setup(root, max_steps=3, checkpoint_every=3, text_sensitive=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    result = train(cfg, RunFlags(output_dir=str(root / "run"), num_workers=0, report_to="none", progress=False))
    AcceleratorState._reset_state(reset_partial_state=True)
    items, _ = load_edit_manifest(cfg.edit_manifest)
    crops = torch.stack([load_crop(it.crop, 112) for it in items[:2]])
    with torch.no_grad():
        s_train = result.encoder(crops)
    return cfg, result, crops, s_train


def test_exported_file_gives_the_training_time_s_star(trained, tmp_path, caplog):
    cfg, result, crops, s_train = trained
    out = tmp_path / "my_encoder.safetensors"
    with caplog.at_level(logging.INFO):
        assert main(["--checkpoint", str(result.checkpoint), "--out", str(out)]) == 0
    encoder = load_encoder(out)
    with torch.no_grad():
        assert torch.equal(encoder(crops), s_train)
    config, prov, contents = read_encoder_config(out)
    assert contents == "projection+backbone" and config == result.encoder.config
    assert prov["base_model"] == cfg.base_model and prov["family"] == "sd2" and prov["prediction_type"] == "epsilon"
    assert prov["steps"] == 3 and prov["samples_seen"] == 6 and prov["data_sizes"] == {"recon": 0, "edit": 4}
    assert prov["config_hash"] == cfg.config_hash() and prov["config"]["lr"] == cfg.lr
    assert prov["date"].startswith("20") and "git" in prov and prov["backbone"] == "arcface.pt"
    assert "exported checkpoint-3" in caplog.text


def test_projection_only_export_needs_and_takes_the_backbone(trained, tmp_path):
    cfg, result, crops, s_train = trained
    out = export(result.output_dir, tmp_path / "small.safetensors", include_backbone=False)  # run folder -> newest
    assert read_encoder_config(out)[2] == "projection"
    assert out.stat().st_size < (result.checkpoint / "encoder.safetensors").stat().st_size
    with torch.no_grad():
        assert torch.equal(load_encoder(out, backbone_path=cfg.backbone_path)(crops), s_train)


def test_checkpoint_encoder_file_is_itself_loadable(trained):
    _, result, crops, s_train = trained
    with torch.no_grad():
        assert torch.equal(load_encoder(result.checkpoint / "encoder.safetensors")(crops), s_train)


def test_export_refuses_bad_requests(trained, tmp_path, caplog):
    _, result, _, _ = trained
    with pytest.raises(ValueError, match=r"\.safetensors"):
        export(result.checkpoint, tmp_path / "enc.pt")
    broken = shutil.copytree(result.checkpoint, tmp_path / "checkpoint-3")
    (broken / "complete.json").unlink()
    with caplog.at_level(logging.ERROR):
        assert main(["--checkpoint", str(broken), "--out", str(tmp_path / "x.safetensors")]) == 2  # a user error: exit 2
    assert "incomplete checkpoint" in caplog.text
    assert not (tmp_path / "x.safetensors").exists()
