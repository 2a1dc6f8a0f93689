"""The command line: photos -> aligned crops -> a textual-inversion file, as a user runs it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from dreamid_core import BackboneConfig, EncoderConfig, IDEncoder, save_encoder
from dreamid_core.cli.main import sample_photo

pytestmark = pytest.mark.skipif(importlib.util.find_spec("insightface") is None
                                or importlib.util.find_spec("facenet_pytorch") is None,
                                reason="needs insightface (sample photo) and facenet-pytorch (MTCNN weights)")


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dreamid_core", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    torch.manual_seed(0)
    bb = BackboneConfig(width=32, depth=4, num_heads=4, num_features=16, patch_size=28)
    enc = IDEncoder(EncoderConfig.for_target("sdxl", bb, hidden_dim=32))
    return save_encoder(enc, tmp_path_factory.mktemp("enc") / "enc.safetensors", provenance={"test": True})


def test_crops_and_embedding_from_photos(tmp_path, encoder_file):
    photo = tmp_path / "me.png"
    Image.open(sample_photo()).crop((350, 150, 700, 500)).save(photo)  # one person's head and shoulders
    result = run_cli(photo, "--sample", "--out-dir", tmp_path / "out", "--encoder", encoder_file, "--name", "me",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert len(summary["faces"]) == 2 and summary["faces"][1]["faces_in_photo"] == 6
    # t1.jpg at 1280 px is detected at 640: the quick search for the largest face counted faces from 40 px
    # of that copy, 80 px of the photo (a full search would count smaller ones too)
    assert summary["faces"][1]["faces_counted_from_px"] == 80
    for face in summary["faces"]:
        assert Image.open(face["crop"]).size == (112, 112)
    with safe_open(summary["embedding"]["file"], "pt") as fh:
        assert {k: tuple(fh.get_tensor(k).shape) for k in fh.keys()} == {"clip_l": (2, 768), "clip_g": (2, 1280)}
    again = run_cli(photo, "--out-dir", tmp_path / "out", "--encoder", encoder_file, "--name", "me", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_info_and_errors(tmp_path, encoder_file):
    info = run_cli("--info", encoder_file, cwd=tmp_path)
    assert info.returncode == 0 and json.loads(info.stdout)["config"]["target"] == "sdxl"
    nothing = run_cli(cwd=tmp_path)
    assert nothing.returncode == 2 and "no photos given" in nothing.stderr
    mask = sample_photo().parent / "mask_white.jpg"
    noface = run_cli(mask, "--out-dir", tmp_path / "o", cwd=tmp_path)
    assert noface.returncode == 2 and "No face found in image 0" in noface.stderr
