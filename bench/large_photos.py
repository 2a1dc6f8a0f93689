"""Cost of very large photos, which the tests only check for correctness (no wall-clock limits in tests):

- the face pipeline on an 8k photo (4320x6243, six faces) against the same photo at 1280 px,
- MTCNN alone on a 6000 px wide photo,
- aligning a 2000 px face out of an 8k frame (only the face region is read, then shrunk), from a float
  frame and from the photo's bytes (whole blocks averaged first);
- shrinking an 8000x6000 photo to 640 px on its bytes (``resize_rgb``) against the same resize in float,
  and averaging its 12x12 blocks (``block_means``) against PIL's ``reduce``.

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
from dreamid_core.faces.images import block_means, load_image, resize_rgb


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
    photo = resized(group, 6000, 8000)
    points = 3 * ARCFACE_TEMPLATE_112 + np.array([4000.0, 3000.0])  # a face ~350 px wide
    t_float = median_time(lambda: align_face(torch.from_numpy(photo).permute(2, 0, 1).float() / 255, points),
                          args.repeats)
    t_bytes = median_time(lambda: align_face(torch.from_numpy(photo), points), args.repeats)
    print(f"align from float / from bytes  {t_float * 1e3:8.1f} / {t_bytes * 1e3:.1f} ms ({t_float / t_bytes:.1f}x)")
    t_bytes = median_time(lambda: resize_rgb(photo, (480, 640)), args.repeats)
    t_float = median_time(lambda: resized(photo, 480, 640), args.repeats)
    print(f"8000->640 px float / bytes     {t_float * 1e3:8.1f} / {t_bytes * 1e3:.1f} ms ({t_float / t_bytes:.1f}x)")
    from PIL import Image

    t_blocks = median_time(lambda: block_means(photo, 12), args.repeats)
    t_pil = median_time(lambda: Image.fromarray(photo).reduce(12), args.repeats)
    print(f"12x12 blocks PIL / ours        {t_pil * 1e3:8.1f} / {t_blocks * 1e3:.1f} ms ({t_pil / t_blocks:.1f}x)")


if __name__ == "__main__":
    main()
