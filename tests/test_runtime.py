"""onnxruntime clash detection and provider choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dreamid_core.faces.runtime import clash_message, select_providers

ROOT = Path(__file__).resolve().parents[1]


def test_clash_message_names_both_and_the_fix():
    msg = clash_message({"onnxruntime": "1.20.0", "onnxruntime-gpu": "1.20.0"})
    assert "onnxruntime 1.20.0, onnxruntime-gpu 1.20.0" in msg
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in msg and "pip install onnxruntime-gpu" in msg
    assert clash_message({"onnxruntime": "1.20.0"}) is None and clash_message({}) is None


def _fake_distribution(root: Path, name: str, version: str) -> None:
    """An installed distribution's metadata, whose package raises if anything imports it."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    package = root / "onnxruntime"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("raise RuntimeError('onnxruntime was imported')\n")


CHILD = """
import json, sys
import dreamid_core
from dreamid_core.faces.runtime import check_onnxruntime, onnxruntime_distributions
found = onnxruntime_distributions()
warning = check_onnxruntime()
print(json.dumps({"found": found, "warning": warning,
                  "imported": sorted(m for m in sys.modules if m.split(".")[0] in ("onnxruntime", "insightface"))}))
"""


def test_installed_flavours_are_read_without_importing(tmp_path):
    # two flavours "installed" whose package raises on import: reading them must not import it
    _fake_distribution(tmp_path, "onnxruntime", "9.8.7")
    _fake_distribution(tmp_path, "onnxruntime-gpu", "9.8.6")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["found"]["onnxruntime"] == "9.8.7" and result["found"]["onnxruntime-gpu"] == "9.8.6"
    assert "onnxruntime 9.8.7, onnxruntime-gpu 9.8.6" in result["warning"]
    assert result["imported"] == []  # neither onnxruntime nor insightface came in with the package


def test_provider_choice_with_cpu_fallback():
    avail = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers("auto", avail) == (["CUDAExecutionProvider", "CPUExecutionProvider"], None)
    assert select_providers("cpu", avail) == (["CPUExecutionProvider"], None)
    providers, note = select_providers("coreml", avail)
    assert providers == ["CPUExecutionProvider"] and "coreml was asked for" in note and "CPU" in note
    assert select_providers("auto", ["CPUExecutionProvider"]) == (["CPUExecutionProvider"], None)
    with pytest.raises(ValueError, match="must be one of"):
        select_providers("tpu", avail)


def test_gpu_providers_get_the_device_id_of_the_process_device():
    """Without device_id onnxruntime puts every session on GPU 0, whatever GPU the shard was given."""
    from dreamid_core.faces.runtime import device_index, provider_options

    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert provider_options(cuda, "cuda:3") == [{"device_id": 3}, {}]
    assert provider_options(["ROCMExecutionProvider", "CPUExecutionProvider"], "cuda:1") == [{"device_id": 1}, {}]
    assert provider_options(cuda, "cuda") == provider_options(cuda, None) == provider_options(cuda, "cpu") == [{}, {}]
    assert provider_options(["CPUExecutionProvider"], "cuda:2") == [{}]
    assert [device_index(d) for d in ("cuda:0", "cuda:7", "cuda", "cpu", None)] == [0, 7, None, None, None]
