"""Find a real ComfyUI checkout and import it in-process (tests only; no ComfyUI code lives here).

A checkout is found through the ``COMFYUI_PATH`` environment variable, or because this pack sits in
``<ComfyUI>/custom_nodes/<pack>``. Tests that need one skip with :data:`SKIP_REASON` otherwise.

ComfyUI has its own top-level ``nodes``, ``utils``, ``server`` … modules, so :func:`import_comfyui`
puts the checkout FIRST on ``sys.path`` and checks that ``nodes`` really is ComfyUI's ``nodes.py``.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

log = logging.getLogger(__name__)

ENV_VAR = "COMFYUI_PATH"
PACK_DIR = Path(__file__).resolve().parents[1]
# screenshots, server logs, inputs the tests wrote; .ci/run gives each ComfyUI version its own folder
ARTIFACTS = Path(os.environ.get("DREAMID_TEST_ARTIFACTS") or PACK_DIR / "test-artifacts")

SKIP_REASON = (
    "no ComfyUI checkout found. To run these tests set COMFYUI_PATH to a ComfyUI checkout "
    "(a folder holding main.py and comfy/), e.g. `git clone https://github.com/comfyanonymous/ComfyUI "
    "~/ComfyUI && export COMFYUI_PATH=~/ComfyUI` (install its requirements.txt into this venv), "
    "or put this pack inside <ComfyUI>/custom_nodes/."
)


def skip_reason() -> str:
    """Why no ComfyUI was found, with how to get one (SKIP_REASON plus a bad COMFYUI_PATH)."""
    env = os.environ.get(ENV_VAR)
    if env and not looks_like_comfyui(Path(env).expanduser()):
        return f"{ENV_VAR}={env} is not a ComfyUI checkout (needs main.py, nodes.py, comfy/); " + SKIP_REASON
    return SKIP_REASON


def looks_like_comfyui(path: Path) -> bool:
    """True when ``path`` holds ComfyUI's ``main.py``, ``nodes.py`` and the ``comfy`` package."""
    return (path / "main.py").is_file() and (path / "nodes.py").is_file() and (path / "comfy").is_dir()


def find_comfyui() -> Path | None:
    """The ComfyUI checkout to test against, or None (the reason is logged)."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser().resolve()
        if looks_like_comfyui(path):
            return path
        log.warning("%s=%s does not look like ComfyUI (needs main.py, nodes.py and comfy/)", ENV_VAR, env)
        return None
    # The pack installed as <ComfyUI>/custom_nodes/<pack> (checked unresolved and resolved: symlinks).
    for here in (Path(__file__).absolute().parents[1], PACK_DIR):
        if here.parent.name == "custom_nodes" and looks_like_comfyui(here.parent.parent):
            return here.parent.parent.resolve()
    log.info("%s is not set and the pack is not inside <ComfyUI>/custom_nodes/", ENV_VAR)
    return None


def _drop_foreign_module(name: str, comfy_path: Path) -> None:
    """Forget an already imported top-level ``name`` (and its submodules) that is not ComfyUI's."""
    mod = sys.modules.get(name)
    if mod is None:
        return
    file = getattr(mod, "__file__", None)
    if file and Path(file).resolve().is_relative_to(comfy_path):
        return
    log.warning("dropping foreign module %r (%s) that shadows ComfyUI's", name, file)
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


def import_comfyui(path: str | os.PathLike) -> SimpleNamespace:
    """Import ComfyUI from ``path`` in this process, CPU only; return its main modules.

    Returns a namespace with ``path``, ``nodes``, ``folder_paths``, ``model_management``, ``args``.
    Command-line parsing stays off (``comfy.options.enable_args_parsing`` is not called), so
    ``args`` are ComfyUI's defaults plus ``cpu=True``.
    """
    path = Path(path).resolve()
    if not looks_like_comfyui(path):
        raise FileNotFoundError(f"{path} is not a ComfyUI checkout (needs main.py, nodes.py, comfy/)")
    if str(path) in sys.path:
        sys.path.remove(str(path))
    sys.path.insert(0, str(path))
    for name in ("nodes", "utils", "server", "execution", "folder_paths", "app", "comfy"):
        _drop_foreign_module(name, path)

    importlib.import_module("comfy.options")
    cli_args = importlib.import_module("comfy.cli_args")
    if "comfy.model_management" in sys.modules and not cli_args.args.cpu:
        raise RuntimeError("comfy.model_management was imported before args.cpu was set; import "
                           "ComfyUI only through tests/comfy_env.import_comfyui")
    cli_args.args.cpu = True  # must precede the first import of comfy.model_management

    folder_paths = importlib.import_module("folder_paths")
    nodes = importlib.import_module("nodes")
    nodes_file = Path(nodes.__file__).resolve()
    assert nodes_file == path / "nodes.py", f"`nodes` resolved to {nodes_file}, not ComfyUI's nodes.py"
    model_management = importlib.import_module("comfy.model_management")
    assert model_management.cpu_state == model_management.CPUState.CPU, "ComfyUI is not in CPU mode"
    return SimpleNamespace(path=path, nodes=nodes, folder_paths=folder_paths,
                           model_management=model_management, args=cli_args.args)


def _run_maybe_async(value):
    """``load_custom_node`` is a coroutine function in recent ComfyUI and plain in older ones."""
    if not inspect.isawaitable(value):
        return value
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(value)
    box: dict = {}  # called from inside a running loop: run it on a helper thread's own loop
    thread = threading.Thread(target=lambda: box.setdefault("r", asyncio.run(value)))
    thread.start()
    thread.join()
    return box["r"]


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def load_pack(comfy_nodes_module, pack_dir: str | os.PathLike = PACK_DIR) -> dict[str, type]:
    """Load a node pack through ComfyUI's own ``nodes.load_custom_node``; return the node classes
    it registered (``{node_id: class}``). Raises ImportError with ComfyUI's log when it fails."""
    nodes = comfy_nodes_module
    pack_dir = Path(pack_dir)
    module_name = nodes.get_module_name(str(pack_dir)) if hasattr(nodes, "get_module_name") else pack_dir.name
    relative = f"custom_nodes.{module_name}"
    before = dict(nodes.NODE_CLASS_MAPPINGS)
    # Like init_external_custom_nodes: other packs' and core names cannot be overridden.
    ignore = {k for k, v in before.items() if getattr(v, "RELATIVE_PYTHON_MODULE", None) != relative}
    capture = _Capture()
    logging.getLogger().addHandler(capture)
    try:
        ok = _run_maybe_async(nodes.load_custom_node(str(pack_dir), ignore=ignore, module_parent="custom_nodes"))
    finally:
        logging.getLogger().removeHandler(capture)
    if not ok:
        raise ImportError(f"ComfyUI could not load the pack {pack_dir}:\n" + "\n".join(capture.lines))
    loaded = {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items()
              if getattr(v, "RELATIVE_PYTHON_MODULE", None) == relative}
    loaded.update({k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if before.get(k) is not v})
    log.info("loaded pack %s: %s", pack_dir, sorted(loaded) or "no nodes")
    return loaded
