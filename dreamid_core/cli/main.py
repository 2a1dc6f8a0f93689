"""``python -m dreamid_core`` (or ``dreamid``): photos -> aligned face crops [-> S* embedding file].

Without ComfyUI: detects and aligns faces with the built-in detector (no downloads) and writes the
112x112 crops; given an encoder file, also writes S* as a standard textual-inversion
``.safetensors`` that ComfyUI (``embedding:NAME``), A1111 and diffusers' ``load_textual_inversion``
read. Prints a JSON summary on stdout; progress and warnings go to the log (stderr).

``python -m dreamid_core download [WORKFLOW ...] --comfyui PATH`` fetches the public model files the
workflows list into ComfyUI's folders (see :mod:`dreamid_core.cli.download`); a photo that is literally
named ``download`` is passed as ``./download``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from pathlib import Path

from ..encoder.identity import encode_identity
from ..encoder.model import COMBINE_MODES
from ..encoder.weights import load_encoder, read_encoder_config
from ..errors import DreamIDError
from ..faces.detectors import BUILTIN, detector_names, make_detector
from ..faces.images import crop_to_uint8, load_image
from ..faces.pipeline import ON_MISSING, ORDERS, FacePipeline
from ..identities.embedding_io import sanitize_name
from ..identities.learned_identity import write_embedding
from .runner import HelpFormatter, describe, run_main

logger = logging.getLogger("dreamid_core")


def sample_photo() -> Path:
    """The group photo that ships inside the insightface wheel (for trying the tool)."""
    spec = importlib.util.find_spec("insightface")
    if spec is None or spec.origin is None:
        raise DreamIDError("--sample needs the insightface package (its wheel carries the sample photo): "
                           "pip install insightface")
    return Path(spec.origin).parent / "data" / "images" / "t1.jpg"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dreamid_core", description=describe(__doc__),
                                epilog="python -m dreamid_core download --help: fetch the models the workflows list",
                                formatter_class=HelpFormatter)
    p.add_argument("photos", nargs="*", type=Path, help="photos of ONE person (several are averaged)")
    p.add_argument("--sample", action="store_true", help="add the sample photo shipped with insightface")
    p.add_argument("--out-dir", type=Path, default=Path("dreamid_out"), help="where crops (and S*) are written")
    p.add_argument("--detector", default=BUILTIN, choices=detector_names())
    p.add_argument("--insightface-root", type=Path, help="folder holding models/<pack>/ for insightface detectors")
    p.add_argument("--provider", default="auto", help="onnxruntime provider for insightface: auto/cpu/cuda/rocm/coreml")
    p.add_argument("--face-index", type=int, default=0, help="which face when a photo has several")
    p.add_argument("--order", default="largest", choices=ORDERS, help="how face_index counts faces")
    p.add_argument("--on-missing", default="error", choices=ON_MISSING, help="photo without a face: stop or skip")
    p.add_argument("--encoder", type=Path, help="DreamIdentity encoder .safetensors; writes S* when given")
    p.add_argument("--backbone", type=Path, help="arcface_torch backbone, if the encoder file has none")
    p.add_argument("--name", default="dreamid_identity", help="embedding file name (without .safetensors)")
    p.add_argument("--scale", type=float, default=1.0, help="strength: multiplies S* (0 turns it off)")
    p.add_argument("--combine", default="average", choices=COMBINE_MODES, help="how several photos combine")
    p.add_argument("--overwrite", action="store_true", help="replace an existing embedding file")
    p.add_argument("--info", type=Path, metavar="ENCODER", help="print an encoder file's config and exit")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def run(args: argparse.Namespace) -> dict:
    if args.info:
        config, provenance, contents = read_encoder_config(args.info)
        return {"file": str(args.info), "contents": contents, "config": config.to_dict(), "provenance": provenance}
    photos = list(args.photos) + ([sample_photo()] if args.sample else [])
    if not photos:
        raise DreamIDError("no photos given: pass one or more photo paths (or --sample to try the tool)")
    detector = make_detector(args.detector, insightface_root=args.insightface_root, provider=args.provider)
    pipeline = FacePipeline(detector)
    images = [load_image(p) for p in photos]
    embeds = None
    if args.encoder:  # the same photo -> S* path as the ComfyUI node (identity.encode_identity)
        encoder = load_encoder(args.encoder, backbone_path=args.backbone)
        embeds, report = encode_identity(encoder, pipeline, images, scale=args.scale, combine=args.combine,
                                         face_index=args.face_index, order=args.order, on_missing=args.on_missing)
        if embeds.num_tokens == 0:
            raise DreamIDError("--scale 0 switches the identity off, so there is no S* to write; use a scale above 0")
    else:
        report = pipeline.process(images, face_index=args.face_index, order=args.order, on_missing=args.on_missing)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    summary: dict = {"faces": [], "skipped": [{"photo": str(photos[i]), "reason": r} for i, r in report.skipped]}
    for face in report.faces:
        out = args.out_dir / f"{Path(photos[face.image_index]).stem}_face{args.face_index}.png"
        Image.fromarray(crop_to_uint8(face.crop)).save(out)
        summary["faces"].append({"photo": str(photos[face.image_index]), "crop": str(out),
                                 "faces_in_photo": face.num_faces, "score": round(float(face.detection.score), 4),
                                 "box": [round(v, 1) for v in face.detection.box]})
        if face.counted_from:  # the quick search settled the largest face: smaller ones were not counted
            summary["faces"][-1]["faces_counted_from_px"] = round(face.counted_from)
    if embeds is not None:
        path = write_embedding(args.out_dir / sanitize_name(args.name), embeds.parts, overwrite=args.overwrite,
                               metadata={**embeds.info, "photos": [Path(p).name for p in photos]})
        summary["embedding"] = {"file": str(path), "tokens": embeds.num_tokens,
                                "widths": {k: int(v.shape[-1]) for k, v in embeds.parts.items()},
                                "use": f"embedding:{path.stem} in any ComfyUI prompt (copy it to models/embeddings)"}
    return summary


def _run_and_print(args: argparse.Namespace) -> None:
    sys.stdout.write(json.dumps(run(args), indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["download"]:
        from . import download  # the hub client is imported only for this command

        return download.main(argv[1:])
    return run_main(_run_and_print, build_parser().parse_args(argv))
