"""Shared fixtures: a real ComfyUI in-process (``comfyui``), as a server (``comfy_server``) and in
Chromium (``browser_page``). Each skips with a printed reason when its prerequisite is missing
(see ``-rs``). Markers ``comfyui``, ``browser``, ``slow`` are registered in pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py

from comfy_env import ARTIFACTS, find_comfyui, import_comfyui, skip_reason  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ALLOWED_HOSTS = {"127.0.0.1"}
REQUIRE_ENV = "DREAMID_REQUIRE_COMFYUI"
# Loaders the frontend (1.27.x modelToNode store) looks up by name while building ckpt_name /
# lora_name / vae_name widgets; one missing from /object_info (UpscaleModelLoader when `spandrel` is
# not installed) throws inside widget creation and leaves CheckpointLoaderSimple broken (has_errors).
FRONTEND_MODEL_LOADERS = ("CheckpointLoaderSimple", "ImageOnlyCheckpointLoader", "LoraLoader",
                          "LoraLoaderModelOnly", "VAELoader", "ControlNetLoader", "UNETLoader",
                          "UpscaleModelLoader", "StyleModelLoader", "GLIGENLoader")


COMFY_FIXTURES = {"comfy_path", "comfyui", "comfy_server"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """A test that uses a ComfyUI / browser fixture carries the matching marker even when its file
    forgot it: CI runs `-m "comfyui or browser"` against a second ComfyUI version."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & COMFY_FIXTURES and item.get_closest_marker("comfyui") is None:
            item.add_marker(pytest.mark.comfyui)
        if "browser_page" in names and item.get_closest_marker("browser") is None:
            item.add_marker(pytest.mark.browser)


def _skip(reason: str):
    print(f"\nSKIP: {reason}", file=sys.stderr)
    pytest.skip(reason)


def _skip_comfyui(reason: str):
    """Skip for lack of a working ComfyUI; fail instead under DREAMID_REQUIRE_COMFYUI=1 (set by
    .ci/run when it found one: a run that silently skipped the version it tests would prove nothing)."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: a ComfyUI was expected here)", pytrace=False)
    _skip(reason)


@pytest.fixture(scope="session")
def comfy_path() -> Path:
    path = find_comfyui()
    if path is None:
        _skip_comfyui(skip_reason())
    return path


@pytest.fixture(scope="session")
def comfyui(comfy_path):
    """ComfyUI imported in this process (CPU): namespace with ``nodes``, ``folder_paths``,
    ``model_management``, ``args``, ``path``, ``base``, and ``models_dir(name)`` (a temp model folder
    registered first for ``name``). Output/input/temp/user directories point into ``base``, a temp
    dir removed at the end of the session."""
    try:
        env = import_comfyui(comfy_path)
    except Exception as e:  # a broken checkout or missing requirements: say so, don't error every test
        _skip_comfyui(f"ComfyUI at {comfy_path} does not import in-process: {type(e).__name__}: {e}")
    base = Path(tempfile.mkdtemp(prefix="comfyui-inproc-"))
    fp = env.folder_paths
    for sub, setter in (("out", fp.set_output_directory), ("in", fp.set_input_directory),
                        ("temp", fp.set_temp_directory), ("user", fp.set_user_directory)):
        (base / sub).mkdir()
        setter(str(base / sub))

    def models_dir(name: str) -> Path:
        path = base / "models" / name
        path.mkdir(parents=True, exist_ok=True)
        fp.add_model_folder_path(name, str(path), is_default=True)
        return path

    env.models_dir = models_dir
    env.base = base
    yield env
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def comfy_server(comfy_path):
    """A running ComfyUI server (``tests/comfy_server.ComfyServer``) with this pack and the test
    node pack loaded; stopped (process group killed, temp dir removed) at the end of the session.
    Its log is kept as comfy-server.log in ``comfy_env.ARTIFACTS`` (test-artifacts/)."""
    from comfy_server import ComfyServer

    server = ComfyServer(comfy_path)
    try:
        server.start()
    except Exception:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "comfy-server.log").write_text(server.log_text())
        server.stop()
        raise
    print(f"\nComfyUI server ready at {server.url} in {server.startup_s:.1f} s", file=sys.stderr)
    try:
        yield server
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "comfy-server.log").write_text(server.log_text())
        server.stop()


@pytest.fixture(scope="session")
def browser_page():
    """A Playwright page in Debian's headless Chromium with a fresh profile; every request to a
    host other than 127.0.0.1 is aborted (``page.blocked_urls`` lists them). Frontend model loaders
    missing from /object_info get browser-side stub definitions (``page.stubbed_node_types``; see
    FRONTEND_MODEL_LOADERS) so the frontend does not break every checkpoint loader widget."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip("the playwright Python package is missing (pip install playwright; do not run "
              "`playwright install`, the tests use /usr/bin/chromium)")
    if not CHROMIUM.exists():
        _skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    blocked: list[str] = []
    stubbed: list[str] = []

    def guard(route):
        url = route.request.url
        parsed = urlparse(url)
        if parsed.hostname in ALLOWED_HOSTS and parsed.path.endswith("/object_info"):
            _stub_missing_loaders(route, stubbed)
        elif url.startswith(("data:", "blob:")) or parsed.hostname in ALLOWED_HOSTS:
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    with sync_playwright() as pw:
        t0 = time.monotonic()
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 900})
        try:
            context.route("**/*", guard)
            page = context.pages[0] if context.pages else context.new_page()
            page.blocked_urls = blocked
            page.stubbed_node_types = stubbed
            print(f"\nChromium started in {time.monotonic() - t0:.1f} s", file=sys.stderr)
            yield page
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def _stub_missing_loaders(route, stubbed: list[str]) -> None:
    response = route.fetch()
    info = response.json()
    template = info.get("CheckpointLoaderSimple")
    missing = [name for name in FRONTEND_MODEL_LOADERS if name not in info]
    if template and missing:
        for name in missing:
            info[name] = {**template, "name": name, "display_name": f"{name} (harness stub)",
                          "description": "browser-side stub: not installed on the server",
                          "category": "_harness_stub", "deprecated": True}
        stubbed[:] = missing
        print(f"\nfrontend workaround: stubbed missing loaders {missing} in /object_info "
              "(install ComfyUI's full requirements.txt, e.g. spandrel, to avoid this)", file=sys.stderr)
    route.fulfill(response=response, json=info)


# -- the shipped templates on the test server and in the browser (tests/template_fixtures.py) -------

@pytest.fixture(scope="session")
def server_files(comfyui, comfy_server):
    """Tiny models under the file names the templates load, real photos in the server's input folder
    (``template_fixtures.write_server_files``); {file name: a template that loads it}."""
    from template_fixtures import IMAGES, write_server_files

    if IMAGES is None:
        _skip("insightface (sample photos) is not installed")
    return write_server_files(comfy_server)


@pytest.fixture(scope="session")
def templates_in_app(comfy_server, server_files, browser_page):
    """The templates loaded and run in the browser, each run at most once per session
    (``template_fixtures.TemplatesInApp``)."""
    from template_fixtures import TemplatesInApp

    return TemplatesInApp(browser_page, comfy_server)


# -- the training tests' tiny setup (tests/training_fixtures.py builds it) ----------------------------

@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process training run starts from a clean slate."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def setup_root(tmp_path_factory) -> Path:
    """A folder for one test module's tiny training setup."""
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def cfg(setup_root):
    """The tiny seeded SD2 training setup (base model, backbone, editing manifest) as an ExperimentConfig."""
    from training_fixtures import make_setup

    return make_setup(setup_root)
