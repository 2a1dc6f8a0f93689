"""What ComfyUI and its users see of the pack: it imports in ComfyUI's CI mode, /object_info lists
the five nodes with a description and a tooltip on every input, and model folders merge with
the user's extra_model_paths.yaml instead of replacing it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui
PACK = Path(__file__).resolve().parents[1]
NODE_IDS = {"DreamID_LoadIDEncoder", "DreamID_EncodeFace", "DreamID_InjectIDTokens", "DreamID_SaveIDEmbedding",
            "DreamID_ScenePosition", "DreamID_HeadPlacement", "DreamID_IdentityRegions", "DreamID_LearnIdentity",
            "DreamID_ApplyPerStageIdentity", "DreamID_LoadIdentity", "DreamID_SaveLearnedIdentity"}


def test_pack_imports_in_comfyui_quick_test_mode(comfy_path, tmp_path):
    nodes_dir = tmp_path / "custom_nodes"
    nodes_dir.mkdir()
    (nodes_dir / "ComfyUI-DreamIdentity").symlink_to(PACK, target_is_directory=True)
    (tmp_path / "extra.yaml").write_text(f"ci:\n  base_path: {tmp_path}\n  custom_nodes: {nodes_dir}\n")
    (tmp_path / "user").mkdir()
    cmd = [sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--disable-all-custom-nodes",
           "--whitelist-custom-nodes", "ComfyUI-DreamIdentity", "--extra-model-paths-config", str(tmp_path / "extra.yaml"),
           "--user-directory", str(tmp_path / "user"), "--database-url", f"sqlite:///{tmp_path / 'db.sqlite'}"]
    out = subprocess.run(cmd, cwd=comfy_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    timings = log.split("Import times for custom nodes")[-1]
    (line,) = [ln for ln in timings.splitlines() if ln.rstrip().endswith("ComfyUI-DreamIdentity")]
    assert "IMPORT FAILED" not in line, line  # e.g. "   0.0 seconds: .../ComfyUI-DreamIdentity"


def test_object_info_lists_the_nodes_with_descriptions_and_tooltips(comfy_server):
    info = comfy_server.object_info()
    pack_nodes = {k for k, v in info.items() if v.get("category") == "DreamIdentity"}
    assert NODE_IDS == pack_nodes, "every pack node is checked here"
    for node_id in NODE_IDS:
        node = info[node_id]
        assert node["category"] == "DreamIdentity" and len(node["description"]) > 40, node_id
        inputs = {**node["input"]["required"], **node["input"].get("optional", {})}
        assert inputs, node_id
        for name, spec in inputs.items():
            opts = spec[1] if len(spec) > 1 else {}
            assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(node["output_tooltips"]) == len(node["output"]), node_id
    assert info["DreamID_EncodeFace"]["output"][:4] == ["DREAMID_EMBEDS", "IMAGE", "DREAMID_FACE_LAYOUT", "STRING"]
    assert info["DreamID_InjectIDTokens"]["output"] == ["CONDITIONING"]
    assert info["DreamID_ScenePosition"]["output"] == ["CONDITIONING", "CONDITIONING", "IMAGE", "MASK", "MASK", "MASK"]
    assert "mtcnn" in info["DreamID_LoadIDEncoder"]["input"]["required"]["face_detector"][0]


def test_model_folders_merge_with_extra_model_paths(comfyui):
    from comfy_env import load_pack

    nodes = load_pack(comfyui.nodes, PACK)
    paths_module = sys.modules[nodes["DreamID_LoadIDEncoder"].__module__.rsplit(".", 1)[0] + ".adapters.paths"]
    fp = comfyui.folder_paths
    saved = {k: fp.folder_names_and_paths.get(k) for k in ("dreamidentity", "insightface", "dreamid_identities")}
    try:
        # as if extra_model_paths.yaml had registered the user's own folders before the pack imported
        fp.folder_names_and_paths["dreamidentity"] = (["/mnt/models/dreamid"], {".safetensors"})
        fp.folder_names_and_paths.pop("insightface", None)
        paths_module.register_folders()
        dreamid_paths, exts = fp.folder_names_and_paths["dreamidentity"]
        assert dreamid_paths[0] == "/mnt/models/dreamid"  # the user's path kept, first
        assert os.path.join(fp.models_dir, "dreamidentity") in dreamid_paths
        assert {".safetensors", ".pt"} <= set(exts)
        assert fp.folder_names_and_paths["insightface"][0] == [os.path.join(fp.models_dir, "insightface")]
        # identities live in identities/ of EVERY dreamidentity folder, the user's included
        ident_paths = fp.folder_names_and_paths["dreamid_identities"][0]
        assert os.path.join("/mnt/models/dreamid", "identities") in ident_paths
        assert os.path.join(fp.models_dir, "dreamidentity", "identities") in ident_paths
    finally:
        for k, v in saved.items():
            if v is None:
                fp.folder_names_and_paths.pop(k, None)
            else:
                fp.folder_names_and_paths[k] = v
