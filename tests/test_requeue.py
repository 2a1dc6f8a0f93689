"""A cluster can requeue a training run: a trainer killed with SIGKILL while its DataLoader workers live on
resumes at once (the run lock belongs to the trainer process, not to its forked children), a file system
without locks is named instead of being taken for a busy folder, and one process cannot take its own run
lock twice."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from training_fixtures import flags, one_thread, subprocess_env  # noqa: F401  (one_thread: a fixture)

from training.common import locking
from training.common.locking import RunFolderBusyError, RunLock
from training.train import train
from training.train.checkpoint import CheckpointManager

pytest.importorskip("accelerate")

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")
REPO = Path(__file__).resolve().parents[1]
posix_only = pytest.mark.skipif(locking.fcntl is None or not Path("/proc/self/stat").is_file(),
                                reason="needs POSIX locks and /proc (Linux)")


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # fields after the command: state, ppid, ...
            found.append(int(stat.parent.name))
    return found


@posix_only
def test_sigkilled_trainer_with_loader_workers_resumes_at_once(cfg, tmp_path):
    """kill -9 of a `--num-workers 2` trainer leaves its workers alive (here: stopped, so they stay as long as
    the test needs); a `--resume` started at once must not find the folder locked."""
    cfg = cfg.replace(max_steps=200, checkpoint_every=2)
    cfg_path = cfg.save(tmp_path / "cfg.json")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "training.train", "--config", str(cfg_path), "--output-dir", str(run),
           "--num-workers", "2", "--report-to", "none", "--no-progress", "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (run / "latest").is_file():
            assert proc.poll() is None, f"trainer exited early:\n{proc.stdout.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        workers = children(proc.pid)
        assert len(workers) >= 2, f"expected the trainer's 2 DataLoader workers, found {workers}"
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)  # orphans that outlive the trainer (for seconds, on a busy node)
        proc.kill()
        proc.wait(timeout=30)
        assert all(Path(f"/proc/{pid}").exists() for pid in workers), "the workers died with the trainer"
        latest = CheckpointManager(run).latest()
        assert latest is not None and latest.step < cfg.max_steps
        resumed = train(cfg, flags(run, resume=True, stop_after_step=latest.step + 1))  # the requeue, at once
        assert resumed.step == latest.step + 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@posix_only
def test_one_process_cannot_take_its_run_lock_twice(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunFolderBusyError, match=f"pid {os.getpid()} "):
            RunLock(tmp_path).__enter__()
        # the refusal did not release the first lock: another process is still refused
        code = ("import sys\nfrom training.common.locking import RunLock, RunFolderBusyError\n"
                "try:\n    RunLock(sys.argv[1]).__enter__()\nexcept RunFolderBusyError:\n    sys.exit(3)\n")
        assert subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=subprocess_env(),
                              timeout=120).returncode == 3
    with RunLock(tmp_path):  # released on exit
        pass


@posix_only
@pytest.mark.parametrize("kind", ["record", "flock"])
def test_a_file_system_without_locks_is_named_not_taken_for_busy(tmp_path, monkeypatch, caplog, kind):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    def busy(fd, op):
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    name = "lockf" if kind == "record" else "flock"
    take = locking.try_lock_process if kind == "record" else locking.try_lock
    monkeypatch.setattr(locking.fcntl, name, no_locks)
    with caplog.at_level(logging.WARNING), open(tmp_path / "f", "a+") as fh:
        assert take(fh)
    assert "keeps no file locks (ENOLCK" in caplog.text and "-o flock" in caplog.text
    monkeypatch.setattr(locking.fcntl, name, busy)
    with open(tmp_path / "f", "a+") as fh:
        assert not take(fh)
    if kind == "record":  # the trainer's run lock goes on, with the warning, instead of "in use by pid ?"
        monkeypatch.setattr(locking.fcntl, name, no_locks)
        caplog.clear()
        with caplog.at_level(logging.WARNING), RunLock(tmp_path / "run"):
            pass
        assert "keeps no file locks" in caplog.text
