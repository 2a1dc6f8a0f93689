"""Identity and CLIP scores on real aligned faces, with tiny seeded models from local files."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from face_photos import face_photo, needs_photos
from tiny_diffusers import make_tiny_arcface, make_tiny_clip_model

from dreamid_core import FacePipeline, ModelFilesError, WeightFormatError, make_detector
from training.common.scorers import ClipScorer, IdentityScorer, cosine


@pytest.fixture(scope="module")
def faces():
    """Aligned crops [3, 112, 112]: person A, person A again (another crop), person B."""
    pipeline = FacePipeline(make_detector("mtcnn"), retry=False)

    def crop(person, **kw):
        return pipeline.process_one(np.array(face_photo(person, **kw))).crop

    return crop("t1-0"), crop("t1-0", size=160, margin=2.4, jitter=3), crop("tom")


def _onnx_recognizer(path, seed=0, dim=16):
    """A tiny recognition ONNX laid out like insightface's: [N, 3, 112, 112] -> [N, dim]."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).standard_normal((3 * 112 * 112, dim)).astype(np.float32) / 100
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input.1"], ["flat"], axis=1, name="Flatten_0"),
         helper.make_node("MatMul", ["flat", "W"], ["683"], name="MatMul_1")],
        "tiny_recognition",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["N", dim])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return w


@needs_photos
def test_identity_of_a_face_with_itself_is_one(tmp_path, faces):
    a, a2, b = faces
    scorer = IdentityScorer(make_tiny_arcface(tmp_path / "arcface.pt"))
    same = scorer.similarity(a, a)
    assert same.shape == (1,) and abs(float(same) - 1.0) < 1e-5
    sims = scorer.similarity(torch.stack([a, a]), torch.stack([a2, b]))
    assert float(sims[0]) < 1.0 - 1e-4 and float(sims[1]) < 1.0 - 1e-4
    e = scorer.embed(torch.stack([a, b]))
    assert torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(cosine(e[:1], e), scorer.similarity(a, torch.stack([a, b])), atol=1e-6)


@needs_photos
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime")
def test_identity_from_an_insightface_style_onnx(tmp_path, faces):
    a, _, b = faces
    w = _onnx_recognizer(tmp_path / "glintr100.onnx")
    scorer = IdentityScorer(tmp_path / "glintr100.onnx", provider="cpu")
    assert abs(float(scorer.similarity(a, a)) - 1.0) < 1e-5
    assert float(scorer.similarity(a, b)) < 1.0 - 1e-4
    # insightface's normalisation: RGB, (x * 255 - 127.5) / 127.5
    x = (torch.stack([a, b]).numpy().reshape(2, -1) * 255 - 127.5) / 127.5
    ref = torch.from_numpy(x.astype(np.float32) @ w)
    assert torch.allclose(scorer.embed(torch.stack([a, b])), torch.nn.functional.normalize(ref, dim=-1), atol=1e-4)


def test_identity_scorer_errors_name_the_path_and_what_is_expected(tmp_path):
    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(ModelFilesError, match=r"nowhere/model\.pt.*arcface_torch ViT.*glintr100\.onnx"):
        IdentityScorer(missing).embed(torch.rand(1, 3, 112, 112))
    wrong = tmp_path / "model.bin"
    wrong.write_bytes(b"x")
    with pytest.raises(ModelFilesError, match=r"model\.bin: unsupported face model type '\.bin'"):
        IdentityScorer(wrong).load()
    resnet = tmp_path / "r100.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, resnet)
    with pytest.raises(WeightFormatError, match="r100.pt.*ONNX export"):
        IdentityScorer(resnet).load()
    scorer = IdentityScorer(make_tiny_arcface(tmp_path / "arcface.pt"))
    with pytest.raises(ValueError, match=r"aligned faces \[N, 3, 112, 112\].*\(2, 3, 64, 64\)"):
        scorer.embed(torch.rand(2, 3, 64, 64))


def test_clip_score_is_finite_batched_and_depends_on_the_text(tmp_path):
    from PIL import Image

    scorer = ClipScorer(make_tiny_clip_model(tmp_path / "clip"), batch_size=2)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    texts = ["a photo of a person as a chef", "oil painting style, a person face", "a red car"]
    scores = scorer.score(images, texts)
    assert scores.shape == (3,) and all(math.isfinite(s) and -1 <= s <= 1 for s in scores.tolist())
    one = scorer.score(images[:1], texts[:1])
    assert torch.allclose(one, scores[:1], atol=1e-5)  # batching does not change a score
    other = scorer.score(images[:1], ["watercolor style, a person face"])
    assert abs(float(other) - float(one)) > 1e-4
    assert torch.allclose(scorer.score(images, texts[:1]), scorer.score(images, texts[:1] * 3), atol=1e-6)
    with pytest.raises(ValueError, match="3 images but 2 texts"):
        scorer.score(images, texts[:2])


def test_clip_scorer_errors_name_the_folder(tmp_path):
    with pytest.raises(ModelFilesError, match=r"CLIP model not found at .*nope \(no config\.json\).*CLIPModel folder"):
        ClipScorer(tmp_path / "nope").load()
