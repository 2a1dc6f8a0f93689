"""onnxruntime housekeeping: detect the CPU/GPU package clash, choose execution providers, and put them on
the right GPU (:func:`provider_options`: without ``device_id`` every session runs on GPU 0, whatever
device the process was given).

``onnxruntime`` and ``onnxruntime-gpu`` (or -directml, -rocm, -silicon, -openvino) install into
the same ``onnxruntime`` folder; with two of them installed the last one written wins file by
file and the CUDA provider silently disappears. :func:`onnxruntime_distributions` reads what is
installed without importing it; :func:`check_onnxruntime` logs a warning with the fix.

Standard library only: install.py loads this file by path before the pack's dependencies exist.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import sys

logger = logging.getLogger(__name__)

ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-rocm",
                     "onnxruntime-silicon", "onnxruntime-openvino", "onnxruntime-qnn")

#: provider choice -> onnxruntime provider names, most preferred first (CPU is always appended)
PROVIDER_CHOICES: dict[str, tuple[str, ...]] = {
    "auto": ("CUDAExecutionProvider", "ROCMExecutionProvider", "CoreMLExecutionProvider",
             "DmlExecutionProvider"),
    "cpu": (),
    "cuda": ("CUDAExecutionProvider",),
    "rocm": ("ROCMExecutionProvider", "MIGraphXExecutionProvider"),
    "coreml": ("CoreMLExecutionProvider",),
    "directml": ("DmlExecutionProvider",),
}


#: providers that run on one of several GPUs, chosen by their ``device_id`` option
GPU_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "MIGraphXExecutionProvider",
                 "TensorrtExecutionProvider", "DmlExecutionProvider")


def onnxruntime_distributions() -> dict[str, str]:
    """Installed onnxruntime flavours: ``{distribution name: version}``."""
    found = {}
    for name in ORT_DISTRIBUTIONS:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return found


def clash_message(found: dict[str, str]) -> str | None:
    """The warning to show when several onnxruntime flavours are installed, else None."""
    if len(found) < 2:
        return None
    listed = ", ".join(f"{k} {v}" for k, v in sorted(found.items()))
    keep = "onnxruntime-gpu" if "onnxruntime-gpu" in found else sorted(found)[-1]
    others = " ".join(sorted(k for k in found if k != keep))
    return (f"Several onnxruntime packages are installed together ({listed}). They overwrite each other's "
            f"files and GPU face detection silently falls back to the CPU or breaks. Fix: "
            f"'{sys.executable} -m pip uninstall -y {others} {keep}' then "
            f"'{sys.executable} -m pip install {keep}' (or run this pack's install.py, which does it).")


def check_onnxruntime() -> str | None:
    """Log (once per call) and return the clash warning, if any."""
    msg = clash_message(onnxruntime_distributions())
    if msg:
        logger.warning(msg)
    return msg


def select_providers(choice: str, available: list[str]) -> tuple[list[str], str | None]:
    """Providers to ask onnxruntime for, and a note when the choice had to fall back to CPU."""
    if choice not in PROVIDER_CHOICES:
        raise ValueError(f"execution provider must be one of {sorted(PROVIDER_CHOICES)}, got {choice!r}")
    wanted = PROVIDER_CHOICES[choice]
    chosen = [p for p in wanted if p in available]
    if choice == "auto":
        chosen = chosen[:1]
    note = None
    if wanted and not chosen and choice != "auto":
        note = (f"{choice} was asked for but onnxruntime offers only {available}; face detection runs on the "
                "CPU. For CUDA install onnxruntime-gpu alone (see the README's onnxruntime section).")
        clash = clash_message(onnxruntime_distributions())
        if clash:
            note += " " + clash
    return chosen + ["CPUExecutionProvider"], note


def device_index(device: object) -> int | None:
    """The GPU index of a torch-style device (``"cuda:1"``, ``torch.device("cuda", 1)``: 1), or None for a
    device without one (``"cuda"``, ``"cpu"``, None: the provider's default, GPU 0)."""
    kind, _, index = str(device if device is not None else "").partition(":")
    if kind == "cpu" or not index.isdigit():
        return None
    return int(index)


def provider_options(providers: list[str], device: object = None) -> list[dict[str, int]]:
    """onnxruntime's ``provider_options`` for ``providers`` (one dict each): ``{"device_id": N}`` for the GPU
    providers when ``device`` is GPU N, so a process given ``cuda:N`` detects and scores there too."""
    index = device_index(device)
    return [{"device_id": index} if index is not None and p in GPU_PROVIDERS else {} for p in providers]
