"""Every template lists the public files it needs in its top-level ``models`` (name, url, directory:
what ComfyUI's frontend reads), points only at files that exist in public repositories, leaves the
unpublished encoder out, has a thumbnail; and in Chromium, against the real frontend, a missing model
is named by the frontend's missing-model notice (a dialog in frontend 1.2x, the error overlay's
details in 1.4x) with the workflow's URL."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from comfy_env import find_comfyui
from comfy_frontend import DETAILS_PANEL, dismiss_notices, error_details, frontend_version, load_in_app
from PIL import Image

from dreamid_core.cli.download import COMFYUI_FOLDERS, parse_entry

PACK = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((PACK / "workflows").glob("*.json"))
# loaders whose file the templates expect to be public, and the ComfyUI folder each reads
PUBLIC_LOADERS = {"CheckpointLoaderSimple": "checkpoints", "ControlNetLoader": "controlnet",
                  "UNETLoader": "diffusion_models", "DualCLIPLoader": "text_encoders", "VAELoader": "vae"}
ENCODER_LOADER = "DreamID_LoadIDEncoder"
FILE_NODES = {*PUBLIC_LOADERS, ENCODER_LOADER, "LoadImage"}  # nodes naming a file the test server lacks
# ComfyUI 0.3.64's folder_paths names, for when no ComfyUI checkout is at hand
FALLBACK_FOLDERS = {"checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
                    "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen",
                    "upscale_models", "custom_nodes", "hypernetworks", "photomaker", "classifiers",
                    "model_patches", "audio_encoders"}


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def widget_files(workflow: dict, node_type: str) -> set[str]:
    return {v for n in workflow["nodes"] if n["type"] == node_type for v in n.get("widgets_values") or []
            if isinstance(v, str) and v.endswith((".safetensors", ".ckpt", ".pt", ".sft"))}


def comfyui_folder_names() -> set[str]:
    """The model folder names of the ComfyUI at hand, read from its folder_paths.py (not imported)."""
    root = find_comfyui()
    source = root / "folder_paths.py" if root else None
    if source is None or not source.is_file():
        return FALLBACK_FOLDERS
    return set(re.findall(r'folder_names_and_paths\["([a-z0-9_]+)"\]\s*=', source.read_text()))


def test_there_are_templates():
    assert len(WORKFLOWS) >= 6


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_models_entries_are_hub_files_in_real_comfyui_folders(path):
    workflow = load(path)
    models = workflow.get("models")
    assert isinstance(models, list) and models, f"{path.name} has no top-level models list"
    folders = comfyui_folder_names()
    for raw in models:
        assert set(raw) >= {"name", "url", "directory"}, raw
        entry = parse_entry(raw, path.name)  # raises on a non-resolve URL, name != file name, unknown folder
        assert raw["url"].startswith("https://huggingface.co/") and "/resolve/" in raw["url"]
        assert raw["url"].rsplit("/", 1)[1].split("?")[0] == raw["name"]
        assert raw["directory"] in folders, f"{raw['directory']} is not a folder of this ComfyUI ({sorted(folders)})"
        assert raw["directory"] in COMFYUI_FOLDERS
        assert raw["name"].endswith((".safetensors", ".sft")), "frontend 1.2x offers only these suffixes"
        assert entry.repo_id.count("/") == 1


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_public_file_a_template_loads_is_listed_and_the_encoder_is_not(path):
    workflow = load(path)
    listed = {(m["directory"], m["name"]) for m in workflow.get("models", [])}
    used = {(folder, name) for node_type, folder in PUBLIC_LOADERS.items()
            for name in widget_files(workflow, node_type)}
    assert used <= listed, f"{path.name} loads {sorted(used - listed)} without listing them in models"
    encoders = widget_files(workflow, ENCODER_LOADER)
    assert not {name for _, name in listed} & encoders, "no public encoder file exists: do not offer one"


def test_readme_cites_each_listed_files_model_card():
    readme = (PACK / "README.md").read_text()
    for path in WORKFLOWS:
        for raw in load(path).get("models", []):
            entry = parse_entry(raw, path.name)
            assert f"https://huggingface.co/{entry.repo_id})" in readme, f"README does not cite {entry.repo_id}"
            assert f"`{entry.name}`" in readme


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_each_template_has_a_small_jpeg_thumbnail(path):
    thumb = path.with_suffix(".jpg")
    assert thumb.is_file(), f"{thumb.name} is missing (the template browser shows it)"
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and max(im.size) <= 512 and min(im.size) >= 64
        assert len(set(im.convert("L").resize((32, 32)).tobytes())) > 8, "a blank thumbnail"
    assert thumb.stat().st_size < 100_000


# -- the browser ----------------------------------------------------------------------------------

def _what_the_user_is_told(page, state: dict) -> str:
    """Every notice text plus the error overlay's details panel (frontend 1.4x), whichever shows."""
    texts = list(state["notices"])
    panel = page.locator(DETAILS_PANEL)
    if panel.count() and panel.first.is_visible():
        texts.append(panel.first.inner_text())
    else:
        texts.append(error_details(page))
    return "\n".join(t for t in texts if t)


@pytest.mark.browser
def test_missing_models_are_named_by_the_frontend_with_the_workflows_url(comfy_server, browser_page):
    page = browser_page
    moved: list[tuple[Path, Path]] = []
    try:
        # the models must be absent for the check: set aside any file an earlier test put there
        for path in WORKFLOWS:
            for raw in load(path)["models"]:
                present = comfy_server.models_dir(raw["directory"]) / raw["name"]
                if present.exists() and not any(p == present for p, _ in moved):
                    aside = present.with_name(present.name + ".aside")
                    shutil.move(present, aside)
                    moved.append((present, aside))
        print(f"frontend: set aside {len(moved)} model files")
        page.goto(comfy_server.url + "/")
        page.evaluate("() => { localStorage.clear(); sessionStorage.clear(); }")
        page.reload()  # a fresh model store, so the folder listing is read after the files went aside
        page.wait_for_function("() => window.app && window.app.graph", timeout=60_000)
        for path in WORKFLOWS:
            dismiss_notices(page)
            state = load_in_app(page, load(path))
            told = _what_the_user_is_told(page, state)
            version = frontend_version(page)
            for raw in load(path)["models"]:
                assert raw["name"] in told, f"{path.name} (frontend {version}): {raw['name']} not named in {told!r}"
            # the notice points at the workflow's URL (1.2x: the download button's title; 1.4x keeps it
            # behind a copy-link button, so there only the name is on screen)
            titles = page.evaluate("() => [...document.querySelectorAll('[title]')].map(e => e.title)")
            if version.startswith("1.2"):
                for raw in load(path)["models"]:
                    assert raw["url"] in titles, f"{path.name}: no control offers {raw['url']}"
            # nothing offers the unpublished encoder for download
            for name in widget_files(load(path), ENCODER_LOADER):
                assert not [t for t in titles if name in t and t.startswith("http")], titles
            # no missing node types; frontend 1.4x also flags the nodes whose files are absent (here the
            # models, the encoder and the example photo)
            assert not state["missing_nodes"], f"{path.name}: {state['missing_text']}"
            assert set(state["errors"]) <= FILE_NODES, f"{path.name}: nodes in error: {state['errors']}"
            dismiss_notices(page)
    finally:
        for present, aside in moved:
            shutil.move(aside, present)
