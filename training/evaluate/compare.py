"""``python -m training.evaluate_identities``: several identity methods on the paper's protocol, one table.

Each ``--method NAME=SPEC`` is scored by :func:`training.evaluate.evaluate` (same faces, prompts,
seeds, DDIM steps, CFG, CLIP and face scorers) into ``--out/NAME/``, and ``--out/comparison.md`` /
``comparison.csv`` put their overall rows side by side. SPEC is

- ``encoder:FILE``: a DreamIdentity encoder (S* per test face);
- ``identity:FILE``: one learned identity (either layout) or plain textual-inversion file, used for
  every test face (meaningful with the one face it was learned from);
- ``identity:FOLDER``: one learned identity per test face, ``FOLDER/<face file stem>.safetensors``
  (what ``python -m training.learn_identity`` writes when run per face) — the per-identity methods'
  protocol (TI, learned, encoder + learn).

So TI (``--init-word person --attn-weight 0``), learned (attention loss, either layout), encoder and
encoder + learn (``--encoder`` init) compare in one run. Per-stage identities are drawn through the
same cross-attention processor they were learned with (:class:`training.learn_identity.sampling.IdentityGenerator`).
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path
from typing import Any

from dreamid_core import FacePipeline, load_encoder, make_detector
from dreamid_core.cli.runner import HelpFormatter, describe, run_main
from dreamid_core.identities.families import UNET_FAMILIES

from . import protocol as ev
from .cli import add_protocol_args, add_runtime_args
from .identity_sources import EncoderIdentity, LearnedIdentitySource
from .report import fmt_score

logger = logging.getLogger("training.evaluate_identities")

COMPARISON_FIELDS = ("method", "source", "layout", "images", "text_alignment", "face_similarity", "no_face_rate",
                     "identity_time")


def parse_method(text: str) -> tuple[str, str, Path]:
    name, sep, spec = text.partition("=")
    kind, sep2, path = spec.partition(":")
    if not sep or not sep2 or not name or kind not in ("encoder", "identity"):
        raise ValueError(f"--method {text!r}: expected NAME=encoder:FILE or NAME=identity:FILE_OR_FOLDER, e.g. "
                         "TI=identity:runs/ti/ or encoder=encoder:dreamid.safetensors")
    if "/" in name or name.startswith("."):
        raise ValueError(f"--method name {name!r} must be a plain name (it becomes a folder)")
    return name, kind, Path(path)


def comparison_markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    lines = ["# Identity methods on the DreamIdentity protocol", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items()] + [""]
    lines += ["| method | identity | images | text-alignment (CLIP) | face similarity | no-face rate | identity time |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['source']} | {r['images']} | {fmt_score(r['text_alignment'])} | "
                     f"{fmt_score(r['face_similarity']) or 'n/a'} | {r['no_face_rate']:.1%} | {r['identity_time']} |")
    lines += ["", "Each method's per-prompt table, images and grid are in its folder. Identity time: encoding per "
              "face (encoder) or the learning run's duration recorded in the identity file."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate_identities", description=describe(__doc__),
                                formatter_class=HelpFormatter)
    p.add_argument("--method", action="append", required=True, help="NAME=encoder:FILE or NAME=identity:PATH")
    p.add_argument("--base-model", type=Path, required=True, help="local diffusers folder or .safetensors")
    p.add_argument("--base-config", type=Path)
    p.add_argument("--family", choices=UNET_FAMILIES, help="base model family (default: read from its files)")
    p.add_argument("--backbone", type=Path, help="arcface_torch backbone, if an encoder file has none")
    p.add_argument("--faces", type=Path, required=True, help="folder of test photos, one identity per photo")
    p.add_argument("--prompts", type=Path, default=ev.EXAMPLE_PROMPTS, help="one prompt per line, each with the trigger")
    p.add_argument("--out", type=Path, required=True,
                   help="folder: OUT/NAME/ per method (its images and tables), OUT/comparison.md and .csv")
    add_protocol_args(p)
    p.add_argument("--grid-rows", type=int, default=16, help="rows per grid page")
    add_runtime_args(p)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from ..common.base_model import load_base_model
    from ..common.generation import resolve_device, resolve_dtype
    from ..common.scorers import ClipScorer, IdentityScorer
    from ..learn_identity.sampling import IdentityGenerator

    methods = [parse_method(m) for m in args.method]
    names = [m[0] for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"--method names repeat: {names}")
    for name, _, path in methods:
        if not Path(path).exists():  # before minutes of model loading
            raise FileNotFoundError(f"--method {name}: {path} does not exist")
    device = resolve_device(args.device)
    prompts = ev.load_prompts(args.prompts, args.trigger)
    identity = IdentityScorer(args.face_model, device=device, provider=args.provider).load()
    clip = ClipScorer(args.clip_model, device=device).load()
    pipeline = FacePipeline(make_detector(args.detector, insightface_root=args.insightface_root,
                                               provider=args.provider, device=device), retry=args.detect_retry)
    faces, skipped = ev.load_test_faces(args.faces, pipeline)
    base = load_base_model(args.base_model, family=args.family, config=args.base_config,
                           dtype=resolve_dtype(args.dtype, device)).to(device)
    common = {"base model": str(args.base_model), "sampler": f"DDIM {args.steps} steps, CFG {args.guidance}",
              "seed": args.seed, "face model": str(args.face_model), "CLIP model": str(args.clip_model),
              "test faces": len(faces), "prompts": len(prompts), "images per prompt": args.images_per_prompt}
    if skipped:
        common["test photos skipped (no face / unreadable)"] = ", ".join(skipped)
    rows = []
    for name, kind, path in methods:
        if kind == "encoder":
            source = EncoderIdentity(load_encoder(path, backbone_path=args.backbone, device=device), base.widths)
            stages, stage_kind, what = 1, "time", "DreamIdentity encoder"
        else:
            source = LearnedIdentitySource(path, base.widths, faces)
            stages, stage_kind, what = source.num_stages, source.stage_kind, source.description
        generator = IdentityGenerator(base, num_stages=stages, stage_kind=stage_kind, steps=args.steps,
                                      guidance=args.guidance, height=args.height, width=args.width,
                                      negative_prompt=args.negative_prompt, trigger=args.trigger, device=device)
        cfg = ev.EvalConfig(out=args.out / name, images_per_prompt=args.images_per_prompt, seed=args.seed,
                            trigger=args.trigger, neutral=args.neutral, grid_rows=args.grid_rows)
        logger.info("method %s: %s (%s)", name, what, path)
        result = ev.evaluate(cfg, faces=faces, prompts=prompts, identity_source=source, generator=generator,
                             pipeline=pipeline, identity=identity, clip=clip,
                             header={"method": name, "identity": what, "S* from": str(path), **common})
        overall = result["rows"][-1]
        if kind == "encoder":
            ms = result["encode_ms"]
            when = f"{sum(ms) / len(ms):.1f} ms encoding"
        else:
            when = f"{source.learn_seconds:.1f} s learning" if source.learn_seconds is not None else "n/a"
        rows.append({"method": name, "source": what, "layout": getattr(source, "layout", "words"),
                     "images": overall.images, "text_alignment": overall.text_alignment,
                     "face_similarity": overall.face_similarity, "no_face_rate": overall.no_face_rate,
                     "identity_time": when})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.md").write_text(comparison_markdown(rows, common), encoding="utf-8")
    with open(args.out / "comparison.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=COMPARISON_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "text_alignment": fmt_score(r["text_alignment"], 6),
                        "face_similarity": fmt_score(r["face_similarity"], 6),
                        "no_face_rate": fmt_score(r["no_face_rate"], 4)})
    logger.info("compared %d method(s) -> %s", len(rows), args.out / "comparison.md")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Exit 0 done, 2 a mistake the user can fix (message on one line), 1 a bug (dreamid_core.cli.runner)."""
    return run_main(run, build_parser().parse_args(argv))

