"""insightface pack folders: the usual layouts are found, the nested mistake accepted, gaps named."""

from __future__ import annotations

import pytest

from dreamid_core import ModelFilesError
from dreamid_core.faces.insightface_detector import PACKS, resolve_pack_dir


def fill(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / f).write_bytes(b"onnx")
    return folder


@pytest.mark.parametrize("layout", ["models/{p}", "{p}", "models/{p}/{p}"])
def test_layouts_are_found(tmp_path, layout):
    pack = "antelopev2"
    folder = fill(tmp_path / layout.format(p=pack), PACKS[pack]["files"])
    assert resolve_pack_dir(tmp_path, pack) == folder


def test_missing_folder_names_where_and_what(tmp_path):
    with pytest.raises(ModelFilesError, match=r"does not exist.*models/antelopev2/.*scrfd_10g_bnkps.onnx.*mtcnn"):
        resolve_pack_dir(tmp_path / "nowhere", "antelopev2")


def test_incomplete_pack_lists_what_is_there(tmp_path):
    fill(tmp_path / "models" / "buffalo_l", ["w600k_r50.onnx", "genderage.onnx"])
    with pytest.raises(ModelFilesError, match=r"found only \['genderage.onnx', 'w600k_r50.onnx'\].*det_10g.onnx"):
        resolve_pack_dir(tmp_path, "buffalo_l")


def test_empty_folder_and_unknown_pack(tmp_path):
    with pytest.raises(ModelFilesError, match="no .onnx files"):
        resolve_pack_dir(tmp_path, "antelopev2")
    with pytest.raises(ValueError, match="unknown insightface pack 'buffalo_s'"):
        resolve_pack_dir(tmp_path, "buffalo_s")


class _FakeDetector:
    taskname = "detection"

    def prepare(self, ctx_id, **kwargs):
        self.ctx_id = ctx_id


@pytest.mark.parametrize("device,options,ctx_id", [("cuda:2", [{"device_id": 2}, {}], 2), (None, [{}, {}], 0)])
def test_the_detector_session_runs_on_the_given_gpu(tmp_path, monkeypatch, device, options, ctx_id):
    """An evaluation shard on cuda:2 detects on GPU 2, not on GPU 0 (no GPU needed: the session's options)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    model_zoo = pytest.importorskip("insightface.model_zoo.model_zoo")
    from dreamid_core.faces.insightface_detector import InsightFaceDetector

    fill(tmp_path / "models" / "antelopev2", PACKS["antelopev2"]["files"])
    seen = {}

    def get_model(path, **kwargs):
        seen.update(kwargs)
        return _FakeDetector()

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(model_zoo, "get_model", get_model)
    detector = InsightFaceDetector(tmp_path, "antelopev2", provider="cuda", device=device)
    assert seen["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert seen["provider_options"] == options and detector._model.ctx_id == ctx_id
