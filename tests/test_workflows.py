"""Every workflow in workflows/: runs through a real ComfyUI server with tiny models, opens in a
real browser with no missing nodes; and the API's error paths name the node and the fix."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from comfy_env import ARTIFACTS
from comfy_frontend import dismiss_notices, frontend_version, load_in_app
from comfy_server import PromptRejected
from PIL import Image
from template_fixtures import WORKFLOWS, model_files
from workflow_api import load_workflow, nodes_of, set_inputs, strip_meta, ui_to_api, use_tiny_clip, use_tiny_dit

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]
PACK = Path(__file__).resolve().parents[1]
# the server_files fixture (tiny models under the templates' file names, photos) is in conftest.py


def test_workflow_model_names_are_in_the_readme():
    readme = (PACK / "README.md").read_text()
    assert len(WORKFLOWS) >= 4
    for path in WORKFLOWS:
        for name in model_files(load_workflow(path)):
            assert name in readme, f"{path.name} uses {name}, which the README's model table does not list"


def tiny(prompt: dict) -> dict:
    """Shrink a workflow's prompt to the tiny models: 64 px, 2 steps, the 1024-wide tiny SD2 CLIP (FLUX.1: the
    tiny FLUX model and CLIP)."""
    use_tiny_clip(prompt, "sd2", 0, init_seed=0)
    use_tiny_dit(prompt, init_seed=0)
    set_inputs(prompt, "EmptyLatentImage", width=64, height=64)
    set_inputs(prompt, "EmptySD3LatentImage", width=64, height=64)
    set_inputs(prompt, "KSampler", steps=2)
    set_inputs(prompt, "DreamID_ScenePosition", width=64, height=64)
    set_inputs(prompt, "DreamID_HeadPlacement", width=64, height=64)
    set_inputs(prompt, "DreamID_LearnIdentity", steps=2, resolution=64, preview_every=2, snapshot_every=0)
    return prompt


def images_of(server, result) -> list[np.ndarray]:
    """The generated images (SaveImage "DreamIdentity*"), not previews of crops or control hints."""
    return [np.asarray(Image.open(p)) for p in server.output_files(result)
            if p.suffix == ".png" and p.name.startswith("DreamIdentity")]


def run_ok(server, prompt):
    result = server.run(prompt, timeout=240)
    assert result.ok, f"{result.error}\n{server.log_tail()}"
    return result


# the save workflow writes the embedding the reuse workflow reads: run it first
ORDER = sorted(WORKFLOWS, key=lambda p: ("reuse" in p.name, p.name))


@pytest.mark.parametrize("path", ORDER, ids=[p.stem for p in ORDER])
def test_workflow_runs_on_the_server(comfy_server, server_files, path):
    info = comfy_server.object_info()
    prompt = tiny(ui_to_api(load_workflow(path), info))
    result = run_ok(comfy_server, prompt)
    saved = [p for p in comfy_server.output_files(result) if "DreamIdentity" in p.name]
    assert saved and all(p.stat().st_size > 0 for p in saved), "no image written"
    inject = nodes_of(prompt, "DreamID_InjectIDTokens")
    if inject:  # the identity must change the result: same graph with plain text instead of S*
        plain = json.loads(json.dumps(prompt))
        for k in inject:
            ins = plain[k]["inputs"]
            plain[k] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ins["clip"], "text": ins["text"]}}
        with_id, without = images_of(comfy_server, result), images_of(comfy_server, run_ok(comfy_server, plain))
        assert with_id[0].shape == without[0].shape
        assert np.abs(with_id[0].astype(int) - without[0].astype(int)).max() > 0, "S* had no effect"
    if nodes_of(prompt, "DreamID_SaveIDEmbedding"):
        assert (comfy_server.models_dir("embeddings") / "my_identity.safetensors").is_file()


# -- errors seen from the API -----------------------------------------------------------------------

def portrait(comfy_server) -> dict:
    return tiny(ui_to_api(load_workflow(PACK / "workflows" / "dreamid_portrait_sd21.json"), comfy_server.object_info()))


def error_of(comfy_server, prompt, node_type: str) -> str:
    """The failing node's message; asserts it is ``node_type`` that failed."""
    result = comfy_server.run(prompt, timeout=240)
    assert not result.ok and result.error, "the prompt should have failed"
    assert result.error["node_type"] == node_type, result.error
    return result.error["exception_message"]


def the(prompt, class_type) -> str:
    (node,) = nodes_of(prompt, class_type)
    return node


def test_errors_name_the_node_and_the_fix(comfy_server, server_files):
    seed = iter(range(1000, 2000))

    def fresh(prompt):  # a new seed, so ComfyUI's cache cannot answer for a previous run
        set_inputs(prompt, "KSampler", seed=next(seed))
        return prompt

    p = fresh(portrait(comfy_server))
    p[the(p, "LoadImage")]["inputs"]["image"] = "mask.png"
    err = error_of(comfy_server, p, "DreamID_EncodeFace")
    assert "No face found in image 0" in err and "crop closer" in err

    p = fresh(portrait(comfy_server))
    p[the(p, "DreamID_InjectIDTokens")]["inputs"]["text"] = "a photo of a person"
    assert "does not contain the trigger" in error_of(comfy_server, p, "DreamID_InjectIDTokens")

    p = fresh(portrait(comfy_server))
    for k in nodes_of(p, "DreamIDTest_TinyCLIP"):
        p[k]["inputs"].update(kind="sd1", width=64)  # an SD1 CLIP with an SD2 encoder
    assert re.search(r"vectors for \['clip_h'\].*needs \['clip_l'\]", error_of(comfy_server, p, "DreamID_InjectIDTokens"))

    p = fresh(portrait(comfy_server))
    p[the(p, "DreamID_LoadIDEncoder")]["inputs"]["face_detector"] = "insightface/antelopev2"
    assert "scrfd_10g_bnkps.onnx" in error_of(comfy_server, p, "DreamID_LoadIDEncoder")

    corrupt = comfy_server.models_dir("dreamidentity") / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    p = fresh(portrait(comfy_server))
    p[the(p, "DreamID_LoadIDEncoder")]["inputs"]["encoder_name"] = "corrupt.safetensors"
    assert "corrupt" in error_of(comfy_server, p, "DreamID_LoadIDEncoder")

    p = fresh(portrait(comfy_server))
    p[the(p, "DreamID_LoadIDEncoder")]["inputs"]["encoder_name"] = "missing.safetensors"
    with pytest.raises(PromptRejected) as rejected:
        comfy_server.queue(p)
    assert the(p, "DreamID_LoadIDEncoder") in json.dumps(rejected.value.body["node_errors"])

    # the server keeps serving: the next good prompt succeeds
    run_ok(comfy_server, fresh(portrait(comfy_server)))
    history = comfy_server.run(fresh(portrait(comfy_server)), timeout=240).history
    assert history  # still answering /history


# -- the browser ----------------------------------------------------------------------------------

@pytest.mark.browser
def absent_loaders(server, workflow: dict) -> set[str]:
    """Types of the loader nodes whose listed file the test server does not have (FLUX.1's model and text
    encoders: ComfyUI detects those files at their real widths only, the tests build tiny ones in-process)."""
    missing = {m["name"] for m in workflow.get("models", [])
               if not (server.models_dir(m["directory"]) / m["name"]).is_file()}
    return {n["type"] for n in workflow["nodes"] if set(n.get("widgets_values") or []) & missing}


def test_every_workflow_opens_in_the_browser_without_missing_nodes(comfy_server, server_files, browser_page):
    page = browser_page
    page.goto(comfy_server.url + "/")
    # the session's page may have an earlier test's workflow stored: forget it, start clean
    page.evaluate("() => { localStorage.clear(); sessionStorage.clear(); }")
    page.reload()
    page.wait_for_function("() => window.app && window.app.graph", timeout=60_000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"frontend {frontend_version(page)}")
    for path in WORKFLOWS:
        dismiss_notices(page)
        state = load_in_app(page, load_workflow(path))
        absent = absent_loaders(comfy_server, load_workflow(path))
        if absent:  # FLUX.1's files exist only at full size: the frontend names them, nothing else is wrong
            assert not state["missing_nodes"] and set(state["errors"]) <= absent, f"{path.name}: {state}"
        else:  # no error nodes, no missing-nodes/models dialog or error overlay, no schema alert or other toast
            assert state["errors"] == [] and state["notices"] == [] and not state["missing_nodes"], \
                f"{path.name}: {state}"
        assert any(t.startswith("DreamID_") for t in state["types"]) or "reuse" in path.name
        page.screenshot(path=str(ARTIFACTS / f"workflow-{path.stem}.png"))
        api = page.evaluate("async () => (await app.graphToPrompt()).output")
        info = comfy_server.object_info()  # the same prompt as far as the server reads it
        assert strip_meta(ui_to_api(load_workflow(path), info), info) == strip_meta(api, info), path.name
    t0 = time.monotonic()
    templates = page.evaluate("async () => (await (await fetch('/api/workflow_templates')).json())")
    assert any(sorted(v) == sorted(p.stem for p in WORKFLOWS) for v in templates.values()), templates
    print(f"templates listed in {time.monotonic() - t0:.2f} s: {templates}")
