"""The evaluation protocol: tiny diffusion model end to end (encoder and textual-inversion modes), and
the metrics' bookkeeping on real faces (a generator that returns photos)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from face_photos import HAVE_PHOTOS, face_photo, needs_photos
from PIL import Image
from tiny_diffusers import (
    TINY_TEXT_WIDTH,
    make_tiny_arcface,
    make_tiny_clip_model,
    make_tiny_sd,
    tiny_backbone_config,
)

from dreamid_core import (
    EncoderConfig,
    FacePipeline,
    IDEncoder,
    IncompatibleEncoderError,
    make_detector,
    save_encoder,
)
from dreamid_core.embedding_io import write_embedding
from training import evaluate as ev
from training.metrics import ClipScorer, IdentityScorer

PROMPTS = "a photo of S*\n# a comment\nS* as a chef, looking at the camera\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    torch.manual_seed(0)
    cfg = EncoderConfig(backbone=tiny_backbone_config(), target="sd2", token_widths=(("clip_h", TINY_TEXT_WIDTH),),
                        num_tokens=2, tap_layers=(1, 2, 3, 4), hidden_dim=32)
    return {"base": make_tiny_sd(root / "sd", "sd2"), "encoder": save_encoder(IDEncoder(cfg), root / "enc.safetensors"),
            "arcface": make_tiny_arcface(root / "arcface.pt"), "clip": make_tiny_clip_model(root / "clip"),
            "root": root}


@pytest.fixture(scope="module")
def faces_dir(tmp_path_factory):
    if not HAVE_PHOTOS:
        pytest.skip("needs the insightface sample photos and facenet-pytorch")
    folder = tmp_path_factory.mktemp("faces")
    face_photo("tom", size=160).save(folder / "tom.png")
    face_photo("t1-2", size=160).save(folder / "ann.jpg")
    face_photo("none", size=160).save(folder / "zz_no_face.png")
    return folder


def _cli(models, faces_dir, out, prompts, *extra):
    return ["--base-model", str(models["base"]), "--faces", str(faces_dir), "--prompts", str(prompts), "--out",
            str(out), "--face-model", str(models["arcface"]), "--clip-model", str(models["clip"]),
            "--images-per-prompt", "2", "--steps", "2", "--device", "cpu", "--no-detect-retry", *extra]


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@needs_photos
def test_encoder_evaluation_writes_table_csv_and_grid(tmp_path, models, faces_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "eval"
    assert ev.main(_cli(models, faces_dir, out, prompts, "--encoder", str(models["encoder"]))) == 0
    md = (out / "summary.md").read_text()
    assert "| prompt | images | text-alignment (CLIP) | face similarity | no-face rate |" in md
    assert "| **overall** | 8 |" in md and "DreamIdentity encoder" in md and "zz_no_face.png" in md
    rows = _read_csv(out / "summary.csv")
    assert [r["prompt"] for r in rows] == ["a photo of S*", "S* as a chef, looking at the camera", "overall"]
    for r in rows:
        assert -1.0 <= float(r["text_alignment"]) <= 1.0 and r["text_alignment"] != ""
        assert 0.0 <= float(r["no_face_rate"]) <= 1.0
        if r["face_similarity"]:
            assert -1.0 <= float(r["face_similarity"]) <= 1.0
        else:  # tiny models draw 32 px noise: no face, reported as a rate, never as similarity 0
            assert float(r["no_face_rate"]) == 1.0
    images = _read_csv(out / "images.csv")
    assert len(images) == 2 * 2 * 2 and {r["face"] for r in images} == {"tom", "ann"}
    assert len({r["seed"] for r in images}) == 8 and all((out / r["image"]).is_file() for r in images)
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (3 * 130 + 2, 4 * (128 + 14 + 2) + 2)  # face + 2 images, 2 faces x 2 prompts


@needs_photos
def test_textual_inversion_baseline_on_the_same_protocol(tmp_path, models, faces_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    emb = write_embedding(tmp_path / "ti.safetensors", {"clip_h": torch.randn(3, TINY_TEXT_WIDTH)})
    out = tmp_path / "eval"
    assert ev.main(_cli(models, faces_dir, out, prompts, "--embedding", str(emb))) == 0
    assert "textual-inversion embedding (the same for every face)" in (out / "summary.md").read_text()
    assert [r["prompt"] for r in _read_csv(out / "summary.csv")][-1] == "overall"
    assert (out / "grid.png").is_file()
    wrong = write_embedding(tmp_path / "wide.safetensors", {"clip_h": torch.randn(2, 64)})
    with pytest.raises(IncompatibleEncoderError, match=r"clip_h is \(2, 64\).*\[k, 32\]"):
        ev.EmbeddingIdentity(wrong, "sd2", {"clip_h": TINY_TEXT_WIDTH})
    sdxl = write_embedding(tmp_path / "xl.safetensors", {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 48)})
    assert set(ev.EmbeddingIdentity(sdxl, "sdxl", {"clip_l": 32, "clip_g": 48}).parts(None)) == {"clip_l", "clip_g"}


class _PhotoBatch:
    """Returns the test face's own photo (prompt 0) or a faceless picture (prompt 1); records calls."""

    def __init__(self, photo):
        self.photo, self.calls = photo, []

    def batch(self, prompts, seeds, parts=None, k=2):
        self.calls.append((list(prompts), list(seeds), {key: tuple(v.shape) for key, v in parts.items()}, k))
        person = "none" if "chef" in prompts[0] else None
        return [face_photo("none", size=160) if person else self.photo.copy() for _ in prompts]


class _SpyClip(ClipScorer):
    def __init__(self, folder):
        super().__init__(folder)
        self.texts = []

    def score(self, images, texts):
        self.texts.extend(texts)
        return super().score(images, texts)


@needs_photos
def test_metrics_on_real_faces_and_no_face_rate(tmp_path, models, faces_dir):
    pipeline = FacePipeline(make_detector("mtcnn"), retry=False)
    faces, skipped = ev.load_test_faces(faces_dir, pipeline)
    assert list(faces) == ["ann", "tom"] and skipped == ["zz_no_face.png"]
    faces = {"tom": faces["tom"]}
    gen = _PhotoBatch(face_photo("tom", size=160))
    clip = _SpyClip(models["clip"])
    identity_source = ev.EncoderIdentity(ev.load_encoder(models["encoder"]), {"clip_h": TINY_TEXT_WIDTH})
    cfg = ev.EvalConfig(out=tmp_path, images_per_prompt=3)
    result = ev.evaluate(cfg, faces=faces, prompts=ev.load_prompts(_write(tmp_path, PROMPTS)),
                         identity_source=identity_source, generator=gen, pipeline=pipeline,
                         identity=IdentityScorer(models["arcface"]), clip=clip)
    photo_row, chef_row, overall = result["rows"]
    assert abs(photo_row.face_similarity - 1.0) < 1e-4 and photo_row.no_face_rate == 0.0  # same photo back
    assert chef_row.face_similarity is None and chef_row.no_face_rate == 1.0
    # faceless images do not pull the mean down: overall similarity is over the 3 faces found
    assert abs(overall.face_similarity - 1.0) < 1e-4 and overall.no_face_rate == pytest.approx(0.5)
    assert clip.texts == ["a photo of a person", "a person as a chef, looking at the camera"]
    (prompts0, seeds0, shapes0, k0), _ = gen.calls
    assert prompts0 == ["a photo of S*"] * 3 and len(set(seeds0)) == 3 and shapes0 == {"clip_h": (3, 2, 32)}
    assert k0 == 2


def _write(folder, text):
    path = folder / "prompts.txt"
    path.write_text(text)
    return path


def test_prompts_must_contain_the_trigger(tmp_path):
    with pytest.raises(ValueError, match=r"line 2 \('a red car'\) does not contain the trigger 'S\*'"):
        ev.load_prompts(_write(tmp_path, "a photo of S*\na red car\n"))
    assert ev.load_prompts(ev.EXAMPLE_PROMPTS)


def test_encoder_for_another_base_model_is_refused(models):
    encoder = ev.load_encoder(models["encoder"])
    with pytest.raises(IncompatibleEncoderError, match=r"makes S\* for \{'clip_h': 32\}.*\{'clip_h': 1024\}"):
        ev.EncoderIdentity(encoder, {"clip_h": 1024})
    parts = ev.EncoderIdentity(encoder, {"clip_h": 32}).parts(torch.rand(3, 112, 112))
    assert parts["clip_h"].shape == (2, 32) and np.isfinite(parts["clip_h"].numpy()).all()
