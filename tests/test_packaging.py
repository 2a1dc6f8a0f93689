"""Packaging promises: requirements.txt agrees with pyproject, torch is never pinned, install.py
keeps exactly one onnxruntime, ruff bans print."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def load_install():
    spec = importlib.util.spec_from_file_location("dreamid_install", ROOT / "install.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_requirements_agree_with_pyproject_and_torch_is_unpinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    reqs = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    assert {r.lower() for r in reqs} == {d.lower() for d in deps if _name(d) != "torch"}
    assert "torch" in deps, "torch is listed, unpinned, for installs outside ComfyUI"
    for spec in deps + reqs + sum(project["optional-dependencies"].values(), []):
        if _name(spec) in ("torch", "torchvision", "torchaudio"):
            assert spec.strip().lower() == _name(spec), f"{spec!r} pins torch"
        assert _name(spec) not in ("onnxruntime", "onnxruntime-gpu"), "install.py chooses the runtime"


def test_comfy_registry_metadata_and_print_is_banned():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = data["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "Icon", "requires-comfyui"} <= set(comfy)
    assert "T20" in data["tool"]["ruff"]["lint"]["select"]
    assert set(data["project"]["optional-dependencies"]) >= {"train", "dev"}


@pytest.mark.parametrize("ort,cuda,override,expected", [
    ({"onnxruntime": "1.20"}, False, None, []),
    ({"onnxruntime": "1.20"}, True, None, [["uninstall", "-y", "onnxruntime"], ["install", "onnxruntime-gpu"]]),
    ({"onnxruntime": "1.20", "onnxruntime-gpu": "1.20"}, True, None,
     [["uninstall", "-y", "onnxruntime", "onnxruntime-gpu"], ["install", "onnxruntime-gpu"]]),
    ({"onnxruntime": "1.20", "onnxruntime-gpu": "1.20"}, False, None,
     [["uninstall", "-y", "onnxruntime", "onnxruntime-gpu"], ["install", "onnxruntime"]]),
    ({"onnxruntime-gpu": "1.20"}, True, None, []),
    ({"onnxruntime-directml": "1.20"}, False, None, []),  # the user's own single flavour stays
    ({}, False, None, [["install", "onnxruntime"]]),
    ({"onnxruntime-gpu": "1.20"}, True, "cpu", [["uninstall", "-y", "onnxruntime-gpu"], ["install", "onnxruntime"]]),
    ({"onnxruntime": "1.20", "onnxruntime-gpu": "1"}, True, "skip", []),
])
def test_install_plan_leaves_exactly_one_onnxruntime(ort, cuda, override, expected):
    install = load_install()
    assert install.plan(ort, cuda, facenet_installed=True, override=override) == expected


def test_install_plan_adds_detector_weights_without_dependencies():
    install = load_install()
    assert install.plan({"onnxruntime": "1"}, False, facenet_installed=False)[-1] == \
        ["install", "--no-deps", "facenet-pytorch==2.6.0"]
    with pytest.raises(ValueError, match="DREAMID_ORT"):
        install.plan({}, False, True, override="tpu")


def test_install_dry_run_runs(capsys):
    install = load_install()
    assert install.main(["--dry-run"]) == 0
    assert sys.executable  # nothing was installed: dry run only logs
