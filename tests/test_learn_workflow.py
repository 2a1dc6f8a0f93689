"""The learn-identity template (workflows/dreamid_learn_identity.json) on a real ComfyUI server with
tiny models: photos -> learn -> save -> generate, then the saved embedding used by plain ComfyUI."""

from __future__ import annotations

from pathlib import Path

import pytest
from face_photos import face_photo, needs_photos
from workflow_api import add_node, load_workflow, nodes_of, set_inputs, ui_to_api, use_tiny_clip

pytestmark = [pytest.mark.comfyui, pytest.mark.slow, needs_photos]
PACK = Path(__file__).resolve().parents[1]
TEMPLATE = PACK / "workflows" / "dreamid_learn_identity.json"
ARTIFACTS = PACK / "test-artifacts"


@pytest.fixture(scope="module")
def server(comfyui, comfy_server):
    from comfy_tiny import write_tiny_sd2_checkpoint

    ckpt = comfy_server.models_dir("checkpoints") / "v2-1_512-ema-pruned.safetensors"
    if not ckpt.is_file():
        write_tiny_sd2_checkpoint(ckpt)
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "learn_face.png"
    face_photo("tom", size=128).save(path)
    comfy_server.upload_image(path)
    return comfy_server


def tiny_learn(server, **learn) -> dict:
    prompt = ui_to_api(load_workflow(TEMPLATE), server.object_info())
    use_tiny_clip(prompt, "sd2", 0, init_seed=0)
    set_inputs(prompt, "LoadImage", image="learn_face.png")
    set_inputs(prompt, "DreamID_LearnIdentity", **({"steps": 2, "resolution": 64, "preview_every": 2,
                                                     "snapshot_every": 0} | learn))
    set_inputs(prompt, "DreamID_SaveLearnedIdentity", name="learned_tom", overwrite=True)
    set_inputs(prompt, "EmptyLatentImage", width=64, height=64)
    set_inputs(prompt, "KSampler", steps=2)
    return prompt


def test_template_learns_saves_and_generates(server):
    prompt = tiny_learn(server)
    assert len(nodes_of(prompt, "DreamID_LearnIdentity")) == 1
    result = server.run(prompt, timeout=300)
    assert result.ok, f"{result.error}\n{server.log_tail()}"
    files = server.output_files(result)
    assert any(p.name.startswith("DreamIdentity_learned") and p.stat().st_size > 0 for p in files)
    saved = server.models_dir("embeddings") / "learned_tom.safetensors"
    assert saved.is_file()
    # the words identity is a plain embedding: ComfyUI's own CLIPTextEncode reads it by name
    plain = {k: v for k, v in prompt.items()}
    clip = next(iter(nodes_of(plain, "DreamIDTest_TinyCLIP")))
    enc = add_node(plain, "CLIPTextEncode", {"clip": [clip, 0], "text": "a photo of embedding:learned_tom"})
    (ks,) = nodes_of(plain, "KSampler")
    plain[ks]["inputs"]["positive"] = [enc, 0]
    assert server.run(plain, timeout=300).ok


def test_template_per_stage_runs(server):
    result = server.run(tiny_learn(server, layout="per_stage", num_stages=2, seed=1), timeout=300)
    assert result.ok, f"{result.error}\n{server.log_tail()}"
    assert (server.models_dir("dreamidentity") / "identities" / "learned_tom.safetensors").is_file()


def test_a_new_generation_prompt_does_not_learn_again(server):
    prompt = tiny_learn(server, seed=5)
    first = server.run(prompt, timeout=300)
    assert first.ok, f"{first.error}\n{server.log_tail()}"
    (apply,) = nodes_of(prompt, "DreamID_ApplyPerStageIdentity")
    prompt[apply]["inputs"]["text"] = "a photo of S* as a pirate"
    second = server.run(prompt, timeout=300)
    assert second.ok, f"{second.error}\n{server.log_tail()}"
    (learn,) = nodes_of(prompt, "DreamID_LearnIdentity")
    cached = {n for kind, data in second.history["status"]["messages"] if kind == "execution_cached"
              for n in data["nodes"]}
    assert learn in cached and apply not in cached  # the learner's result is reused; only the prompt ran again


def test_template_errors_name_the_node(server):
    prompt = tiny_learn(server, learning_rate=float("nan"), seed=2)
    result = server.run(prompt, timeout=300)
    assert not result.ok and result.error["node_type"] == "DreamID_LearnIdentity"
    assert "learning_rate" in result.error["exception_message"]
