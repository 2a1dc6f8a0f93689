"""One photo -> S* path: the command line and the ComfyUI node give the same S*, bit for bit, for the
same photo and encoder (both go through dreamid_core.encoder.identity.encode_identity)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreamid_core import BackboneConfig, EncoderConfig, IDEncoder, save_encoder

PACK = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(importlib.util.find_spec("insightface") is None
                                 or importlib.util.find_spec("facenet_pytorch") is None,
                                 reason="needs insightface (sample photos) and facenet-pytorch (MTCNN weights)")]


@pytest.mark.parametrize("face_index,combine", [(0, "average"), (2, "average_features")])
def test_cli_and_node_give_the_same_s_star(comfyui, tmp_path, face_index, combine):
    from comfy_env import load_pack

    from dreamid_core.cli.main import sample_photo

    torch.manual_seed(face_index)
    bb = BackboneConfig(width=32, depth=4, num_heads=4, num_features=16, patch_size=28)
    name = f"one_path_{face_index}.safetensors"
    encoder = save_encoder(IDEncoder(EncoderConfig.for_target("sd2", bb, hidden_dim=32)),
                           comfyui.models_dir("dreamidentity") / name)
    # a PNG: lossless, so ComfyUI's loader (PIL in 0.3.x, PyAV in 0.33) and the CLI's see the same pixels
    photo = Path(comfyui.folder_paths.get_input_directory()) / "group_one_path.png"
    Image.open(sample_photo()).convert("RGB").save(photo)
    out = subprocess.run([sys.executable, "-m", "dreamid_core", photo, "--encoder", encoder, "--name", "me",
                          "--face-index", str(face_index), "--combine", combine, "--detector", "mtcnn",
                          "--provider", "cpu", "--out-dir", tmp_path], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    from_cli = load_file(tmp_path / "me.safetensors")["emb_params"]

    nodes = load_pack(comfyui.nodes, PACK)
    image = comfyui.nodes.LoadImage().load_image(photo.name)[0]  # as a user's LoadImage gives it
    (bundle,) = nodes["DreamID_LoadIDEncoder"]().load(name, "mtcnn", "cpu")
    embeds = nodes["DreamID_EncodeFace"]().encode(bundle, image, 1.0, combine, face_index, "largest",
                                                  "error")["result"][0]
    assert torch.equal(embeds.parts["clip_h"], from_cli)
