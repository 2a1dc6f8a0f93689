"""insightface detector backend (antelopev2 / buffalo_l packs the user provides).

Folder handling is where users get hurt most, so it is explicit: we accept
``<root>/models/<pack>/*.onnx`` (ComfyUI's ``models/insightface``), ``<root>/<pack>/*.onnx``, the
pack folder itself, and the common nested mistake ``.../<pack>/<pack>/*.onnx``; when files are
missing the error names the folder searched and the files expected. Nothing is downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import MissingDependencyError, ModelFilesError
from .detection import Detection
from .runtime import check_onnxruntime, device_index, provider_options, select_providers

logger = logging.getLogger(__name__)

#: The files of each pack, and which one is the face detector.
PACKS: dict[str, dict[str, object]] = {
    "antelopev2": {"detector": "scrfd_10g_bnkps.onnx",
                   "files": ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx",
                             "scrfd_10g_bnkps.onnx")},
    "buffalo_l": {"detector": "det_10g.onnx",
                  "files": ("1k3d68.onnx", "2d106det.onnx", "det_10g.onnx", "genderage.onnx", "w600k_r50.onnx")},
}


def resolve_pack_dir(root: str | Path, pack: str) -> Path:
    """The folder holding ``pack``'s detector file, accepting the usual layouts (see module doc)."""
    if pack not in PACKS:
        raise ValueError(f"unknown insightface pack {pack!r}; supported: {sorted(PACKS)}")
    root = Path(root).expanduser()
    detector = str(PACKS[pack]["detector"])
    candidates = [root / "models" / pack, root / pack, root, root / "models" / pack / pack, root / pack / pack]
    for folder in candidates:
        if (folder / detector).is_file():
            if folder.parent.name == pack:
                logger.info("insightface %s found one folder too deep (%s); it works, but the usual place is %s",
                            pack, folder, folder.parent)
            return folder
    present = sorted(p.name for c in candidates if c.is_dir() for p in c.glob("*.onnx"))
    expected = ", ".join(PACKS[pack]["files"])  # type: ignore[arg-type]
    where = root / "models" / pack
    if not root.exists():
        problem = f"the folder {root} does not exist"
    elif present:
        problem = f"found only {present} (the detector {detector} is missing)"
    else:
        problem = f"no .onnx files under {root}"
    raise ModelFilesError(
        f"insightface pack {pack!r} not usable: {problem}. Put the pack's files in {where}/ — expected "
        f"{expected} (the detector alone, {detector}, is enough for DreamIdentity). Or choose the built-in "
        "detector (mtcnn), which needs no download.")


def _unreadable_onnx(path: Path) -> str | None:
    """Why ``path`` is not a loadable ONNX model (empty, a Git LFS pointer, corrupt), or None if it is."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(64)
    except OSError as exc:
        return f"it cannot be read ({exc})"
    if size == 0:
        return "the file is empty (0 bytes)"
    if head.startswith(b"version https://git-lfs"):
        return f"it is a {size}-byte Git LFS pointer, not the model (download the file itself)"
    try:
        import onnx

        model = onnx.load_model(str(path), load_external_data=False)
    except ImportError:
        return None
    except Exception as exc:  # protobuf's DecodeError and friends
        return f"it does not parse as ONNX ({size} bytes; {type(exc).__name__}: {exc})"
    if not model.graph.node or not model.graph.output:
        return f"it holds no network ({size} bytes)"
    return None


class InsightFaceDetector:
    """insightface's SCRFD detector from a local pack, on the chosen onnxruntime provider."""

    def __init__(self, root: str | Path, pack: str = "antelopev2", *, provider: str = "auto",
                 det_size: int = 640, det_thresh: float = 0.5, device: object = None) -> None:
        """``device``: a torch-style device (``"cuda:1"``) whose GPU the session uses; None: GPU 0."""
        self.pack_dir = resolve_pack_dir(root, pack)
        self.name = f"insightface/{pack}"
        self.det_size = det_size
        try:
            import onnxruntime
            from insightface.model_zoo import model_zoo
        except ImportError as exc:
            raise MissingDependencyError(
                f"the insightface detector needs insightface and onnxruntime ({exc}). Install them with "
                "'python -m pip install insightface' and run this pack's install.py to pick the right "
                "onnxruntime, or use the built-in detector (mtcnn).") from exc
        check_onnxruntime()
        providers, note = select_providers(provider, onnxruntime.get_available_providers())
        if note:
            logger.warning(note)
        self.providers = providers
        self.provider_options = provider_options(providers, device)
        detector_file = self.pack_dir / str(PACKS[pack]["detector"])
        try:
            self._model = model_zoo.get_model(str(detector_file), providers=providers,
                                              provider_options=self.provider_options)
        except Exception as exc:  # onnxruntime's own error types (InvalidProtobuf, ...) are not importable stably
            problem = _unreadable_onnx(detector_file)
            if problem is None:
                raise  # the file is fine: a provider/runtime problem, keep onnxruntime's message
            raise ModelFilesError(
                f"{detector_file} is not a usable ONNX file: {problem}. The download is incomplete or "
                f"corrupted: download the {pack} pack again and replace the files in {self.pack_dir} "
                f"(onnxruntime said: {type(exc).__name__}: {exc})") from exc
        if self._model is None or getattr(self._model, "taskname", None) != "detection":
            raise ModelFilesError(f"{detector_file} is not a face detection model insightface recognises; "
                                  f"download the {pack} pack again.")
        on_gpu = providers[0] != "CPUExecutionProvider"
        self._model.prepare(ctx_id=(device_index(device) or 0) if on_gpu else -1,
                            input_size=(det_size, det_size), det_thresh=det_thresh)

    def detect(self, image: np.ndarray) -> list[Detection]:
        bgr = np.ascontiguousarray(image[..., ::-1])
        boxes, kps = self._model.detect(bgr, max_num=0, metric="default")
        out = []
        for i in range(boxes.shape[0]):
            x1, y1, x2, y2, score = (float(v) for v in boxes[i, :5])
            lm = kps[i].astype(np.float32) if kps is not None else np.zeros((5, 2), np.float32)
            out.append(Detection(box=(x1, y1, x2, y2), score=score, landmarks=lm))
        return sorted(out, key=lambda d: d.score, reverse=True)
