"""Encoding cost per face: detection, alignment, backbone (vit_s shape) and projection, against a
CLIP-ViT-L/14 image tower at 224 px (PhotoMaker's ID encoder), measured side by side in one run.

    python bench/encode.py [--device cpu|cuda] [--repeats 5]

Random weights (no hub is reachable); shapes are the published ones. The paper's anchor: 0.04 s
per identity on a GPU. Detection uses the built-in MTCNN with its real weights on a real photo.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dreamid_core import BackboneConfig, EncoderConfig, FacePipeline, IDEncoder, make_detector
from dreamid_core.align import align_face
from dreamid_core.images import load_image, to_tensor


def timed(fn, repeats: int, sync) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def clip_l14_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    return CLIPVisionModelWithProjection(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    spec = importlib.util.find_spec("insightface")
    photo_path = Path(spec.origin).parent / "data" / "images" / "t1.jpg"
    group = load_image(photo_path)
    portrait = np.ascontiguousarray(group[120:520, 330:730])  # 400x400 px, one main face
    pipeline = FacePipeline(make_detector("mtcnn", device=args.device))
    detection = pipeline.detect(portrait)[0][0]

    torch.manual_seed(0)
    encoder = IDEncoder(EncoderConfig.for_target("sd2", BackboneConfig.preset("vit_s"))).to(device).eval()
    clip = clip_l14_vision().to(device).eval()
    n_bb = sum(p.numel() for p in encoder.backbone.parameters()) / 1e6
    n_proj = sum(p.numel() for p in encoder.projections.parameters()) / 1e6
    n_clip = sum(p.numel() for p in clip.parameters()) / 1e6
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"face ViT vit_s {n_bb:.1f} M params, projection (k=2 MLPs) {n_proj:.1f} M, "
          f"CLIP-ViT-L/14 vision {n_clip:.1f} M")
    print(f"{'batch':>5} | {'detect':>9} | {'align':>8} | {'backbone':>9} | {'project':>8} | {'ours total':>10} | "
          f"{'CLIP-L/14':>9} | {'CLIP/ours (encoders)':>20}")
    image_t = to_tensor(portrait)
    for batch in (1, 8):
        det = timed(lambda b=batch: [pipeline.detector.detect(portrait) for _ in range(b)], args.repeats, sync) / batch
        ali = timed(lambda b=batch: [align_face(image_t, detection.landmarks) for _ in range(b)], args.repeats,
                    sync) / batch
        faces = torch.rand(batch, 3, 112, 112, device=device)
        pixels = torch.rand(batch, 3, 224, 224, device=device)
        with torch.inference_mode():
            v = encoder.features(faces)
            bb = timed(lambda f=faces: encoder.features(f), args.repeats, sync) / batch
            pr = timed(lambda x=v: encoder.project(x), args.repeats, sync) / batch
            cl = timed(lambda p=pixels: clip(pixel_values=p).image_embeds, args.repeats, sync) / batch
        total = det + ali + bb + pr
        print(f"{batch:>5} | {det * 1e3:>7.1f}ms | {ali * 1e3:>6.2f}ms | {bb * 1e3:>7.2f}ms | {pr * 1e3:>6.3f}ms | "
              f"{total * 1e3:>8.1f}ms | {cl * 1e3:>7.2f}ms | {cl / (bb + pr):>19.2f}x")
    print("per face; 'ours total' = detection + alignment + backbone + projection. Paper anchor: 40 ms per identity (GPU).")


if __name__ == "__main__":
    main()
