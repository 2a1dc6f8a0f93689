"""The runner every command line shares: the same exit code and message for the same kind of failure."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from dreamid_core.cli.runner import EXIT_BUG, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, log_level, run_main
from dreamid_core.errors import DreamIDError, FaceNotFoundError

ROOT = Path(__file__).resolve().parents[1]


def _raises(exc: BaseException):
    def run(args):
        raise exc
    return run


@pytest.mark.parametrize("exc", [DreamIDError("bad value 7: use 3"), FaceNotFoundError("no face in me.png"),
                                 ValueError("bad value 7: use 3"), FileNotFoundError("missing.json not found"),
                                 FileExistsError("out.safetensors exists: pass --overwrite")],
                         ids=lambda e: type(e).__name__)
def test_user_errors_exit_2_with_the_message_and_no_traceback(exc, caplog):
    with caplog.at_level(logging.INFO):
        assert run_main(_raises(exc), argparse.Namespace()) == EXIT_USAGE
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [str(exc)]
    assert not errors[0].exc_info
    assert errors[0].name == __name__  # logged under the command's own module


def test_verbose_adds_the_traceback_to_a_user_error(caplog):
    with caplog.at_level(logging.INFO):
        assert run_main(_raises(ValueError("bad")), argparse.Namespace(verbose=True)) == EXIT_USAGE
    assert caplog.records[-1].exc_info is not None


def test_a_bug_exits_1_with_its_traceback(caplog):
    with caplog.at_level(logging.INFO):
        assert run_main(_raises(KeyError("oops")), argparse.Namespace()) == EXIT_BUG
    record = caplog.records[-1]
    assert record.levelno == logging.ERROR and record.exc_info is not None and record.exc_info[0] is KeyError


def test_ctrl_c_exits_130(caplog):
    with caplog.at_level(logging.INFO):
        assert run_main(_raises(KeyboardInterrupt()), argparse.Namespace()) == EXIT_INTERRUPTED


def test_system_exit_passes_through():
    with pytest.raises(SystemExit):
        run_main(_raises(SystemExit(3)), argparse.Namespace())


@pytest.mark.parametrize(("returned", "code"), [(None, EXIT_OK), (3, 3), ({"summary": 1}, EXIT_OK), (True, EXIT_OK)])
def test_an_int_returned_is_the_exit_code_anything_else_is_0(returned, code):
    assert run_main(lambda args: returned, argparse.Namespace()) == code


def test_log_level_from_verbose_or_log_level():
    assert log_level(argparse.Namespace(verbose=True, log_level="WARNING")) == logging.DEBUG
    assert log_level(argparse.Namespace(log_level="warning")) == "WARNING"
    assert log_level(argparse.Namespace()) == "INFO"


# -- every command, run as a user runs it: a bad argument is one ERROR line and exit 2 -------------------

COMMANDS = {
    "dreamid_core": ["-m", "dreamid_core", "--info", "{missing}"],
    "dreamid_core download": ["-m", "dreamid_core", "download", "{missing}", "--comfyui", "{tmp}"],
    "training.train": ["-m", "training.train", "--config", "{bad_json}", "--output-dir", "{tmp}/run"],
    "training.build_dataset": ["-m", "training.build_dataset", "names", "--out", "{tmp}/ds", "--names", "{missing}"],
    "training.export": ["-m", "training.export", "--checkpoint", "{missing}", "--out", "{tmp}/x.safetensors"],
    "training.evaluate": ["-m", "training.evaluate", "--base-model", "{missing}", "--encoder", "{missing}",
                          "--faces", "{tmp}", "--out", "{tmp}/ev", "--face-model", "{missing}",
                          "--clip-model", "{missing}"],
    "training.evaluate_identities": ["-m", "training.evaluate_identities", "--method", "a=encoder:{missing}",
                                     "--base-model", "{missing}", "--faces", "{tmp}", "--out", "{tmp}/ev",
                                     "--face-model", "{missing}", "--clip-model", "{missing}"],
    "training.learn_identity": ["-m", "training.learn_identity", "--base-model", "{missing}", "--photos", "{missing}",
                                "--out", "{tmp}/me.safetensors"],
}


def _run_all(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Start every command at once and wait for all: each process spends most of its time importing torch,
    so on a few cores they overlap instead of queueing (each test then checks its own process)."""
    procs = {name: subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, argv in commands.items()}
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


@pytest.fixture(scope="module")
def bad_argument_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_arguments")
    bad_json = tmp / "bad.json"
    bad_json.write_text("{not json", encoding="utf-8")  # a ValueError (json), not a DreamIDError
    missing = tmp / "missing_file"
    argvs = {name: [a.format(missing=missing, tmp=tmp / name.replace(" ", "_"), bad_json=bad_json) for a in argv]
             for name, argv in COMMANDS.items()}
    for name in COMMANDS:
        (tmp / name.replace(" ", "_")).mkdir()
    return _run_all(argvs), bad_json, missing


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_bad_argument_exits_2_with_one_line(name, bad_argument_runs):
    runs, bad_json, missing = bad_argument_runs
    proc = runs[name]
    assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    named = bad_json.name if name == "training.train" else missing.name
    assert named in errors[0], errors[0]  # the message names the value at fault
    if name.startswith("training."):
        assert f" ERROR {name}: " in errors[0], errors[0]  # and comes from the command the user typed


HELP = {  # command: an option default that --help must show
    "training.train": "(default: 180.0)",
    "training.build_dataset": None,
    "training.export": None,
    "training.evaluate": "default: 4",
    "training.evaluate_identities": "DDIM steps (default: 30)",
    "training.learn_identity": "(default: 400)",
    "dreamid_core": None,
}


@pytest.fixture(scope="module")
def help_runs():
    return _run_all({name: ["-m", name, "--help"] for name in HELP})


@pytest.mark.parametrize("name", list(HELP))
def test_help_shows_defaults_and_no_markup(name, help_runs):
    proc = help_runs[name]
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "(default: None)" not in text and "default: False" not in text, text  # nothing to show is not shown
    assert "``" not in text and ":mod:" not in text and ":func:" not in text, text  # reST stays in the docstrings
    if HELP[name]:
        assert HELP[name] in " ".join(text.split()), text


def test_train_resume_of_an_empty_folder_says_what_to_do(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "training.train", "--output-dir", str(tmp_path / "run"), "--resume"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_USAGE
    (line,) = [x for x in proc.stderr.splitlines() if " ERROR " in x]
    assert "holds no complete checkpoint" in line and "training/configs/" in line, line


def test_dataset_status_of_a_missing_folder_is_an_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "training.build_dataset", "status", "--out", str(tmp_path / "nope")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_USAGE, proc.stdout[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if " ERROR " in x]
    assert "nope does not exist" in line and "build_dataset names" in line, line
