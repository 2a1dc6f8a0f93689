"""The face detector of a training-stack step, on that step's device.

:func:`dreamid_core.make_detector` hands ``device`` to MTCNN only; the insightface detector's onnxruntime
session would run on GPU 0 for every shard. Here it gets the shard's GPU too
(:class:`dreamid_core.insightface_detector.InsightFaceDetector`'s ``device``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dreamid_core import make_detector
from dreamid_core.detection import FaceDetector


def make_face_detector(name: str, *, insightface_root: str | Path | None, provider: str,
                       device: Any) -> FaceDetector:
    """``name`` as :func:`dreamid_core.make_detector` takes it, on ``device`` (``"cuda:N"``: GPU N)."""
    if name.startswith("insightface/") and insightface_root is not None:
        from dreamid_core.insightface_detector import InsightFaceDetector

        return InsightFaceDetector(insightface_root, name.split("/", 1)[1], provider=provider, device=str(device))
    return make_detector(name, insightface_root=insightface_root, provider=provider, device=str(device))
