"""The ComfyUI test harness proves itself on ComfyUI's own core nodes (no pack nodes needed):
(a) tiny real CLIPs / checkpoint / ControlNet in-process, (b) a real server runs a sampling graph and
survives bad prompts, (c) Chromium loads a UI workflow and the UI→API converter matches the frontend.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from comfy_env import ARTIFACTS
from comfy_frontend import dismiss_notices, frontend_version, load_in_app, open_app
from comfy_server import PromptRejected
from comfy_tiny import (
    SD2_CONTEXT_WIDTH,
    TINY_WIDTHS,
    server_sd2_clip,
    tiny_clip,
    write_tiny_controlnet,
    write_tiny_sd2_checkpoint,
)
from workflow_api import nodes_of, strip_meta, ui_to_api, use_tiny_clip

CKPT, CONTROLNET = "tiny_sd2.safetensors", "tiny_cn.safetensors"
PACK_NODE_IDS = {"DreamID_LoadIDEncoder", "DreamID_EncodeFace", "DreamID_InjectIDTokens",
                 "DreamID_SaveIDEmbedding", "DreamID_ScenePosition"}


# ---- (a) in-process -------------------------------------------------------------------------------
def _widths(kind):
    w = TINY_WIDTHS[kind]
    return (sum(w), w[1]) if isinstance(w, tuple) else (w, w)  # (cond width, pooled width)


@pytest.mark.comfyui
@pytest.mark.parametrize("kind,keys", [("sd1", {"l"}), ("sd2", {"h"}), ("sdxl", {"l", "g"})])
def test_tiny_clip_encodes_with_real_tokenizer(comfyui, kind, keys):
    clip = tiny_clip(kind, seed=0)
    tokens = clip.tokenize("a photo of sks person")
    assert set(tokens) == keys
    for chunks in tokens.values():
        assert len(chunks) == 1 and len(chunks[0]) == 77
        assert [t for t, _ in chunks[0][:7]] == [49406, 320, 1125, 539, 48136, 2533, 49407]  # real BPE
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    width, pooled_width = _widths(kind)
    assert cond.shape == (1, 77, width) and pooled.shape == (1, pooled_width)
    assert torch.isfinite(cond).all() and cond.std() > 0

    long_tokens = clip.tokenize(", ".join(["a photo of a person"] * 25))  # > 75 content tokens
    assert all(len(c) == 2 and all(len(x) == 77 for x in c) for c in long_tokens.values())
    assert clip.encode_from_tokens(long_tokens).shape == (1, 154, width)


@pytest.mark.comfyui
def test_tiny_clip_is_seeded(comfyui):
    def encode(seed):
        clip = tiny_clip("sd1", seed=seed)
        return clip.encode_from_tokens(clip.tokenize("a photo"))

    assert torch.equal(encode(3), encode(3))
    assert not torch.equal(encode(3), encode(4))


@pytest.mark.comfyui
def test_tiny_sd2_checkpoint_and_controlnet_load_in_process(comfyui):
    write_tiny_sd2_checkpoint(comfyui.models_dir("checkpoints") / CKPT)
    write_tiny_controlnet(comfyui.models_dir("controlnet") / CONTROLNET)
    nodes = comfyui.nodes
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(CKPT)
    assert type(model.model.model_config).__name__ == "SD20" and clip is None
    assert model.model.model_type.name == "EPS"
    control = nodes.ControlNetLoader().load_controlnet(CONTROLNET)[0]
    text = server_sd2_clip()
    with torch.inference_mode():
        pos = nodes.CLIPTextEncode().encode(text, "a photo")[0]
        neg = nodes.CLIPTextEncode().encode(text, "")[0]
        assert pos[0][0].shape == (1, 77, SD2_CONTEXT_WIDTH)
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        plain = nodes.KSampler().sample(model, 1, 2, 5.0, "euler", "normal", pos, neg, latent)[0]["samples"]
        cpos, cneg = nodes.ControlNetApplyAdvanced().apply_controlnet(
            pos, neg, control, torch.rand(1, 64, 64, 3), 1.0, 0.0, 1.0)
        ctrl = nodes.KSampler().sample(model, 1, 2, 5.0, "euler", "normal", cpos, cneg, latent)[0]["samples"]
        image = nodes.VAEDecode().decode(vae, {"samples": ctrl})[0]
    assert plain.shape == ctrl.shape == (1, 4, 8, 8) and not torch.equal(plain, ctrl)
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()


@pytest.mark.comfyui
def test_pack_loads_through_comfyui_loader(comfyui):
    from comfy_env import PACK_DIR, load_pack

    loaded = load_pack(comfyui.nodes, PACK_DIR)
    assert all(name.startswith("DreamID_") for name in loaded), sorted(loaded)
    print(f"pack nodes loaded: {sorted(loaded)}; not yet there: {sorted(PACK_NODE_IDS - set(loaded))}")


# ---- (b) server -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server_models(comfyui, comfy_server):
    """Tiny SD2 checkpoint + ControlNet in the server's model folders and an uploaded 64x64 hint."""
    from PIL import Image

    write_tiny_sd2_checkpoint(comfy_server.models_dir("checkpoints") / CKPT)
    write_tiny_controlnet(comfy_server.models_dir("controlnet") / CONTROLNET)
    hint = comfy_server.base / "hint.png"  # removed with the server's base dir
    Image.radial_gradient("L").resize((64, 64)).convert("RGB").save(hint)
    return {"hint": comfy_server.upload_image(hint)}


def sd2_controlnet_prompt(hint: str, seed: int = 1, ckpt: str = CKPT) -> dict:
    """API prompt on core nodes; its CLIP comes from the checkpoint until use_tiny_clip rewires it."""
    def n(class_type, **inputs):
        return {"class_type": class_type, "inputs": inputs}

    prompt = {
        "1": n("CheckpointLoaderSimple", ckpt_name=ckpt),
        "3": n("CLIPTextEncode", text="a photo of a person", clip=["1", 1]),
        "4": n("CLIPTextEncode", text="blurry", clip=["1", 1]),
        "5": n("EmptyLatentImage", width=64, height=64, batch_size=1),
        "6": n("LoadImage", image=hint),
        "7": n("ControlNetLoader", control_net_name=CONTROLNET),
        "8": n("ControlNetApplyAdvanced", positive=["3", 0], negative=["4", 0], control_net=["7", 0],
               image=["6", 0], strength=0.8, start_percent=0.0, end_percent=1.0),
        "9": n("KSampler", model=["1", 0], seed=seed, steps=2, cfg=5.0, sampler_name="euler",
               scheduler="normal", positive=["8", 0], negative=["8", 1], latent_image=["5", 0], denoise=1.0),
        "10": n("VAEDecode", samples=["9", 0], vae=["1", 2]),
        "11": n("SaveImage", images=["10", 0], filename_prefix="harness"),
    }
    assert len(use_tiny_clip(prompt, kind="sd2")) == 1
    return prompt


@pytest.mark.comfyui
@pytest.mark.slow
def test_server_loads_pack_and_test_nodes(comfy_server):
    info = comfy_server.object_info()
    assert info["DreamIDTest_TinyCLIP"]["python_module"] == "custom_nodes.ComfyUI-DreamIdentity-TestNodes"
    log = comfy_server.log_text()
    assert "ComfyUI-DreamIdentity" in log and "(IMPORT FAILED): " not in log.split("Import times for custom nodes")[-1]
    for folder in ("dreamidentity", "insightface", "embeddings"):
        assert str(comfy_server.models_dir(folder)) in log  # "Adding extra search path …"


@pytest.mark.comfyui
@pytest.mark.slow
def test_server_samples_sd2_with_controlnet(comfy_server, server_models):
    from PIL import Image

    prompt = sd2_controlnet_prompt(server_models["hint"])
    assert prompt["12"]["class_type"] == "DreamIDTest_TinyCLIP" and prompt["3"]["inputs"]["clip"] == ["12", 0]
    t0 = time.monotonic()
    result = comfy_server.run(prompt, timeout=120)
    print(f"sampling run (cold: tiny CLIP build + model loads) {time.monotonic() - t0:.1f} s")
    assert result.ok, result.error
    files = comfy_server.output_files(result)
    assert len(files) == 1 and files[0].suffix == ".png" and files[0].is_file()
    assert Image.open(files[0]).size == (64, 64)

    t0 = time.monotonic()
    assert comfy_server.run(sd2_controlnet_prompt(server_models["hint"], seed=2), timeout=60).ok
    print(f"sampling run (warm, new seed) {time.monotonic() - t0:.1f} s")


@pytest.mark.comfyui
@pytest.mark.slow
def test_server_reports_bad_prompts_and_keeps_serving(comfy_server, server_models):
    with pytest.raises(PromptRejected) as rejected:  # validation: the file is not in the list
        comfy_server.queue(sd2_controlnet_prompt(server_models["hint"], ckpt="missing.safetensors"))
    assert "1" in rejected.value.body["node_errors"]

    (comfy_server.models_dir("checkpoints") / "broken.safetensors").write_bytes(b"not a checkpoint")
    result = comfy_server.run(sd2_controlnet_prompt(server_models["hint"], ckpt="broken.safetensors"))
    assert result.status == "error" and result.error["node_type"] == "CheckpointLoaderSimple"
    assert result.error["node_id"] == "1" and result.error["exception_message"]

    assert comfy_server.run(sd2_controlnet_prompt(server_models["hint"], seed=3), timeout=60).ok


@pytest.mark.comfyui
@pytest.mark.slow
def test_converted_ui_workflow_runs_on_server(comfy_server, server_models):
    """Without a browser: the converter's output of the UI workflow is a valid, runnable prompt."""
    prompt = ui_to_api(ui_workflow(server_models["hint"]), comfy_server.object_info())
    assert sorted(prompt, key=int) == ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11"]
    result = comfy_server.run(prompt, timeout=120)
    assert result.ok, result.error
    assert [p.name.startswith("harness_ui") for p in comfy_server.output_files(result)] == [True]


# ---- (c) browser ----------------------------------------------------------------------------------
def ui_workflow(hint: str, extra_type: str | None = None) -> dict:
    """A small UI-format workflow in the classic layout (only linked inputs listed) that exercises
    every converter rule: Reroute, Note, a bypassed node, a muted node, a PrimitiveNode feeding a
    converted widget, the seed control value and LoadImage's upload value."""
    nodes, links = [], []

    def node(nid, ntype, widgets=None, outputs=(), mode=0, **linked):
        inputs = []
        for slot, (name, (src, src_slot, ltype, *widget)) in enumerate(linked.items()):
            links.append([len(links) + 1, src, src_slot, nid, slot, ltype])
            inp = {"name": name, "type": ltype, "link": len(links)}
            if ntype == "Reroute":
                inp.update(name="", type="*")
            if widget:  # a widget converted to an input
                inp["widget"] = {"name": name}
            inputs.append(inp)
        nodes.append({"id": nid, "type": ntype, "pos": [220 * (len(nodes) % 6), 260 * (len(nodes) // 6)],
                      "size": [200, 120], "flags": {}, "order": len(nodes), "mode": mode, "inputs": inputs,
                      "outputs": [{"name": o[0], "type": o[1], "links": [], "slot_index": i, **(o[2:] or [{}])[0]}
                                  for i, o in enumerate(outputs)],
                      "properties": {"Node name for S&R": ntype}, "widgets_values": widgets or []})

    cond = [("CONDITIONING", "CONDITIONING")]
    node(1, "CheckpointLoaderSimple", [CKPT], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")])
    node(2, "DreamIDTest_TinyCLIP", ["sd2", 0, 0], [("CLIP", "CLIP")])
    node(12, "Reroute", None, [("", "CLIP")], input=(2, 0, "CLIP"))
    node(3, "CLIPTextEncode", ["a photo of a person"], cond, clip=(2, 0, "CLIP"))
    node(4, "CLIPTextEncode", ["blurry"], cond, clip=(12, 0, "CLIP"))
    node(15, "ConditioningSetTimestepRange", [0.5, 1.0], cond, mode=4, conditioning=(4, 0, "CONDITIONING"))
    node(5, "EmptyLatentImage", [64, 64, 1], [("LATENT", "LATENT")])
    node(6, "LoadImage", [hint, "image"], [("IMAGE", "IMAGE"), ("MASK", "MASK")])
    node(7, "ControlNetLoader", [CONTROLNET], [("CONTROL_NET", "CONTROL_NET")])
    node(8, "ControlNetApplyAdvanced", [0.8, 0.0, 1.0], [("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
         positive=(3, 0, "CONDITIONING"), negative=(15, 0, "CONDITIONING"), control_net=(7, 0, "CONTROL_NET"),
         image=(6, 0, "IMAGE"))
    # the primitive's 2 wins over KSampler's stale saved steps value 3, as in the frontend
    node(16, "PrimitiveNode", [2, "fixed"], [("INT", "INT", {"widget": {"name": "steps"}})])
    node(9, "KSampler", [7, "fixed", 3, 5.0, "euler", "normal", 1.0], [("LATENT", "LATENT")],
         model=(1, 0, "MODEL"), positive=(8, 0, "CONDITIONING"), negative=(8, 1, "CONDITIONING"),
         latent_image=(5, 0, "LATENT"), steps=(16, 0, "INT", True))
    node(10, "VAEDecode", None, [("IMAGE", "IMAGE")], samples=(9, 0, "LATENT"), vae=(1, 2, "VAE"))
    node(11, "SaveImage", ["harness_ui"], images=(10, 0, "IMAGE"))
    node(17, "PreviewImage", None, mode=2, images=(10, 0, "IMAGE"))
    node(13, "Note", ["Harness workflow: tiny SD2 + ControlNet, CLIP from the test node."])
    if extra_type:
        node(14, extra_type, [])
    by_id = {n["id"]: n for n in nodes}
    for link in links:
        by_id[link[1]]["outputs"][link[2]]["links"].append(link[0])
    return {"last_node_id": max(by_id), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


@pytest.mark.comfyui
@pytest.mark.browser
@pytest.mark.slow
def test_browser_loads_workflow_and_converter_matches_frontend(comfy_server, server_models, browser_page):
    page = browser_page
    ready_s = open_app(page, comfy_server.url)
    print(f"frontend {frontend_version(page)} ready in {ready_s:.1f} s")
    workflow = ui_workflow(server_models["hint"])
    t0 = time.monotonic()
    state = load_in_app(page, workflow)
    print(f"workflow loaded in {time.monotonic() - t0:.1f} s")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "comfy-harness-workflow.png"))
    assert state["errors"] == [] and state["notices"] == [] and not state["missing_nodes"], state
    frontend = page.evaluate("async () => (await app.graphToPrompt()).output")
    reserialised = page.evaluate("() => app.graph.serialize()")
    (ARTIFACTS / "comfy-harness-workflow.json").write_text(json.dumps(reserialised, indent=1))

    info = comfy_server.object_info()
    assert set(frontend) == {"1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11"}  # virtual/muted/bypassed gone
    assert frontend["4"]["inputs"]["clip"] == ["2", 0]  # through the Reroute
    assert frontend["8"]["inputs"]["negative"] == ["4", 0]  # through the bypassed node
    assert frontend["9"]["inputs"]["steps"] == 2 and frontend["9"]["inputs"]["seed"] == 7  # primitive, control
    assert strip_meta(ui_to_api(workflow, info)) == strip_meta(frontend)
    assert strip_meta(ui_to_api(reserialised, info)) == strip_meta(frontend)  # the frontend's own save

    result = comfy_server.run(frontend, timeout=120)  # what the UI would queue runs
    assert result.ok, result.error
    print(f"outside requests blocked: {page.blocked_urls or 'none'}; stubbed: {page.stubbed_node_types or 'none'}")


@pytest.mark.comfyui
@pytest.mark.browser
@pytest.mark.slow
def test_browser_flags_missing_node_types(comfy_server, server_models, browser_page):
    """Negative control for the check above: an unknown type shows up as an error node and the user
    is told, by name, that it is missing (a dialog on frontend 1.2x, the error overlay on 1.4x), after
    the same settle time the check above waits."""
    page = browser_page
    if not page.url.startswith(comfy_server.url):
        open_app(page, comfy_server.url)
    dismiss_notices(page)
    state = load_in_app(page, ui_workflow(server_models["hint"], extra_type="DreamID_NoSuchNode"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "comfy-harness-missing-node.png"))
    dismiss_notices(page)
    print(f"frontend {frontend_version(page)} says: {state['missing_text']!r}")
    assert state["errors"] == ["DreamID_NoSuchNode"], state
    assert state["missing_nodes"] and "DreamID_NoSuchNode" in state["missing_text"], state
    assert nodes_of(ui_to_api(ui_workflow(server_models["hint"]), comfy_server.object_info()), "KSampler") == ["9"]
