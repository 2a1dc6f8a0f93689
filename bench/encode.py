"""Encoding cost per face, photo -> S*: detection, alignment, backbone (vit_s shape) and projection,
against a CLIP-ViT-L/14 image tower at 224 px (PhotoMaker's ID encoder), measured side by side in one run.

    python bench/encode.py [--device cpu|cuda] [--repeats 3] [--threads N] [--clock wall|cpu]

Photo sets (from the insightface wheel's t1.jpg): a 400 px portrait, the 1280 px group photo,
an 8000x6000 photo, and a batch of 8 photos of different sizes. Detection and alignment are what
the identity path runs (``FacePipeline.detect``: shrink to 640 px + detector; ``FacePipeline.align``
on the full-resolution photo), with the built-in MTCNN and its real weights: "old" is the cascade
before the batched rewrite (tests/mtcnn_reference.py) searching every face, "all" the current one
searching every face, "ident" the current one as the identity path runs it (the largest face only:
the quick search for faces from ``quick_min_face`` px up, then the full one if that finds none so
large). Their repeats are interleaved with the encoders' so a loaded machine slows all alike (read
the ratios).
Encoders have random weights (no hub is reachable); shapes are the published ones.
Paper anchor: 0.04 s per identity on a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreamid_core import BackboneConfig, EncoderConfig, FacePipeline, IDEncoder, make_detector
from dreamid_core.faces.images import to_rgb_list
from dreamid_core.faces.pipeline import _resize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the old cascade, kept as a reference
from mtcnn_reference import ReferenceMTCNN  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fns: dict[str, object], repeats: int, sync, clock=time.perf_counter) -> dict[str, float]:
    """Median seconds of each ``fn()`` over ``repeats`` runs after one warm-up, the runs interleaved."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    sync()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            sync()
            times[name].append(clock() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def clip_l14_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    return CLIPVisionModelWithProjection(cfg)


def photo_sets() -> dict[str, list[np.ndarray]]:
    spec = importlib.util.find_spec("insightface")
    with Image.open(Path(spec.origin).parent / "data" / "images" / "t1.jpg") as im:
        group = im.convert("RGB")
    portrait = group.crop((330, 120, 730, 520))  # 400x400, one main face
    batch = []
    for i, side in enumerate((320, 480, 640, 800, 1024, 1280, 1600, 2400)):
        src = group if i % 2 == 0 else portrait
        batch.append(src.resize((side, round(side * src.height / src.width)), Image.Resampling.BILINEAR))
    return {"portrait 400x400": [np.asarray(portrait)], "group 1280x886": [np.asarray(group)],
            "photo 8000x6000": [np.asarray(group.resize((8000, 6000), Image.Resampling.BILINEAR))],
            "8 photos 320-2400 px": [np.asarray(p) for p in batch]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (steadier on a shared machine "
                             "with --threads 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    mtcnn = make_detector("mtcnn", device=args.device)
    pipelines = {"old": FacePipeline(ReferenceMTCNN(device=args.device)), "all": FacePipeline(mtcnn),
                 "ident": FacePipeline(mtcnn)}
    largest_only = {"old": False, "all": False, "ident": True}
    torch.manual_seed(0)
    encoder = IDEncoder(EncoderConfig.for_target("sd2", BackboneConfig.preset("vit_s"))).to(device).eval()
    clip = clip_l14_vision().to(device).eval()
    n_bb = sum(p.numel() for p in encoder.backbone.parameters()) / 1e6
    n_proj = sum(p.numel() for p in encoder.projections.parameters()) / 1e6
    n_clip = sum(p.numel() for p in clip.parameters()) / 1e6
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.clock} clock, median of {args.repeats}")
    print(f"face ViT vit_s {n_bb:.1f} M params, projection (k=2 MLPs) {n_proj:.1f} M, "
          f"CLIP-ViT-L/14 vision {n_clip:.1f} M")

    print(f"{'photos':>21} | {'MTCNN':>5} | {'detect':>8} | {'align':>7} | {'backbone':>8} | {'project':>7} | "
          f"{'ours e2e':>8} | {'CLIP-L/14':>9} | {'CLIP/ours':>9} | {'det+align / backbone':>20}")
    for name, photos in photo_sets().items():
        n = len(photos)
        found = {k: [p.detect(photo, largest_only=largest_only[k])[0][0] for photo in photos]
                 for k, p in pipelines.items()}
        faces = torch.rand(n, 3, 112, 112, device=device)
        pixels = torch.rand(n, 3, 224, 224, device=device)
        fns = {}
        for k, p in pipelines.items():
            fns[f"det {k}"] = lambda p=p, ph=photos, q=largest_only[k]: [p.detect(x, largest_only=q) for x in ph]
            fns[f"align {k}"] = lambda p=p, ph=photos, f=found[k]: [p.align(x, d) for x, d in zip(ph, f, strict=True)]
        with torch.inference_mode():
            v = encoder.features(faces)
            fns.update({"backbone": lambda f=faces: encoder.features(f), "project": lambda x=v: encoder.project(x),
                        "clip": lambda x=pixels: clip(pixel_values=x).image_embeds})
            t = {key: sec / n for key, sec in timed(fns, args.repeats, sync, CLOCKS[args.clock]).items()}
        bb, pr, cl = t["backbone"], t["project"], t["clip"]
        for k in pipelines:
            d, a = t[f"det {k}"], t[f"align {k}"]
            total = d + a + bb + pr
            print(f"{name:>21} | {k:>5} | {d * 1e3:>6.1f}ms | {a * 1e3:>5.1f}ms | {bb * 1e3:>6.1f}ms | "
                  f"{pr * 1e3:>5.2f}ms | {total * 1e3:>6.1f}ms | {cl * 1e3:>7.1f}ms | {cl / total:>8.2f}x | "
                  f"{(d + a) / bb:>20.2f}")
        print(f"{'':>21} | detection old/all {t['det old'] / t['det all']:.2f}x, "
              f"all/ident {t['det all'] / t['det ident']:.2f}x; "
              f"encoders alone CLIP/(backbone + project) {cl / (bb + pr):.2f}x")
        comfy = [torch.from_numpy(photo).float().div_(255.0)[None] for photo in photos]  # ComfyUI IMAGE [1, H, W, 3]
        conv = timed({"to uint8": lambda c=comfy: [to_rgb_list(x) for x in c]}, args.repeats, lambda: None,
                     CLOCKS[args.clock])["to uint8"] / n
        print(f"{'':>21} | a ComfyUI float IMAGE to uint8 first (the node's path, not in 'ours e2e'): {conv * 1e3:.1f}ms")
        del comfy
        if n > 1:  # the same photos through one cascade call (what a batched caller could use)
            small = [_resize(photo, min(1.0, pipelines["all"].det_size / max(photo.shape[:2]))) for photo in photos]
            detector = pipelines["all"].detector
            t = timed({"loop": lambda d=detector, s=small: [d.detect(x) for x in s],
                       "batch": lambda d=detector, s=small: d.detect_batch(s)}, args.repeats, sync, CLOCKS[args.clock])
            print(f"{'':>21} | detector alone on the 640 px copies: one call per photo {t['loop'] / n * 1e3:.1f}ms, "
                  f"detect_batch {t['batch'] / n * 1e3:.1f}ms per photo")
    print("per face; batch 1 for single photos, 8 for the batch. 'ours e2e' = detection + alignment + backbone + "
          "projection; CLIP/ours = CLIP-L/14 tower alone / ours e2e (goal >= 12x on the CPU).")


if __name__ == "__main__":
    main()
