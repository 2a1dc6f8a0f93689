"""onnxruntime clash detection and provider choice."""

from __future__ import annotations

import pytest

from dreamid_core.runtime import clash_message, onnxruntime_distributions, select_providers


def test_clash_message_names_both_and_the_fix():
    msg = clash_message({"onnxruntime": "1.20.0", "onnxruntime-gpu": "1.20.0"})
    assert "onnxruntime 1.20.0, onnxruntime-gpu 1.20.0" in msg
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in msg and "pip install onnxruntime-gpu" in msg
    assert clash_message({"onnxruntime": "1.20.0"}) is None and clash_message({}) is None


def test_installed_flavours_are_read_without_importing():
    found = onnxruntime_distributions()
    assert isinstance(found, dict) and all(k.startswith("onnxruntime") for k in found)


def test_provider_choice_with_cpu_fallback():
    avail = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers("auto", avail) == (["CUDAExecutionProvider", "CPUExecutionProvider"], None)
    assert select_providers("cpu", avail) == (["CPUExecutionProvider"], None)
    providers, note = select_providers("coreml", avail)
    assert providers == ["CPUExecutionProvider"] and "coreml was asked for" in note and "CPU" in note
    assert select_providers("auto", ["CPUExecutionProvider"]) == (["CPUExecutionProvider"], None)
    with pytest.raises(ValueError, match="must be one of"):
        select_providers("tpu", avail)
