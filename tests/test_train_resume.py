"""A training run survives what happens to runs: it learns in 20 steps and a SIGKILLed run resumes bit for
bit, interrupted checkpoint writes are harmless, a resume may change only what is safe (lr, clipping,
skipped steps, the global batch only when allowed), one trainer per folder, and launchers that would
silently train something else are stopped with the command that works."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from training_fixtures import (
    assert_same_weights,
    encoder_tensors,
    flags,
    make_setup,
    one_thread,  # noqa: F401  (a fixture)
    recon_photos,
    subprocess_env,
)

from training.train import train
from training.train.checkpoint import CheckpointManager, is_complete
from training.train.config import ConfigError, ExperimentConfig

pytest.importorskip("accelerate")


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference(cfg, setup_root):
    """The uninterrupted 20-step run every resumed run must reproduce."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    out = setup_root / "reference"
    result = train(cfg, flags(out, report_to="tensorboard", log_every=5))
    AcceleratorState._reset_state(reset_partial_state=True)
    return result


def test_twenty_steps_lower_the_loss_and_leave_a_checkpoint(reference):
    losses = reference.losses
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.05, f"loss did not fall: first 5 {first:.4f}, last 5 {last:.4f} ({losses})"
    run = reference.output_dir
    assert (run / "latest").read_text().strip() == "checkpoint-20"
    assert is_complete(run / "checkpoint-20") and is_complete(run / "checkpoint-10")
    assert ExperimentConfig.load(run / "checkpoint-20" / "config.json") == ExperimentConfig.load(run / "config.json")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert list(run.glob("logs/**/events.out.tfevents.*")), "no TensorBoard event file"
    report = json.loads((run / "data_report.json").read_text())
    assert report["edit"]["usable"] == 4 and report["edit"]["not_kept"] == 1


def test_sigkilled_run_resumes_bit_for_bit(cfg, reference, tmp_path):
    """A real `python -m training.train`, killed with SIGKILL once checkpoint-10 exists, then resumed."""
    cfg_path = cfg.save(tmp_path / "cfg.json")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "training.train", "--config", str(cfg_path), "--output-dir", str(run),
           "--num-workers", "0", "--report-to", "none", "--no-progress", "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while not (run / "latest").is_file():
            assert proc.poll() is None, f"trainer exited early:\n{proc.stdout.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    latest = CheckpointManager(run).latest()
    assert latest is not None and latest.step == 10, "the run finished before it could be killed"
    resumed = train(cfg, flags(run, resume=True))
    assert resumed.step == 20
    assert resumed.losses == reference.losses[10:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 21))  # the killed run's extra lines were dropped
    assert_same_weights(encoder_tensors(run, 20), encoder_tensors(reference.output_dir, 20))


def test_interrupted_checkpoint_write_never_becomes_latest(cfg, reference, tmp_path, monkeypatch):
    import training.train.checkpoint as ckpt_mod

    run = tmp_path / "run"
    real_save = torch.save

    def failing_save(obj, path, *a, **kw):  # disk full half-way through step 10's training state
        if str(path).endswith("training_state.pt") and ".tmp-checkpoint-10" in str(path):
            Path(path).write_bytes(b"\x80\x02half a pickle")
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        train(cfg.replace(checkpoint_every=5), flags(run))
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert (run / "latest").read_text().strip() == "checkpoint-5"
    assert (run / ".tmp-checkpoint-10").is_dir() and not (run / "checkpoint-10").exists()
    # a folder that looks like a newer checkpoint but was never completed is ignored too
    (run / "checkpoint-15").mkdir()
    (run / "checkpoint-15" / "encoder.safetensors").write_bytes(b"truncated")
    assert CheckpointManager(run).latest().step == 5

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg.replace(checkpoint_every=5), flags(run))
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = train(cfg.replace(checkpoint_every=5), flags(run, resume=True))
    assert resumed.step == 20 and not (run / ".tmp-checkpoint-10").exists()
    assert resumed.losses == reference.losses[5:]
    assert_same_weights(encoder_tensors(run, 20), encoder_tensors(reference.output_dir, 20))


def test_resume_refuses_a_different_experiment(cfg, reference, tmp_path):
    import shutil

    run = shutil.copytree(reference.output_dir, tmp_path / "run")
    with pytest.raises(ConfigError, match="reg_weight: checkpoint 0.0001 vs now 0.01"):
        train(cfg.replace(reg_weight=1e-2, max_steps=25), flags(run, resume=True))
    with pytest.raises(ConfigError, match="freezes or unfreezes the backbone"):
        train(cfg.replace(backbone_lr=1e-6, max_steps=25), flags(run, resume=True))


def test_resume_accepts_a_lower_lr_and_grad_clipping(cfg, reference, tmp_path):
    """What the divergence message asks for: lr and max_grad_norm may change on resume, and take effect."""
    import shutil

    run = shutil.copytree(reference.output_dir, tmp_path / "run")
    shutil.rmtree(run / "checkpoint-20")
    resumed = train(cfg.replace(lr=cfg.lr / 10, max_grad_norm=0.5, max_steps=12), flags(run, resume=True))
    assert resumed.step == 12 and resumed.losses[0] == reference.losses[10]  # same weights and data at step 11
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in metrics] == [cfg.lr] * 10 + [cfg.lr / 10] * 2
    assert all(m["grad_norm"] >= 0 for m in metrics)
    state = torch.load(run / "checkpoint-12" / "training_state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(cfg.lr / 10)
    assert ExperimentConfig.load(run / "config.json").lr == cfg.lr / 10


def test_skip_step_drops_the_batch_and_keeps_the_schedule(cfg, reference, tmp_path):
    run = tmp_path / "run"
    result = train(cfg.replace(checkpoint_every=1, max_steps=3), flags(run, skip_steps=(2,)))
    assert result.step == 3 and len(result.losses) == 2
    assert result.losses[0] == reference.losses[0]
    assert_same_weights(encoder_tensors(run, 2), encoder_tensors(run, 1))  # nothing was updated at step 2
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[1] == {"step": 2, "skipped": True}
    state = torch.load(run / "checkpoint-3" / "training_state.pt", weights_only=True)
    assert state["sampler"]["position"] == 3 * cfg.batch_size  # step 3 trained on step 3's samples


def rewrite_training_state(ckpt_dir: Path, **changes) -> None:
    """Edit a checkpoint's training_state.pt in place and keep complete.json's sizes true."""
    state = torch.load(ckpt_dir / "training_state.pt", weights_only=True)
    state.update(changes)
    torch.save(state, ckpt_dir / "training_state.pt")
    manifest = json.loads((ckpt_dir / "complete.json").read_text())
    manifest["files"]["training_state.pt"] = (ckpt_dir / "training_state.pt").stat().st_size
    (ckpt_dir / "complete.json").write_text(json.dumps(manifest))


def test_resume_with_another_global_batch_is_refused_with_the_right_command(cfg, reference, tmp_path):
    import shutil

    from training.train.launch import BatchChangeError

    run = shutil.copytree(reference.output_dir, tmp_path / "run")
    state = torch.load(run / "checkpoint-20" / "training_state.pt", weights_only=True)
    assert state["num_processes"] == 1 and state["global_batch"] == cfg.batch_size
    # as if it had been trained by 2 processes: global batch 2 x 2 x 1 = 4, this launch gives 2
    rewrite_training_state(run / "checkpoint-20", num_processes=2, global_batch=4,
                           launch="accelerate launch --multi_gpu --num_processes 2 -m training.train")
    with pytest.raises(BatchChangeError) as info:
        train(cfg.replace(max_steps=22), flags(run, resume=True))
    message = str(info.value)
    assert "from 4 (2 processes x batch_size 2 x gradient_accumulation_steps 1) to 2 (1 process x" in message
    assert f"--num_processes 2 -m training.train --output-dir {run} --resume" in message
    assert "gradient_accumulation_steps to 2" in message and "--allow-batch-change" in message
    # the same global batch on one process (accumulating 2 micro-batches) is the same recipe: accepted
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    same = train(cfg.replace(max_steps=22, gradient_accumulation_steps=2), flags(run, resume=True))
    assert same.step == 22
    assert torch.load(run / "checkpoint-22" / "training_state.pt", weights_only=True)["global_batch"] == 4


def test_allow_batch_change_resumes_with_the_new_batch(cfg, reference, tmp_path):
    import shutil

    run = shutil.copytree(reference.output_dir, tmp_path / "run")
    rewrite_training_state(run / "checkpoint-20", num_processes=2, global_batch=4)
    result = train(cfg.replace(max_steps=21), flags(run, resume=True, allow_batch_change=True))
    assert result.step == 21
    state = torch.load(run / "checkpoint-21" / "training_state.pt", weights_only=True)
    assert state["global_batch"] == 2 and state["sampler"]["position"] == 20 * 2 + 2


def test_launch_checks_name_the_working_command():
    from training.train.launch import LaunchError, check_launch, launch_command

    assert launch_command(1, {}) == "python -m training.train"
    assert launch_command(8, {"ACCELERATE_MIXED_PRECISION": "bf16", "TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "8"}) \
        == "accelerate launch --multi_gpu --num_processes 8 -m training.train"
    assert launch_command(16, {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "8"}).startswith(
        "torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d")
    check_launch(1, {})
    check_launch(2, {"WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2"):
        check_launch(1, {"WORLD_SIZE": "2", "RANK": "0"})  # torchrun on CPU without the CPU flag
    simple = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}
    check_launch(1, simple)  # accelerate launch --cpu, one process asked for
    check_launch(1, {"ACCELERATE_USE_CPU": "1", "MASTER_ADDR": "10.0.0.1"})  # a cluster's exported MASTER_ADDR
    asked_for_two = {**simple, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(LaunchError, match="runs a single process"):
        check_launch(1, asked_for_two, launcher_env={})  # accelerate launch set them: it was asked for 2
    with pytest.raises(LaunchError, match="runs a single process"):  # it overwrote a job script's export
        check_launch(1, asked_for_two, launcher_env={"MASTER_ADDR": "node7", "MASTER_PORT": "29400"})
    check_launch(1, asked_for_two, launcher_env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})  # exported
    check_launch(1, asked_for_two)  # who set them is unknown (no /proc): not refused


def test_batch_messages_count_processes_in_english():
    from training.train.launch import BatchChangeError, check_global_batch

    one, two = ({"num_processes": n, "batch_size": 2, "gradient_accumulation_steps": 1} for n in (1, 2))
    with pytest.raises(BatchChangeError, match=r"from 4 \(2 processes x .* to 2 \(1 process x batch_size 2 .*"
                                               r"keep 4 on 1 process by setting gradient_accumulation_steps to 2"):
        check_global_batch(saved=two, now=one, run_dir="runs/x", allow=False)


def test_an_exported_master_addr_does_not_stop_a_single_process_accelerate_launch(tmp_path):
    """SLURM scripts export MASTER_ADDR/MASTER_PORT; `accelerate launch` of one process keeps them, and the
    trainer must not take them for a request of several processes. A real launcher, a probe for a child."""
    if not Path(f"/proc/{os.getpid()}/environ").is_file():
        pytest.skip("the launcher's environment is read from /proc (Linux)")
    probe = tmp_path / "probe.py"
    probe.write_text("from training.train.launch import check_launch\ncheck_launch(1)\nprint('launch ok')\n")
    env = {**subprocess_env(), "MASTER_ADDR": "node7", "MASTER_PORT": "29400"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", str(probe)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "launch ok" in proc.stdout, proc.stderr[-3000:]
    # several processes asked for (accelerate sets MASTER_ADDR itself): test_accelerate_launch_cpu_with_two_processes


def test_a_second_trainer_on_the_same_folder_is_refused_naming_the_first(cfg, tmp_path):
    import socket

    from training.common.locking import RunFolderBusyError

    run = tmp_path / "run"
    code = ("import sys, time\nfrom training.common.locking import RunLock\nlock = RunLock(sys.argv[1]).__enter__()\n"
            "print('locked', flush=True)\ntime.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=REPO, env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(RunFolderBusyError) as info:
            train(cfg.replace(max_steps=2), flags(run))
        message = str(info.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message and "--output-dir" in message
        assert not (run / "metrics.jsonl").exists() and not (run / "config.json").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait(timeout=30)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    assert train(cfg.replace(max_steps=2), flags(run)).step == 2


def test_process_group_timeout_is_explicit():
    from datetime import timedelta

    from training.train.cli import build_parser
    from training.train.run import process_group_kwargs

    args = build_parser().parse_args(["--output-dir", "x", "--process-group-timeout", "240"])
    assert process_group_kwargs(flags(Path("x"), process_group_timeout_min=args.process_group_timeout)).timeout \
        == timedelta(minutes=240)
    assert process_group_kwargs(flags(Path("x"))).timeout == timedelta(hours=3)


def test_resume_tolerates_a_torn_metrics_line(cfg, reference, tmp_path):
    import shutil

    run = shutil.copytree(reference.output_dir, tmp_path / "run")
    shutil.rmtree(run / "checkpoint-20")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 21, "loss": 0.4')  # the disk filled up mid-line
    resumed = train(cfg, flags(run, resume=True))
    assert resumed.step == 20 and resumed.losses == reference.losses[10:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 21))


def test_accelerate_launch_cpu_with_two_processes_is_stopped(cfg, tmp_path):
    """`accelerate launch --num_processes 2 --cpu` starts ONE process; it stops instead of training alone."""
    cfg_path = cfg.save(tmp_path / "cfg.json")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "-m",
           "training.train", "--config", str(cfg_path), "--output-dir", str(run), "--num-workers", "0",
           "--report-to", "none", "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "runs a single process" in proc.stderr and "ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N" in \
        proc.stderr, proc.stderr[-3000:]
    assert not (run / "config.json").exists()


def test_torchrun_without_the_cpu_flag_is_stopped(cfg, tmp_path):
    """A real 2-process torchrun on CPU: accelerate gives each process num_processes 1, so both would train
    the same folder independently; both stop with the command that works, before writing anything."""
    cfg_path = cfg.save(tmp_path / "cfg.json")
    run = tmp_path / "run"
    env = subprocess_env()
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.train", "--config", str(cfg_path), "--output-dir", str(run), "--num-workers", "0",
           "--report-to", "none", "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m training.train") >= 2, \
        proc.stderr[-3000:]
    assert not (run / "config.json").exists() and not (run / "metrics.jsonl").exists()


def test_two_process_run_shards_the_alignment_and_its_resume_keeps_the_batch(setup_root, tmp_path):
    """ACCELERATE_USE_CPU=1 torchrun with 2 processes (gloo): each rank aligns its shard of the recon folder,
    the checkpoint records 2 processes and their launcher, and a 1-process resume is refused with it."""
    from training.common.records import read_jsonl, shard_of
    from training.train.launch import BatchChangeError

    photos = recon_photos(tmp_path / "photos")
    Image.open(photos / "tom_flipped.png").rotate(5).save(photos / "tom_b.png")
    assert {shard_of(p.name, 2) for p in photos.iterdir()} == {0, 1}  # both ranks have photos to align
    cfg = make_setup(setup_root, recon_dir=str(photos), recon_fraction=0.5, min_face_size=32, max_steps=2,
                     checkpoint_every=2, cache_latents="memory", prompt_templates=("a photo of S*",))
    cfg_path = cfg.save(tmp_path / "cfg.json")
    run = tmp_path / "run"
    env = {**subprocess_env(), "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.train", "--config", str(cfg_path), "--output-dir", str(run), "--num-workers", "0",
           "--report-to", "none", "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    parts = sorted((run / "cache" / "faces" / "align" / "parts").iterdir())
    assert [p.name for p in parts] == ["align.part-000-of-002.jsonl", "align.part-001-of-002.jsonl"]
    for rank, part in enumerate(parts):  # each rank aligned exactly its own shard
        assert sorted(r["file"] for r in read_jsonl(part)) == sorted(
            p.name for p in photos.iterdir() if shard_of(p.name, 2) == rank)
    assert json.loads((run / "data_report.json").read_text())["recon"]["usable"] == 4
    state = torch.load(run / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert state["num_processes"] == 2 and state["global_batch"] == 2 * cfg.batch_size
    assert state["launch"] == "ACCELERATE_USE_CPU=1 torchrun --nnodes 1 --nproc_per_node 2 -m training.train"
    with pytest.raises(BatchChangeError, match="ACCELERATE_USE_CPU=1 torchrun --nnodes 1 --nproc_per_node 2 "
                                               f"-m training.train --output-dir {run} --resume"):
        train(cfg.replace(max_steps=3), flags(run, resume=True))
