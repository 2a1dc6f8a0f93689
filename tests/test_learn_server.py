"""Learning watched through a real ComfyUI server, as the frontend sees it over its websocket: previews on the
learn node's progress while it learns, Cancel that leaves a snapshot and says where, and a server killed
mid-run that leaves no torn snapshot file."""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import pytest
from face_photos import face_photo, needs_photos
from PIL import Image
from test_learn_workflow import tiny_learn
from workflow_api import nodes_of

from dreamid_core.identities.learned_identity import load_learned_identity

pytestmark = [pytest.mark.comfyui, pytest.mark.slow, needs_photos]
PACK = Path(__file__).resolve().parents[1]


def _setup(server, tmp_path: Path):
    from comfy_tiny import write_tiny_sd2_checkpoint

    ckpt = server.models_dir("checkpoints") / "v2-1_512-ema-pruned.safetensors"
    if not ckpt.is_file():
        write_tiny_sd2_checkpoint(ckpt)
    path = tmp_path / "learn_face.png"
    face_photo("tom", size=128).save(path)
    server.upload_image(path)


@pytest.fixture(scope="module")
def server(comfyui, comfy_server, tmp_path_factory):
    _setup(comfy_server, tmp_path_factory.mktemp("photo"))
    return comfy_server


def _progress_of(watcher, node: str) -> list[int]:
    return [d["value"] for kind, d in watcher.events if kind == "progress" and str(d.get("node")) == node]


def test_previews_show_on_the_learn_node_while_it_learns(server):
    prompt = tiny_learn(server, steps=3, preview_every=1, seed=21, name="watched")
    (learn,) = nodes_of(prompt, "DreamID_LearnIdentity")
    with server.watch() as watcher:
        result = server.run(prompt, timeout=300)
        assert result.ok, f"{result.error}\n{server.log_tail()}"
        previews = watcher.previews()
    assert len(previews) >= 3, (len(previews), watcher.binary[:3])
    images = [Image.open(io.BytesIO(p)) for p in previews[:3]]
    assert all(im.size[0] == im.size[1] <= 512 for im in images), [im.size for im in images]  # square, as sent
    assert {1, 2, 3} <= set(_progress_of(watcher, learn))


def test_cancel_keeps_a_snapshot_and_the_node_says_where(server):
    prompt = tiny_learn(server, steps=400, preview_every=0, snapshot_every=0, seed=22, name="server_cancel")
    (learn,) = nodes_of(prompt, "DreamID_LearnIdentity")
    folder = server.models_dir("dreamidentity") / "identities"
    with server.watch() as watcher:
        prompt_id = server.queue(prompt)
        assert watcher.wait_for(lambda w: max(_progress_of(w, learn) or [0]) >= 3, timeout=300), server.log_tail()
        t0 = time.monotonic()
        server.interrupt()
        result = server.wait(prompt_id, timeout=120)
        stopped_in = time.monotonic() - t0
        assert watcher.wait_for(lambda w: any("stopped at step" in t for t in w.texts()), timeout=30)
        text = next(t for t in watcher.texts() if "stopped at step" in t)
    assert not result.ok and stopped_in < 30
    (snapshot,) = folder.glob("server_cancel_*.safetensors")
    ident = load_learned_identity(snapshot)
    assert ident.resume is not None and ident.resume.step >= 3
    assert f"identities/{snapshot.name}" in text and str(server.base) not in text


def test_a_killed_server_leaves_no_torn_snapshot(comfy_path, tmp_path):
    """kill -9 while snapshots are written every step: every .safetensors left loads (a write is a temp file
    renamed into place), and none of them is half written."""
    from comfy_server import ComfyServer

    with ComfyServer(comfy_path) as fresh:
        _setup(fresh, tmp_path)
        prompt = tiny_learn(fresh, steps=2000, preview_every=0, snapshot_every=1, seed=23, name="killed")
        folder = fresh.models_dir("dreamidentity") / "identities"
        fresh.queue(prompt)
        t0 = time.monotonic()
        while len(list(folder.glob("killed_*.safetensors"))) < 5:
            assert time.monotonic() - t0 < 300, fresh.log_tail()
            time.sleep(0.05)
        os.killpg(fresh.proc.pid, signal.SIGKILL)
        fresh.proc.wait(30)
        files = sorted(folder.glob("killed_*.safetensors"))
        assert len(files) >= 5
        steps = [load_learned_identity(f).resume.step for f in files]  # each one whole
        assert steps == sorted(steps) and steps[0] == 1
        hidden = [p.name for p in folder.iterdir() if p.name.startswith(".")]
        assert all(name.endswith(".tmp") for name in hidden)  # at most the write that was cut, under a temp name
