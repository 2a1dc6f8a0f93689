"""Packaging promises: requirements.txt agrees with pyproject, torch is never pinned, install.py
keeps exactly one onnxruntime, ruff bans print."""

from __future__ import annotations

import importlib.util
import logging
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


@pytest.fixture
def install_needing_work(monkeypatch):
    """install.py in a state with work to do (two onnxruntime flavours on a CUDA torch, no MTCNN
    weights), with pip replaced by a recorder that answers with ``rc`` (settable)."""
    install = load_install()
    calls = []
    state = {"rc": 0}

    def fake_run(cmd, check=False):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, state["rc"])

    monkeypatch.setattr(install, "_runtime", lambda: SimpleNamespace(
        onnxruntime_distributions=lambda: {"onnxruntime": "1.20", "onnxruntime-gpu": "1.20"}))
    monkeypatch.setattr(install, "gpu_usable", lambda: (True, "a CUDA GPU is usable (test)"))
    monkeypatch.setattr(install, "facenet_installed", lambda: False)
    monkeypatch.setattr(install.subprocess, "run", fake_run)
    monkeypatch.delenv("DREAMID_ORT", raising=False)
    return install, calls, state


PIP_STEPS = [["uninstall", "-y", "onnxruntime", "onnxruntime-gpu"], ["install", "onnxruntime-gpu"],
             ["install", "--no-deps", "facenet-pytorch==2.6.0"]]


def test_install_dry_run_only_says_what_it_would_run(install_needing_work, caplog):
    install, calls, _ = install_needing_work
    with caplog.at_level(logging.INFO, logger="dreamid.install"):
        assert install.main(["--dry-run"]) == 0
    assert calls == []  # nothing was run
    for step in PIP_STEPS:
        assert " ".join([sys.executable, "-m", "pip", *step]) in caplog.text


def test_install_runs_the_plan_and_stops_at_a_failing_pip(install_needing_work):
    install, calls, state = install_needing_work
    assert install.main([]) == 0
    assert calls == [[sys.executable, "-m", "pip", *step] for step in PIP_STEPS]
    calls.clear()
    state["rc"] = 3
    assert install.main([]) == 3 and len(calls) == 1  # the first failure stops the rest


def test_install_decides_by_a_usable_gpu_not_by_the_torch_build(monkeypatch):
    """A CUDA build of torch on a machine without a usable GPU gets the CPU onnxruntime."""
    install = load_install()
    fake = SimpleNamespace(version=SimpleNamespace(cuda="12.4"),
                           cuda=SimpleNamespace(is_available=lambda: False, get_device_name=lambda i: "none"))
    monkeypatch.setitem(sys.modules, "torch", fake)
    cuda, why = install.gpu_usable()
    assert not cuda and "no GPU is usable" in why
    assert install.plan({}, cuda, True)[0] == ["install", "onnxruntime"]
    fake.cuda.is_available = lambda: True
    assert install.gpu_usable()[0]


def test_install_script_runs_on_its_own():
    """install.py loads the onnxruntime helpers by path (before the package can be imported): the path exists
    and the dry run works in a fresh process."""
    import subprocess

    out = subprocess.run([sys.executable, str(ROOT / "install.py"), "--dry-run"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "onnxruntime now:" in out.stderr
