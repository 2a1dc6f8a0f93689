"""``python -m training.train``: the command line of :func:`training.train.run.train`."""

from __future__ import annotations

import argparse
import logging

from dreamid_core.cli.runner import HelpFormatter, describe, run_main
from dreamid_core.errors import ConfigError

from . import run as run_module
from .checkpoint import CONFIG_FILE, CheckpointManager
from .config import ExperimentConfig, RunFlags
from .run import train

logger = logging.getLogger("training.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train", description=describe(run_module.__doc__),
                                formatter_class=HelpFormatter)
    p.add_argument("--config", help="experiment config JSON (ExperimentConfig; the paper's recipes are "
                                    "training/configs/*.json); with --resume, default: the checkpoint's own")
    p.add_argument("--output-dir", required=True, help="run folder: checkpoints, logs, data report")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--max-steps", type=int, help="override the config's max_steps")
    p.add_argument("--skip-step", type=int, action="append", default=[], metavar="N",
                   help="draw step N's samples and drop them without an update (after a divergence at step N); "
                        "repeatable")
    p.add_argument("--allow-batch-change", action="store_true",
                   help="resume although processes x batch_size x gradient_accumulation_steps differs from the "
                        "checkpoint's (changes the recipe; refused otherwise)")
    p.add_argument("--stop-after-step", type=int, help="checkpoint and stop at this step (schedule unchanged); 0: "
                                                       "prepare only (align the recon faces, write the data report)")
    p.add_argument("--process-group-timeout", type=float, default=180.0, metavar="MINUTES",
                   help="how long collectives wait for the slowest rank (NCCL's own default is 10 min)")
    p.add_argument("--cache-dir", help="face crops and latents cache (default: OUTPUT_DIR/cache)")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines and TensorBoard points")
    p.add_argument("--num-workers", type=int, default=2, help="data loader worker processes")
    p.add_argument("--report-to", choices=("tensorboard", "none"), default="tensorboard",
                   help="where the loss curves go (OUTPUT_DIR/logs for tensorboard)")
    p.add_argument("--channels-last", action="store_true", help="UNet in channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (GPU; minutes to compile)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument("-v", "--verbose", action="store_true", help="DEBUG logging, and a traceback with every error")
    return p


def _run(args: argparse.Namespace) -> None:
    if args.config:
        cfg = ExperimentConfig.load(args.config)
    elif args.resume and (latest := CheckpointManager(args.output_dir).latest()) is not None:
        cfg = ExperimentConfig.from_json(latest.config_json(), str(latest.path / CONFIG_FILE))
    elif args.resume:
        raise ConfigError(f"--resume without --config: {args.output_dir} holds no complete checkpoint to take the "
                          "config from; start the run with --config (e.g. training/configs/sd21_base_paper.json)")
    else:
        raise ConfigError("--config is required: an experiment config JSON, e.g. "
                          "training/configs/sd21_base_paper.json (only --resume of an existing run can do without it)")
    flags = RunFlags(output_dir=args.output_dir, resume=args.resume, max_steps=args.max_steps,
                     stop_after_step=args.stop_after_step, cache_dir=args.cache_dir, log_every=args.log_every,
                     num_workers=args.num_workers, report_to=args.report_to, channels_last=args.channels_last,
                     compile_unet=args.compile, progress=not args.no_progress,
                     allow_batch_change=args.allow_batch_change, skip_steps=tuple(args.skip_step),
                     process_group_timeout_min=args.process_group_timeout)
    result = train(cfg, flags)
    logger.info("done: step %d, checkpoint %s", result.step, result.checkpoint)


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, build_parser().parse_args(argv))

