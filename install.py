"""Install step that ComfyUI-Manager runs after ``requirements.txt`` (or run it yourself).

    python install.py            # fix what needs fixing
    python install.py --dry-run  # only say what it would do

It does two things pip cannot express in requirements.txt:

1. **Exactly one onnxruntime, when insightface is installed.** insightface is optional (the pack's
   built-in MTCNN detector needs neither it nor onnxruntime); without it and without any
   onnxruntime nothing is installed here. insightface depends on the CPU package ``onnxruntime``; installing
   ``onnxruntime-gpu`` beside it makes both write into the same folder, and CUDA face detection
   silently disappears (the most reported install failure of identity packs). When a GPU is usable
   (a CUDA build of torch AND ``torch.cuda.is_available()``: a driver and a device) we keep
   ``onnxruntime-gpu`` alone; otherwise ``onnxruntime`` alone (a CUDA build of torch on a machine
   without a usable GPU gets the CPU package: the GPU one would not run there). A user's own single
   flavour (DirectML, ROCm, OpenVINO, silicon) is left alone. ``DREAMID_ORT=cpu|gpu|skip`` overrides.
2. **The built-in face detector's weights.** ``facenet-pytorch`` carries the MTCNN weights (2 MB) in
   its wheel, but its metadata pins torch < 2.3, so it is installed with ``--no-deps``: only its
   files arrive, ComfyUI's torch is not touched. Its code is never imported.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger("dreamid.install")

FACENET = "facenet-pytorch==2.6.0"


def _runtime():
    """dreamid_core/faces/runtime.py on its own (stdlib only): the onnxruntime flavour list lives there.
    Loaded by path so this script does not import the package (and torch) before it is installed."""
    path = Path(__file__).resolve().parent / "dreamid_core" / "faces" / "runtime.py"
    spec = importlib.util.spec_from_file_location("dreamid_install_runtime", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def facenet_installed() -> bool:
    try:
        md.version("facenet-pytorch")
        return True
    except md.PackageNotFoundError:
        return False


def insightface_installed() -> bool:
    return importlib.util.find_spec("insightface") is not None


def gpu_usable() -> tuple[bool, str]:
    """Whether onnxruntime-gpu could run here, and why (said in the log)."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if sys.platform == "darwin" or not getattr(torch.version, "cuda", None):
        return False, "torch is not a CUDA build"
    try:
        if torch.cuda.is_available():
            return True, f"a CUDA GPU is usable ({torch.cuda.get_device_name(0)})"
    except Exception as exc:  # noqa: BLE001 - a broken driver is "not usable", with its message
        return False, f"torch is a CUDA build but CUDA does not initialise ({exc})"
    return False, "torch is a CUDA build but no GPU is usable here (no driver or no device)"


def plan(ort: dict[str, str], cuda: bool, facenet_installed: bool, override: str | None = None,
         insightface: bool = True) -> list[list[str]]:
    """pip argument lists to run, in order (pure: the tests call it with made-up states).
    ``insightface``: whether insightface is installed; without it no onnxruntime is added, but two
    flavours already installed are still reduced to one."""
    steps: list[list[str]] = []
    if override not in (None, "", "cpu", "gpu", "skip"):
        raise ValueError(f"DREAMID_ORT must be cpu, gpu or skip, got {override!r}")
    if override != "skip" and (insightface or ort):
        want = {"gpu": "onnxruntime-gpu", "cpu": "onnxruntime"}.get(override or "",
                                                                    "onnxruntime-gpu" if cuda else "onnxruntime")
        others = sorted(k for k in ort if k != want)
        own_single = len(ort) == 1 and not override and next(iter(ort)) not in ("onnxruntime", "onnxruntime-gpu")
        if own_single:
            pass  # the user chose a special flavour on purpose
        elif others:
            # uninstall every flavour first: they share files, so removing one breaks the other
            steps.append(["uninstall", "-y", *sorted(ort)])
            steps.append(["install", want])
        elif want not in ort:
            steps.append(["install", want])
    if not facenet_installed:
        steps.append(["install", "--no-deps", FACENET])
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the pip commands without running them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[DreamIdentity install] %(message)s")
    ort = _runtime().onnxruntime_distributions()
    has_insightface = insightface_installed()
    cuda, why = gpu_usable()
    steps = plan(ort, cuda, facenet_installed(), os.environ.get("DREAMID_ORT"), insightface=has_insightface)
    logger.info("onnxruntime now: %s; %s -> %s; insightface: %s", ort or "none", why,
                "onnxruntime-gpu" if cuda else "onnxruntime (CPU)",
                "installed" if has_insightface else "not installed (optional: the built-in detector needs none)")
    if not steps:
        logger.info("nothing to do")
    for step in steps:
        cmd = [sys.executable, "-m", "pip", *step]
        logger.info("%s", " ".join(cmd))
        if not args.dry_run:
            result = subprocess.run(cmd, check=False)
            if result.returncode != 0:
                logger.error("pip failed (exit %d) on: %s. Run it by hand and read pip's message.",
                             result.returncode, " ".join(cmd))
                return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
