"""Export a training checkpoint as the encoder file the ComfyUI nodes load.

``python -m training.export --checkpoint runs/x/checkpoint-N --out my_encoder.safetensors [--no-backbone]``
(``--checkpoint runs/x`` takes the run's newest complete checkpoint). The file is written by
:func:`dreamid_core.save_encoder`; its provenance metadata records the base model, family,
steps, samples seen, data sizes, the experiment config and its hash, the git commit of this
code (when known) and the date the checkpoint was written.

Exports reproduce: the same checkpoint exported again (by the same code) gives a byte-identical file.
Nothing in it depends on when or from which working directory the export ran (the date is the
checkpoint's, its path is absolute), and the safetensors header is rewritten in sorted order
(:func:`training.common.safetensors_files.canonicalize`; safetensors itself writes the metadata in a
random order).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from dreamid_core import load_encoder, read_encoder_config, save_encoder
from dreamid_core.cli.runner import describe, run_main
from dreamid_core.errors import ConfigError

from .common.safetensors_files import canonicalize
from .train.checkpoint import CONFIG_FILE, Checkpoint, resolve_checkpoint
from .train.config import ExperimentConfig

logger = logging.getLogger("training.export")


def git_commit(repo: Path | None = None) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the repository holding this code, or None."""
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": sha, "dirty": bool(status.strip())} if sha else None


def _prediction_type(base_model: str) -> str | None:
    path = Path(base_model) / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(path.read_text()).get("prediction_type")
    except (OSError, ValueError):
        return None


def provenance(ckpt: Checkpoint, cfg: ExperimentConfig, family: str) -> dict[str, Any]:
    state = ckpt.training_state()
    sampler = state.get("sampler", {})
    return {
        "exported_by": "training.export",
        "date": ckpt.written(),  # when the weights were made, so a later export is the same file
        "base_model": cfg.base_model,
        "base_model_name": Path(cfg.base_model).name,
        "family": family,
        "prediction_type": _prediction_type(cfg.base_model),
        "steps": int(state["step"]),
        "samples_seen": int(sampler.get("position", 0)),
        "data_sizes": sampler.get("sizes", {}),
        "recon_fraction": cfg.recon_fraction,
        "backbone": Path(cfg.backbone_path).name if cfg.backbone_path else "random",
        "backbone_trained": cfg.backbone_lr is not None,
        "config_hash": cfg.config_hash(),
        "config": cfg.to_dict(),
        "checkpoint": str(ckpt.path.resolve()),
        "git": git_commit(),
    }


def export(checkpoint: str | Path, out: str | Path, *, include_backbone: bool = True) -> Path:
    """Write ``out`` (``.safetensors``) from a checkpoint folder or a run folder."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out.name!r}: the nodes load .safetensors files; name it e.g. my_encoder.safetensors")
    ckpt = resolve_checkpoint(checkpoint)
    cfg = ExperimentConfig.from_json(ckpt.config_json(), str(ckpt.path / CONFIG_FILE))
    _, _, contents = read_encoder_config(ckpt.encoder_path)
    if contents == "projection":  # written with checkpoint_backbone: false
        encoder = load_encoder(ckpt.encoder_path, backbone_path=_backbone_path(cfg))
    else:
        encoder = load_encoder(ckpt.encoder_path)
    meta = provenance(ckpt, cfg, encoder.config.target)
    path = canonicalize(save_encoder(encoder, out, include_backbone=include_backbone, provenance=meta))
    logger.info("exported %s (step %d, %s) to %s", ckpt.path.name, meta["steps"],
                "with backbone" if include_backbone else "projection only", path)
    return path


def _backbone_path(cfg: ExperimentConfig) -> str:
    if cfg.backbone_path is None or not Path(cfg.backbone_path).is_file():
        raise ConfigError(f"the checkpoint holds no backbone and its config's backbone_path {cfg.backbone_path!r} is "
                          "not a file; a randomly initialised backbone cannot be recovered")
    return cfg.backbone_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.export", description=describe(__doc__))
    p.add_argument("--checkpoint", required=True, help="runs/<name>/checkpoint-<step>, or runs/<name> (newest)")
    p.add_argument("--out", required=True, help="output .safetensors for models/dreamidentity/")
    p.add_argument("--no-backbone", action="store_true",
                   help="projection MLPs only (smaller; the node then needs the arcface backbone file)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument("-v", "--verbose", action="store_true", help="DEBUG logging, and a traceback with every error")
    return p


def _run(args: argparse.Namespace) -> None:
    export(args.checkpoint, args.out, include_backbone=not args.no_backbone)


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
