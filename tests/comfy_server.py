"""A real ComfyUI server in a subprocess, in a throw-away base directory (tests only).

    with ComfyServer(find_comfyui()) as server:
        write_tiny_sd2_checkpoint(server.models_dir("checkpoints") / "tiny_sd2.safetensors")
        result = server.wait(server.queue(api_prompt), timeout=60)
        assert result.ok, result.error

Layout of the base dir D: ``models/<name>`` for checkpoints, controlnet, embeddings, dreamidentity,
insightface (registered through an extra_model_paths YAML, ``is_default`` so they come first),
``custom_nodes/`` (also from the YAML; it holds symlinks to this pack as ``ComfyUI-DreamIdentity`` and
to ``tests/comfy_test_nodes``), ``user/`` (frontend settings seeded: no first-run template dialog),
``out/``, ``temp/`` (ComfyUI appends ``temp/``), ``in/``, ``comfy.db``, ``server.log``.
Only those two packs load (``--disable-all-custom-nodes --whitelist-custom-nodes``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PACK_DIR = Path(__file__).resolve().parents[1]
TEST_NODES_DIR = Path(__file__).resolve().parent / "comfy_test_nodes"
PACK_NAME = "ComfyUI-DreamIdentity"
TEST_PACK_NAME = "ComfyUI-DreamIdentity-TestNodes"
MODEL_FOLDERS = ("checkpoints", "controlnet", "embeddings", "dreamidentity", "insightface", "vae", "diffusion_models",
                 "text_encoders")
# Frontend settings of the "default" user: no first-run template browser over the canvas.
FRONTEND_SETTINGS = {"Comfy.TutorialCompleted": True}


class PromptRejected(RuntimeError):
    """POST /prompt refused the prompt (validation); ``.body`` holds ``error`` and ``node_errors``."""

    def __init__(self, body: dict):
        self.body = body
        super().__init__(json.dumps(body, indent=1)[:4000])


@dataclass
class PromptResult:
    """One finished prompt from /history: ``status`` is "success" or "error"."""

    prompt_id: str
    status: str
    outputs: dict = field(default_factory=dict)
    error: dict | None = None  # the execution_error message: node_id, node_type, exception_message, …
    history: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "success"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _multipart(fields: dict[str, str], file_field: str, path: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{path.name}"'
                 f"\r\nContent-Type: application/octet-stream\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class ComfyServer:
    """Start/stop a ComfyUI server (``--cpu``) on a free 127.0.0.1 port with this pack loaded."""

    def __init__(self, comfy_path: str | os.PathLike, *, pack_dir: str | os.PathLike = PACK_DIR,
                 extra_args: tuple[str, ...] = ("--disable-api-nodes",), python: str = sys.executable,
                 keep_dir: bool = False, settings: dict | None = None):
        self.comfy_path = Path(comfy_path).resolve()
        self.pack_dir = Path(pack_dir).resolve()
        self.extra_args = tuple(extra_args)
        self.python = python
        self.keep_dir = keep_dir
        self.settings = {**FRONTEND_SETTINGS, **(settings or {})}
        self.base = Path(tempfile.mkdtemp(prefix="comfy-server-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.log_path = self.base / "server.log"
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self._prepare()

    # ---- layout ------------------------------------------------------------------------------
    def _prepare(self) -> None:
        for sub in ("user", "out", "temp", "in", "custom_nodes", *(f"models/{m}" for m in MODEL_FOLDERS)):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "custom_nodes" / PACK_NAME).symlink_to(self.pack_dir, target_is_directory=True)
        (self.base / "custom_nodes" / TEST_PACK_NAME).symlink_to(TEST_NODES_DIR, target_is_directory=True)
        lines = ["dreamid_tests:", f"  base_path: {json.dumps(str(self.base))}", "  is_default: true"]
        lines += [f"  {m}: models/{m}" for m in MODEL_FOLDERS] + ["  custom_nodes: custom_nodes"]
        (self.base / "extra_model_paths.yaml").write_text("\n".join(lines) + "\n")
        (self.base / "user" / "default").mkdir()
        (self.base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(self.settings))

    def models_dir(self, name: str) -> Path:
        """A model folder the server searches (created on demand; files dropped in are seen at once)."""
        path = self.base / "models" / name
        path.mkdir(parents=True, exist_ok=True)
        if name not in MODEL_FOLDERS:
            log.warning("models/%s is not in the server's extra_model_paths (only %s)", name, MODEL_FOLDERS)
        return path

    @property
    def output_dir(self) -> Path:
        return self.base / "out"

    @property
    def input_dir(self) -> Path:
        return self.base / "in"

    def command(self) -> list[str]:
        d = self.base
        return [self.python, str(self.comfy_path / "main.py"), "--cpu", "--listen", "127.0.0.1",
                "--port", str(self.port), "--disable-auto-launch", "--disable-all-custom-nodes",
                "--whitelist-custom-nodes", PACK_NAME, TEST_PACK_NAME,
                "--extra-model-paths-config", str(d / "extra_model_paths.yaml"),
                "--user-directory", str(d / "user"), "--output-directory", str(d / "out"),
                "--temp-directory", str(d / "temp"), "--input-directory", str(d / "in"),
                "--database-url", f"sqlite:///{d / 'comfy.db'}", *self.extra_args]

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> ComfyServer:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}
        env.pop("PYTHONPATH", None)
        t0 = time.monotonic()
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(self.command(), cwd=self.comfy_path, env=env, stdout=logf,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)  # own process group: killpg on stop
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during start:\n{self.log_tail()}")
            try:
                self._request("GET", "/object_info/CheckpointLoaderSimple", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() - t0 > timeout:
                    self.kill()  # keep the base dir (and log) for the caller; stop() removes it
                    raise TimeoutError(f"ComfyUI not ready after {timeout:.0f} s:\n{self.log_tail()}") from None
                time.sleep(0.3)
        self.startup_s = time.monotonic() - t0
        log.info("ComfyUI ready at %s in %.1f s (base %s)", self.url, self.startup_s, self.base)
        return self

    def kill(self) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc is not None and self.proc.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.proc is not None:
            try:  # stragglers left in the group (none expected from ComfyUI itself)
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc = None

    def stop(self) -> None:
        """Kill the server's process group and (unless keep_dir) remove the base dir."""
        self.kill()
        if not self.keep_dir:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> ComfyServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- HTTP API ----------------------------------------------------------------------------
    def _request(self, method: str, route: str, body: bytes | None = None,
                 content_type: str = "application/json", timeout: float = 30):
        req = urllib.request.Request(self.url + route, data=body, method=method,
                                     headers={"Content-Type": content_type} if body is not None else {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = resp.read()
        return json.loads(data) if data else None

    def object_info(self, node_class: str | None = None) -> dict:
        """/object_info (all node definitions) or /object_info/<class> (that one, by class name)."""
        if node_class is None:
            return self._request("GET", "/object_info")
        return self._request("GET", f"/object_info/{node_class}").get(node_class, {})

    def queue(self, api_prompt: dict) -> str:
        """POST an API-format prompt; returns its prompt_id. Raises PromptRejected on validation errors."""
        body = json.dumps({"prompt": api_prompt, "client_id": self.client_id}).encode()
        try:
            return self._request("POST", "/prompt", body)["prompt_id"]
        except urllib.error.HTTPError as e:
            payload = e.read()
            try:
                raise PromptRejected(json.loads(payload)) from None
            except json.JSONDecodeError:
                raise RuntimeError(f"/prompt answered {e.code}: {payload[:2000]!r}") from None

    def wait(self, prompt_id: str, timeout: float = 120.0) -> PromptResult:
        """Poll /history/<id> until the prompt finished (success or error)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            entry = (self._request("GET", f"/history/{prompt_id}") or {}).get(prompt_id)
            status = (entry or {}).get("status") or {}
            if entry and (status.get("completed") or status.get("status_str") == "error"):
                error = next((data for kind, data in status.get("messages", []) if kind == "execution_error"), None)
                return PromptResult(prompt_id, status.get("status_str", "unknown"), entry.get("outputs", {}),
                                    error, entry)
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, api_prompt: dict, timeout: float = 120.0) -> PromptResult:
        return self.wait(self.queue(api_prompt), timeout)

    def upload_image(self, path: str | os.PathLike, subfolder: str = "") -> str:
        """POST /upload/image (overwrite); returns the name LoadImage takes (``sub/name`` or ``name``)."""
        body, ctype = _multipart({"type": "input", "overwrite": "true", "subfolder": subfolder},
                                 "image", Path(path))
        info = self._request("POST", "/upload/image", body, content_type=ctype)
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def output_files(self, result: PromptResult) -> list[Path]:
        """Files the prompt's output nodes reported (images, …), as paths on disk."""
        roots = {"output": self.output_dir, "temp": self.base / "temp" / "temp", "input": self.input_dir}
        files = []
        for node_out in result.outputs.values():
            for items in node_out.values():
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and "filename" in item:
                        files.append(roots.get(item.get("type"), self.output_dir) / item.get("subfolder", "")
                                     / item["filename"])
        return files

    def interrupt(self) -> None:
        """POST /interrupt: Cancel, as the frontend's button does."""
        self._request("POST", "/interrupt", b"{}")

    def watch(self) -> Watcher:
        """A websocket listener for this server's client id (use as a context manager)."""
        return Watcher(self)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class Watcher:
    """What the server sends this client over its websocket while active: JSON events (``events``: (type,
    data)) and binary messages (``binary``: (event type, payload)), e.g. 1 = a preview image (JPEG/PNG
    after a 4-byte format field), 3 = a node's progress text. Runs aiohttp (a ComfyUI requirement) on its
    own thread; ``wait_for(predicate)`` polls what arrived."""

    def __init__(self, server: ComfyServer) -> None:
        self.server = server
        self.events: list[tuple[str, dict]] = []
        self.binary: list[tuple[int, bytes]] = []
        self._stop = None
        self._thread = None
        self._ready = None

    def __enter__(self) -> Watcher:
        import asyncio
        import threading

        import aiohttp

        self._ready = threading.Event()
        url = f"ws://127.0.0.1:{self.server.port}/ws?clientId={self.server.client_id}"

        async def run():
            self._stop = asyncio.Event()
            async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        msg = await asyncio.wait_for(ws.receive(), timeout=0.2)
                    except asyncio.TimeoutError:
                        continue
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        data = json.loads(msg.data)
                        self.events.append((data.get("type"), data.get("data") or {}))
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        self.binary.append((int.from_bytes(msg.data[:4], "big"), bytes(msg.data[4:])))
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        break

        def main():
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(run())

        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()
        if not self._ready.wait(20):
            raise TimeoutError("the websocket did not connect")
        return self

    def __exit__(self, *exc) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def wait_for(self, predicate, timeout: float = 120.0) -> bool:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if predicate(self):
                return True
            time.sleep(0.1)
        return False

    def previews(self) -> list[bytes]:
        return [payload[4:] for kind, payload in self.binary if kind in (1, 4)]

    def texts(self) -> list[str]:
        """Progress texts (binary event 3: node id length, node id, text)."""
        out = []
        for kind, payload in self.binary:
            if kind == 3:
                n = int.from_bytes(payload[:4], "big")
                out.append(payload[4 + n:].decode("utf-8", "replace"))
        return out
