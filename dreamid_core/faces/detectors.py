"""Pick a face detector by name: the built-in MTCNN (weights from the facenet-pytorch wheel, no
download) or an insightface pack the user put under ``models/insightface``."""

from __future__ import annotations

from pathlib import Path

from .detection import FaceDetector
from .insightface_detector import PACKS

BUILTIN = "mtcnn"


def detector_names() -> list[str]:
    """Every detector name :func:`make_detector` accepts."""
    return [BUILTIN] + [f"insightface/{p}" for p in PACKS]


def make_detector(name: str = BUILTIN, *, insightface_root: str | Path | None = None, provider: str = "auto",
                  device: str = "cpu", det_size: int = 640) -> FaceDetector:
    """``"mtcnn"`` or ``"insightface/<pack>"`` (then ``insightface_root`` is the models/insightface folder), on
    ``device`` (for insightface's onnxruntime session: ``"cuda:N"`` runs the GPU providers on GPU N)."""
    if name == BUILTIN:
        from .mtcnn import MTCNNDetector

        return MTCNNDetector(device=device)
    if name.startswith("insightface/"):
        pack = name.split("/", 1)[1]
        if insightface_root is None:
            raise ValueError(f"detector {name!r} needs insightface_root (the folder holding models/{pack}/)")
        from .insightface_detector import InsightFaceDetector

        return InsightFaceDetector(insightface_root, pack, provider=provider, det_size=det_size, device=str(device))
    raise ValueError(f"unknown face detector {name!r}; choose one of {detector_names()}")
