"""``python -m training.build_dataset <step>``: DreamIdentity's self-augmented editing data.

Steps, in order (each resumable: rerun after a crash and it continues; a rerun of a finished
step logs "0 new items"; each can be split over processes with ``--shard i --num-shards n``).
Start a step when every shard of the previous one has finished (``status`` shows what is pending;
a rerun picks up items that appeared since)::

    names             register the names of a names file (one per line) in the dataset
    generate-sources  "<name> face, looking at the camera" -> detect/align, keep faces > --min-face px
    generate-edits    the paper's edit prompts for every kept source (name replaced by S* in the record)
    filter            identity + CLIP score of every edit; top --keep-fraction per template -> manifest.jsonl
    merge             rebuild manifest.jsonl from the scores (e.g. with another --keep-fraction)
    status            counts per step and shard; --verify also opens every image

Example (SD2.1-base, as in the paper; nothing is downloaded, every model is a local path)::

    python -m training.build_dataset names --out data/edit --names my_names.txt
    python -m training.build_dataset generate-sources --out data/edit --base-model models/sd21-base \
        --images-per-name 4 --shard 0 --num-shards 8        # one process per shard: --device auto puts
                                                             # shard i on cuda:(i mod the GPU count)
    python -m training.build_dataset generate-edits --out data/edit --base-model models/sd21-base
    python -m training.build_dataset filter --out data/edit --face-model models/glintr100.onnx \
        --clip-model models/clip-vit-base-patch32
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from dreamid_core import FacePipeline, ImageInputError, detector_names, make_detector
from dreamid_core.cli.runner import HelpFormatter, describe, run_main
from dreamid_core.faces.images import load_image
from dreamid_core.identities.families import UNET_FAMILIES

from ..common.records import StepStore
from .edit_prompts import EDIT_TEMPLATES, EXAMPLE_NAMES, load_names
from .selection import COMBINE_METHODS
from .steps import (
    MANIFEST,
    BuildConfig,
    StepSummary,
    build_manifest,
    edit_items,
    generate_edits,
    generate_sources,
    register_names,
    score_edits,
)

logger = logging.getLogger("training.build_dataset")



#: step -> (one line, what it reads and writes) for ``--help`` of each step
STEP_HELP: dict[str, tuple[str, str]] = {
    "names": ("register the names of a names file",
              "Reads --names (one name per line, '#' comments). Writes OUT/names/parts/*.jsonl (one record per "
              "new name; names already registered are skipped). Not sharded."),
    "generate-sources": ("draw '<name> face, looking at the camera', keep faces > --min-face px",
                         "Reads the registered names; draws --images-per-name images per name with --base-model, "
                         "detects and aligns the largest face. Writes OUT/sources/images/<name>/<i>.png, the aligned "
                         "crops OUT/sources/crops/<name>/<i>.png of kept faces, and one record per image (kept, or "
                         "rejected with the reason) in OUT/sources/parts/*.jsonl."),
    "generate-edits": ("draw the paper's edit prompts for every kept source",
                       "Reads the kept sources; draws --edits-per-prompt images per source and template (the name "
                       "in the prompt). Writes OUT/edits/images/<name>/<i>-<template>-<j>.png and one record per "
                       "image (its training prompt has the name replaced by --trigger) in OUT/edits/parts/*.jsonl."),
    "filter": ("score every edit (identity + CLIP) and write the manifest",
               "Reads the edits and their source crops; scores identity with --face-model and text alignment with "
               "--clip-model. Writes OUT/scores/parts/*.jsonl (one record per edit, a reason when unscored) and then "
               "OUT/manifest.jsonl (top --keep-fraction per template, 'kept': true) and OUT/manifest_summary.json."),
    "merge": ("rebuild manifest.jsonl from the scores",
              "Reads OUT/scores. Writes OUT/manifest.jsonl and OUT/manifest_summary.json again (e.g. with another "
              "--keep-fraction or --combine). Refuses while edits are unscored unless --allow-partial."),
    "status": ("counts per step and shard, pending items",
               "Reads every step's part files; writes nothing. --verify also opens every image and lists the "
               "corrupt ones."),
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="the dataset folder (created; holds every step's files)")
    p.add_argument("--shard", type=int, default=0, help="this process's shard, 0..num-shards-1")
    p.add_argument("--num-shards", type=int, default=1, help="how many processes share the step")
    p.add_argument("--seed", type=int, default=0, help="base seed; each image's seed derives from it and its key")
    p.add_argument("--trigger", default="S*", help="the word that replaces the name in training prompts")
    p.add_argument("--batch-size", type=int, default=4, help="images per generation / scoring call")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true")


def _names(p: argparse.ArgumentParser) -> None:
    p.add_argument_group("names").add_argument("--names", type=Path, default=EXAMPLE_NAMES,
                                               help="text file, one name per line")


def _device(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("device")
    g.add_argument("--device", default="auto", help="auto (shard i on cuda:i mod the GPU count, else cpu), cpu, "
                                                    "cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA), float32, float16, bfloat16")


def _items(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("items (what the steps owe; give status the same values)")
    g.add_argument("--images-per-name", type=int, default=4, help="source images generated per name")
    g.add_argument("--templates", nargs="+", choices=list(EDIT_TEMPLATES), help="edit template ids (default: all)")
    g.add_argument("--edits-per-prompt", type=int, default=1, help="edited images per source and template")


def _generation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--base-model", type=Path, help="local diffusers folder or .safetensors (SD2.1-base in the paper)")
    g.add_argument("--base-config", type=Path, help="diffusers config folder for a single-file --base-model")
    g.add_argument("--family", choices=UNET_FAMILIES, help="default: detected from the files")
    g.add_argument("--steps", type=int, default=30, help="DDIM steps")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    g.add_argument("--height", type=int, help="default: the model's native size")
    g.add_argument("--width", type=int, help="default: the model's native size")
    g.add_argument("--negative-prompt", default="", help="text of the unconditional branch")
    g.add_argument("--min-face", type=float, default=128.0, help="keep a source face if its box's short side > this (px)")


def _faces(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("faces")
    g.add_argument("--detector", default="mtcnn", choices=detector_names())
    g.add_argument("--insightface-root", type=Path, help="folder holding models/<pack>/ for insightface detectors")
    g.add_argument("--provider", default="auto", help="onnxruntime provider: auto/cpu/cuda/rocm/coreml")
    g.add_argument("--detect-retry", action=argparse.BooleanOptionalAction, default=True,
                   help="retry faceless images at other sizes and padded (slower; rarely needed for generated images)")


def _selection(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("selection")
    g.add_argument("--keep-fraction", type=float, default=0.25, help="top share of each template's edits kept")
    g.add_argument("--combine", default="rank", choices=COMBINE_METHODS, help="how identity and CLIP scores combine")
    g.add_argument("--id-weight", type=float, default=0.5, help="identity score's share of the combined score")


def _scorers(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scorers")
    g.add_argument("--face-model", type=Path, help="arcface_torch ViT .pt/.safetensors, or insightface glintr100.onnx "
                                                   "/ w600k_r50.onnx: the identity score")
    g.add_argument("--clip-model", type=Path, help="transformers CLIPModel folder: the text-image score")


_STEP_ARGS = {
    "names": (_names,),
    "generate-sources": (_generation, _device, _items, _faces),
    "generate-edits": (_generation, _device, _items, _faces),
    "filter": (_scorers, _device, _faces, _selection, _items),
    "merge": (_selection, _items),
    "status": (_items,),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.build_dataset", description=describe(__doc__),
                                epilog="`python -m training.build_dataset STEP --help` says what STEP does and writes.")
    steps = p.add_subparsers(dest="step", required=True, metavar="STEP")
    for name, adders in _STEP_ARGS.items():
        short, long = STEP_HELP[name]
        sub = steps.add_parser(name, help=short, description=f"{short}. {long}",
                               formatter_class=HelpFormatter)
        _common(sub)
        for add in adders:
            add(sub)
        if name == "merge":
            sub.add_argument("--allow-partial", action="store_true", help="write the manifest with unscored edits left")
        if name == "status":
            sub.add_argument("--verify", action="store_true", help="open every image and report corrupt ones")
    return p


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    def get(name: str, default: Any = None) -> Any:
        return getattr(args, name, default)

    templates = get("templates")
    return BuildConfig(out=args.out, shard=args.shard, num_shards=args.num_shards, seed=args.seed, trigger=args.trigger,
                       images_per_name=get("images_per_name", 4), min_face=get("min_face", 128.0),
                       templates=tuple(templates) if templates else None,
                       edits_per_prompt=get("edits_per_prompt", 1), batch_size=args.batch_size,
                       keep_fraction=get("keep_fraction", 0.25), combine=get("combine", "rank"),
                       id_weight=get("id_weight", 0.5), progress=not args.no_progress)


def _require(args: argparse.Namespace, flag: str, step: str) -> Any:
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    if value is None:
        raise SystemExit(f"error: {step} needs {flag} (a local path; nothing is downloaded)")
    return value


def make_generator(args: argparse.Namespace) -> Any:
    from ..common.base_model import load_base_model
    from ..common.generation import DiffusersGenerator, resolve_device, resolve_dtype

    device = resolve_device(args.device, shard=args.shard)
    dtype = resolve_dtype(args.dtype, device)
    base = load_base_model(_require(args, "--base-model", args.step), family=args.family, config=args.base_config,
                           dtype=dtype).to(device)
    return DiffusersGenerator(base, steps=args.steps, guidance=args.guidance, height=args.height, width=args.width,
                              negative_prompt=args.negative_prompt, trigger=args.trigger, device=device)


def make_face_pipeline(args: argparse.Namespace) -> FacePipeline:
    from ..common.generation import resolve_device

    device = resolve_device(args.device, shard=args.shard)
    detector = make_detector(args.detector, insightface_root=args.insightface_root, provider=args.provider,
                                  device=device)
    # the full search: the records say how many faces each photo shows (num_faces)
    return FacePipeline(detector, retry=args.detect_retry, quick_min_face=None)


def make_scorers(args: argparse.Namespace) -> tuple[Any, Any]:
    from ..common.generation import resolve_device
    from ..common.scorers import ClipScorer, IdentityScorer

    device = resolve_device(args.device, shard=args.shard)
    identity = IdentityScorer(_require(args, "--face-model", "filter"), device=device, provider=args.provider)
    clip = ClipScorer(_require(args, "--clip-model", "filter"), device=device)
    return identity.load(), clip.load()  # fail before any work when a path is wrong


def status(cfg: BuildConfig, verify: bool = False) -> dict[str, Any]:
    """Records, outcomes and pending items per step (pending as the given flags define the items:
    pass the same --images-per-name / --templates / --edits-per-prompt as the steps), per part file;
    with ``verify`` also every unreadable image."""
    if not cfg.out.is_dir():
        raise FileNotFoundError(f"--out {cfg.out} does not exist; start a dataset there with "
                                f"`python -m training.build_dataset names --out {cfg.out}`")
    names = StepStore(cfg.out, "names").records()
    edits = StepStore(cfg.out, "edits").records()
    expected = {"names": set(names),
                "sources": {f"{slug}/{i:02d}" for slug in names for i in range(cfg.images_per_name)},
                "edits": {it["key"] for it in edit_items(cfg)} if names else set(),
                "scores": set(edits)}
    report: dict[str, Any] = {}
    for step in ("names", "sources", "edits", "scores"):
        store = StepStore(cfg.out, step)
        records = store.records()
        outcome: dict[str, int] = {}
        for r in records.values():
            if step == "sources":
                label = r["status"] if r.get("status") == "kept" else f"rejected:{r.get('reason')}"
            elif step == "scores":
                label = (r.get("reason") or "scored").split(":")[0]
            else:
                label = "done"
            outcome[label] = outcome.get(label, 0) + 1
        pending = len(expected[step] - set(records))
        report[step] = {"records": len(records), "pending": pending, "parts": store.shard_counts(),
                        "outcomes": outcome}
        logger.info("%-8s %6d record(s), %d pending %s; parts: %s", step, len(records), pending, outcome or "",
                    ", ".join(f"{k}: {v}" for k, v in report[step]["parts"].items()) or "none")
    manifest = cfg.out / MANIFEST
    logger.info("manifest: %s", manifest if manifest.is_file() else "not written yet")
    if verify:
        corrupt = []
        for step, fields in (("sources", ("image", "crop")), ("edits", ("image",))):
            for r in StepStore(cfg.out, step).records().values():
                for f in fields:
                    if r.get(f):
                        try:
                            load_image(cfg.out / r[f])
                        except ImageInputError:
                            corrupt.append(r[f])
        report["corrupt"] = corrupt
        if corrupt:
            logger.warning("%d corrupt image file(s): %s", len(corrupt), ", ".join(corrupt))
        else:
            logger.info("verify: every image opens")
    return report


def run(args: argparse.Namespace) -> StepSummary | dict[str, Any]:
    cfg = config_from_args(args)
    if args.step == "names":
        return register_names(cfg, load_names(args.names, trigger=args.trigger))
    if args.step == "status":
        return status(cfg, verify=args.verify)
    if args.step == "merge":
        return build_manifest(cfg, allow_partial=args.allow_partial)
    if args.step == "filter":
        identity, clip = make_scorers(args)
        summary = score_edits(cfg, make_face_pipeline(args), identity, clip)
        build_manifest(cfg)
        return summary
    generator = make_generator(args)
    if args.step == "generate-sources":
        return generate_sources(cfg, generator, make_face_pipeline(args))
    return generate_edits(cfg, generator)


def main(argv: list[str] | None = None) -> int:
    return run_main(run, build_parser().parse_args(argv))

