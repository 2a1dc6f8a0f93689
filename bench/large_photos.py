"""Cost of very large photos, which the tests only check for correctness (no wall-clock limits in tests):

- the face pipeline on an 8k photo (4320x6243, six faces) against the same photo at 1280 px,
- MTCNN alone on a 6000 px wide photo,
- aligning a 2000 px face out of an 8k frame (only the face region is read, then shrunk).

    python bench/large_photos.py [--repeats 3]

Needs the insightface wheel (sample photo) and facenet-pytorch (MTCNN weights), like the tests.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import torch
from timing import median_time

from dreamid_core import FacePipeline, make_detector
from dreamid_core.faces.align import ARCFACE_TEMPLATE_112, align_face
from dreamid_core.faces.images import load_image


def resized(image: np.ndarray, height: int, width: int) -> np.ndarray:
    t = torch.from_numpy(image).permute(2, 0, 1)[None].float()  # [1, 3, H, W]
    out = torch.nn.functional.interpolate(t, size=(height, width), mode="bilinear")[0]
    return np.ascontiguousarray(out.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spec = importlib.util.find_spec("insightface")
    if spec is None or spec.origin is None:
        raise SystemExit("needs the insightface wheel for its sample photo (pip install insightface)")
    group = load_image(Path(spec.origin).parent / "data" / "images" / "t1.jpg")  # 1280 px wide
    detector = make_detector("mtcnn", device="cpu")
    pipeline = FacePipeline(detector)
    big = resized(group, 4320, 6243)
    wide = resized(group, round(group.shape[0] * 6000 / group.shape[1]), 6000)
    small = median_time(lambda: pipeline.process_one(group), args.repeats)
    huge = median_time(lambda: pipeline.process_one(big), args.repeats)
    print(f"face pipeline, 1280 px photo   {small * 1e3:8.1f} ms")
    print(f"face pipeline, 8k photo        {huge * 1e3:8.1f} ms  ({huge / small:.1f}x)")
    print(f"MTCNN alone, 6000 px photo     {median_time(lambda: detector.detect(wide), args.repeats) * 1e3:8.1f} ms")
    frame = torch.zeros(3, 4320, 7680)
    points = 18 * ARCFACE_TEMPLATE_112 + np.array([3000.0, 1000.0])
    print(f"align, 2000 px face in 8k      {median_time(lambda: align_face(frame, points), args.repeats) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
