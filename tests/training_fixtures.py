"""Tiny, seeded training setups for the training tests: a base model, an arcface backbone, an
editing manifest with real face crops, and an ExperimentConfig pointing at them.

A randomly initialised tiny UNet barely listens to its text conditioning (swapping S* for
anything moves its loss by ~0.001, far below the step-to-step noise of the loss), so no
training signal could be seen in 20 steps. :func:`make_text_sensitive` scales the UNet's
cross-attention outputs and output conv and the text encoder's final LayerNorm: the
prediction then depends strongly on the prompt, a random S* inflates the loss, and training S*
visibly brings it down. Nothing in the trainer knows about this.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_diffusers import make_tiny_arcface, make_tiny_sd

from training.train.config import ExperimentConfig, RunFlags


def insightface_images() -> Path:
    """The sample photos of the insightface wheel; the calling test is skipped when it is not installed."""
    spec = importlib.util.find_spec("insightface")
    folder = Path(spec.origin).parent / "data" / "images" if spec is not None and spec.origin else None
    if folder is None or not (folder / "Tom_Hanks_54745.png").is_file():
        pytest.skip("needs the sample photos of the insightface wheel (pip install insightface)")
    return folder


def make_text_sensitive(folder: Path, *, cross_attention: float = 100.0, text_norm: float = 10.0,
                        output: float = 5.0) -> Path:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_out.0"):
            module.weight.data *= cross_attention
    unet.conv_out.weight.data *= output
    unet.conv_out.bias.data *= output
    unet.save_pretrained(folder / "unet")
    te = CLIPTextModel.from_pretrained(folder / "text_encoder")
    for name, module in te.named_modules():
        if name.endswith("final_layer_norm"):
            module.weight.data *= text_norm
    te.save_pretrained(folder / "text_encoder")
    return folder


def make_edit_set(folder: Path, n: int = 4, image_px: int = 48) -> Path:
    """``n`` aligned crops (Tom Hanks, flipped / dimmed variants), target images cut from the group
    photo, a manifest with one not-kept line. Returns the manifest path."""
    images = insightface_images()
    tom = Image.open(images / "Tom_Hanks_54745.png").convert("RGB")
    group = Image.open(images / "t1.jpg").convert("RGB")
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        crop = tom if i % 2 == 0 else tom.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop = Image.fromarray((np.asarray(crop, dtype=np.float32) * (0.7 + 0.1 * i)).clip(0, 255).astype(np.uint8))
        crop.save(folder / f"crop{i}.png")
        group.crop((100 + 200 * i, 100, 400 + 200 * i, 400)).resize((image_px, image_px)).save(folder / f"img{i}.png")
        prompt = ["a painting of S*", "S* as a chef, looking at the camera"][i % 2]
        lines.append({"source_crop": f"crop{i}.png", "image": f"img{i}.png", "prompt": prompt, "kept": True})
    lines.append({"source_crop": "crop0.png", "image": "img0.png", "prompt": "S* wearing a hat", "kept": False})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def make_setup(root: Path, *, family: str = "sd2", prediction_type: str = "epsilon",
               text_sensitive: bool = True, **overrides) -> ExperimentConfig:
    """Base model, backbone, data and config under ``root``; ``overrides`` go into the config."""
    base = root / f"base-{family}-{prediction_type}"
    if not base.exists():
        make_tiny_sd(base, family, prediction_type=prediction_type)
        if text_sensitive and family != "sdxl":
            make_text_sensitive(base)
    arcface = root / "arcface.pt"
    if not arcface.exists():
        make_tiny_arcface(arcface)
    manifest = root / "edit" / "manifest.jsonl"
    if not manifest.exists():
        make_edit_set(root / "edit")
    fields = dict(base_model=str(base), backbone_path=str(arcface), hidden_dim=32, lr=3e-3, batch_size=2,
                  max_steps=20, mixed_precision="no", edit_manifest=str(manifest), recon_fraction=0.0,
                  resolution=32, checkpoint_every=10, keep_checkpoints=None, cache_latents="disk", seed=0)
    fields.update(overrides)
    return ExperimentConfig(**fields)


def subprocess_env() -> dict[str, str]:
    """Environment for a ``python -m training.train`` child that computes like this process."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    env["MKL_NUM_THREADS"] = str(torch.get_num_threads())
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads; one thread keeps a busy 2-core box from oversubscribing."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def flags(out: Path, **kw) -> RunFlags:
    return RunFlags(output_dir=str(out), num_workers=0, report_to=kw.pop("report_to", "none"), progress=False, **kw)


def encoder_tensors(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / f"checkpoint-{step}" / "encoder.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def recon_photos(folder: Path) -> Path:
    """Three face photos (the insightface samples) for reconstruction samples."""
    images = insightface_images()
    folder.mkdir(parents=True, exist_ok=True)
    tom = Image.open(images / "Tom_Hanks_54745.png").convert("RGB")
    tom.save(folder / "tom.png")
    tom.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "tom_flipped.png")
    Image.open(images / "t1.jpg").convert("RGB").crop((380, 180, 660, 500)).save(folder / "group_crop.jpg")
    return folder
