"""How a run was launched, and the checks that keep a relaunch from silently changing the recipe.

- :func:`global_batch`: processes x batch_size x gradient_accumulation_steps, the number the
  paper's recipe fixes (8 GPUs x 8 = 64). It is saved in every checkpoint; :func:`check_global_batch`
  refuses a resume that would change it (``--allow-batch-change`` to do it on purpose).
- :func:`launch_command`: the launcher prefix that starts ``n`` processes again
  (``accelerate launch --num_processes 8``, ``torchrun --nproc_per_node ...``), for messages and
  for the README's resume line.
- :func:`check_launch`: a launcher that started several processes while accelerate sees one
  (``torchrun`` on CPU without ``ACCELERATE_USE_CPU=1``; ``accelerate launch --num_processes 2
  --cpu``) would run independent trainers in one folder; stop with the command that works.
  ``accelerate launch`` tells "asked for several processes" only by setting ``MASTER_ADDR``/``MASTER_PORT``;
  a job script may export them itself (SLURM scripts do), so they count only when the launcher's own
  environment (:func:`launcher_environ`) did not already hold them.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Mapping
from pathlib import Path

from dreamid_core.errors import ConfigError

logger = logging.getLogger("training.train")

MODULE = "-m training.train"


class LaunchError(ConfigError):
    """The processes this launcher started do not form the run the trainer would compute."""


class BatchChangeError(ConfigError):
    """A resume would train with another global batch than the checkpoint's."""


def processes(n: int) -> str:
    """``1 process``, ``8 processes``."""
    return f"{n} process" if n == 1 else f"{n} processes"


def global_batch(num_processes: int, batch_size: int, gradient_accumulation_steps: int) -> int:
    return int(num_processes) * int(batch_size) * int(gradient_accumulation_steps)


def _env_int(env: Mapping[str, str], key: str, default: int = 1) -> int:
    try:
        return int(env.get(key, default))
    except ValueError:
        return default


def launch_command(num_processes: int, env: Mapping[str, str] | None = None) -> str:
    """The launcher prefix (with ``-m training.train``) that starts ``num_processes`` processes the way
    ``env`` (this process's environment) says this one was started."""
    env = os.environ if env is None else env
    if num_processes <= 1:
        return f"python {MODULE}"
    nodes = max(1, num_processes // max(1, _env_int(env, "LOCAL_WORLD_SIZE", num_processes)))
    cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if "TORCHELASTIC_RUN_ID" in env and "ACCELERATE_MIXED_PRECISION" not in env:  # plain torchrun
        per_node = num_processes // nodes
        prefix = "ACCELERATE_USE_CPU=1 " if cpu else ""
        rdzv = " --rdzv-backend c10d --rdzv-endpoint HOST:PORT" if nodes > 1 else ""
        return f"{prefix}torchrun --nnodes {nodes} --nproc_per_node {per_node}{rdzv} {MODULE}"
    if cpu:
        return f"ACCELERATE_USE_CPU=1 torchrun --nproc_per_node {num_processes} {MODULE}"
    machines = f" --num_machines {nodes} --machine_rank RANK --main_process_ip HOST" if nodes > 1 else ""
    return f"accelerate launch --multi_gpu --num_processes {num_processes}{machines} {MODULE}"


def launcher_environ(pid: int | None = None) -> dict[str, str] | None:
    """The environment that ``accelerate launch``, this process's parent, was itself started with; None
    when the parent is not accelerate's launcher or the system does not tell (no /proc)."""
    proc = Path("/proc") / str(os.getppid() if pid is None else pid)
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
        if not any("accelerate" in Path(os.fsdecode(a)).name for a in argv[:3]):  # accelerate launch, -m accelerate...
            return None
        raw = (proc / "environ").read_bytes()
    except OSError:
        return None
    pairs = (os.fsdecode(item).partition("=") for item in raw.split(b"\0") if b"=" in item)
    return {k: v for k, _, v in pairs}


def check_launch(num_processes: int, env: Mapping[str, str] | None = None,
                 launcher_env: Mapping[str, str] | None = None) -> None:
    """Refuse a launch whose processes would train independently (see the module docstring).
    ``launcher_env``: the environment accelerate's launcher started with (default: read from /proc for
    this process; pass it with ``env``)."""
    if env is None:
        env = os.environ
        launcher_env = launcher_environ()
    world = _env_int(env, "WORLD_SIZE")
    if num_processes == 1 and world > 1:
        raise LaunchError(
            f"the launcher started {world} processes (WORLD_SIZE={world}) but accelerate runs this one as a single "
            f"process, so {world} independent trainers would write one run folder. On GPUs check that CUDA is "
            f"visible to every process; on CPU launch with `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node {world} "
            f"{MODULE} ...` (or run one process: `python {MODULE} ...`).")
    # accelerate launch's single-process launcher sets these (and MASTER_ADDR/PORT only when asked for > 1 process)
    launched_by_accelerate = all(k in env for k in ("ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION",
                                                    "ACCELERATE_DYNAMO_BACKEND")) and "WORLD_SIZE" not in env
    if num_processes != 1 or not launched_by_accelerate or "MASTER_ADDR" not in env:
        return
    rendezvous = ("MASTER_ADDR", "MASTER_PORT")
    if launcher_env is None:  # cannot tell who set MASTER_ADDR: a job script's export is the likelier
        logger.info("MASTER_ADDR=%s is set and accelerate runs one process; if you asked accelerate launch for "
                    "several, only this one trains", env["MASTER_ADDR"])
        return
    if all(launcher_env.get(k) == env.get(k) for k in rendezvous):
        return  # exported before the launch (a SLURM script), not set by accelerate: a plain single process
    raise LaunchError(
        "accelerate launch was asked for several processes (it set MASTER_ADDR) but started only this one: "
        "`accelerate launch --num_processes N --cpu` runs a single process. For N CPU processes use "
        f"`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N {MODULE} ...`; for one, drop --num_processes.")


def check_global_batch(*, saved: dict[str, int], now: dict[str, int], run_dir: str, allow: bool,
                       launcher: str | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """``saved``/``now``: ``{"num_processes", "batch_size", "gradient_accumulation_steps"}``. Raises
    :class:`BatchChangeError` when the global batches differ (unless ``allow``); returns a warning
    line when they differ and ``allow`` is set, else None. ``launcher``: the command prefix the run was
    started with (saved in its checkpoints); default: derived from ``saved["num_processes"]``."""
    def describe(d: dict[str, int]) -> str:
        total = global_batch(d["num_processes"], d["batch_size"], d["gradient_accumulation_steps"])
        return (f"{total} ({processes(d['num_processes'])} x batch_size {d['batch_size']} x "
                f"gradient_accumulation_steps {d['gradient_accumulation_steps']})")

    was = global_batch(saved["num_processes"], saved["batch_size"], saved["gradient_accumulation_steps"])
    will = global_batch(now["num_processes"], now["batch_size"], now["gradient_accumulation_steps"])
    if was == will:
        return None
    line = f"global batch changes from {describe(saved)} to {describe(now)}"
    if allow:
        return f"{line} (--allow-batch-change): the recipe changes from here on"
    command = f"{launcher or launch_command(saved['num_processes'], env)} --output-dir {shlex.quote(run_dir)} --resume"
    hints = [f"resume with the launcher it was started with: `{command}`"]
    per_step = now["num_processes"] * now["batch_size"]
    if was % per_step == 0:
        hints.append(f"or keep {was} on {processes(now['num_processes'])} by setting "
                     f"gradient_accumulation_steps to {was // per_step} (a --config with that value)")
    hints.append("or pass --allow-batch-change to continue with the new batch on purpose")
    raise BatchChangeError(f"cannot resume {run_dir}: the {line}, which silently changes the recipe. "
                           + "; ".join(hints) + ".")
