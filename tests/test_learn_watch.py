"""Learning that artists can watch, keep and resume (DreamID_LearnIdentity in a real ComfyUI, in-process, CPU):
previews on the node's progress and in the output, snapshots (periodic, on Cancel, on error) that
DreamID_LoadIdentity lists and that continue the run bit for bit, the norm constraint after every step,
and clear errors for the settings that cannot work."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from face_photos import face_photo, needs_photos
from test_learn_nodes import small_sd2_model
from training_fixtures import one_thread  # noqa: F401  (fixture)

pytestmark = [pytest.mark.comfyui, needs_photos, pytest.mark.usefixtures("one_thread")]
PACK = Path(__file__).resolve().parents[1]
RES = 64


@pytest.fixture(scope="module")
def pack(comfyui):
    from comfy_env import load_pack

    nodes = load_pack(comfyui.nodes, PACK)
    root = nodes["DreamID_LearnIdentity"].__module__.split(".nodes.")[0]
    return {"nodes": nodes, "mods": lambda name: sys.modules[f"{root}.{name}"]}


@pytest.fixture(scope="module")
def models(comfyui, tmp_path_factory):
    import comfy.sd
    from comfy_tiny import tiny_clip, write_tiny_sd2_checkpoint

    ckpt = write_tiny_sd2_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_sd2.safetensors")
    with torch.inference_mode():
        _, _, vae, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=False)
        return {"model": small_sd2_model(), "clip": tiny_clip("sd2"), "vae": vae}


@pytest.fixture(scope="module")
def folder(comfyui):
    return comfyui.models_dir("dreamid_identities")


def photo():
    return torch.from_numpy(np.asarray(face_photo("tom", size=128), dtype=np.float32) / 255.0)[None]


def learn(pack, models, **kw):
    args = dict(model=models["model"], clip=models["clip"], vae=models["vae"], image=photo(), steps=8,
                learning_rate=0.05, attention_loss_weight=0.003, layout="words", num_tokens=2, init_word="person",
                class_word="person", resolution=RES, batch_size=1, seed=0, gradient_checkpointing=False,
                preview_every=0, snapshot_every=0) | kw
    with torch.inference_mode():
        return pack["nodes"]["DreamID_LearnIdentity"]().learn(**args)


def load(pack, name):
    return pack["nodes"]["DreamID_LoadIdentity"]().load(name)


@pytest.mark.parametrize("layout", ["words", "per_stage"])
def test_n_steps_then_n_more_equal_2n_steps_bit_for_bit(pack, models, folder, layout):
    full = learn(pack, models, steps=8, layout=layout, name=f"full_{layout}")["result"][0]
    first = learn(pack, models, steps=4, layout=layout, name=f"part_{layout}", snapshot_every=4)
    assert (folder / f"part_{layout}_00004.safetensors").is_file()
    ident, embeds = load(pack, f"identities/part_{layout}_00004.safetensors")
    assert ident.resume.step == 4 and torch.equal(ident.tensors["clip_h"], first["result"][0].tensors["clip_h"])
    for start in (embeds, ident):  # LoadIdentity's id_embeds or identity output into init_identity
        rest = learn(pack, models, steps=8, layout=layout, name=f"rest_{layout}_{type(start).__name__}",
                     init_identity=start)
        assert torch.equal(rest["result"][0].tensors["clip_h"], full.tensors["clip_h"])
        assert "resumed at 4" in rest["ui"]["text"][0]
    # what a user changes on purpose: allowed; what changes the draws: allowed and said
    more = learn(pack, models, steps=10, learning_rate=0.01, seed=3, layout=layout, name=f"more_{layout}",
                 init_identity=embeds)
    assert "seed 0 -> 3" in more["ui"]["text"][-1]


def test_cancel_leaves_a_snapshot_that_resumes_to_the_uninterrupted_run(pack, models, folder):
    import comfy.model_management as mm
    import comfy.utils

    full = learn(pack, models, steps=6, name="whole")["result"][0]

    def hook(value, total, preview, node_id=None):
        if preview is not None:  # ComfyUI 0.33 throttles plain progress updates; previews always arrive
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            learn(pack, models, steps=6, name="cancelled", preview_every=3)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert sorted(p.name for p in folder.glob("cancelled_*")) == ["cancelled_00003.safetensors"]
    ident, embeds = load(pack, "identities/cancelled_00003.safetensors")
    rest = learn(pack, models, steps=6, name="cancelled", init_identity=embeds)["result"][0]
    assert torch.equal(rest.tensors["clip_h"], full.tensors["clip_h"])


def test_an_error_mid_run_leaves_a_snapshot_and_says_where(pack, models, folder):
    errors = pack["mods"]("dreamid_core.learning")
    with pytest.raises(errors.LearningDivergedError, match=r"identities/diverged_0000\d\.safetensors"):
        learn(pack, models, steps=8, learning_rate=1e30, norm="free", layout="per_stage", name="diverged")
    (snap,) = folder.glob("diverged_*")
    ident, _ = load(pack, f"identities/{snap.name}")
    assert torch.isfinite(ident.tensors["clip_h"]).all()  # the last finite step's vectors


def test_previews_show_on_the_progress_and_in_the_output(pack, models):
    import comfy.utils

    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, preview)))
    try:
        out = learn(pack, models, steps=6, preview_every=2, name="previewed")["result"]
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    shown = [(v, p) for v, p in seen if p is not None]
    assert [v for v, _ in shown] == [2, 4, 6]
    assert all(p[0] == "JPEG" and p[1].size == (RES, RES) for _, p in shown)
    previews = out[3]
    assert previews.shape == (3, RES, RES, 3) and float(previews.std()) > 0
    assert not torch.equal(previews[0], previews[2])  # the identity changed, the seed did not
    off = learn(pack, models, steps=2, name="no_previews")["result"][3]
    assert off.shape[0] == 1  # a small image that says previews are off


def test_same_seed_previews_differ_only_by_the_identity(pack, models):
    a = learn(pack, models, steps=2, preview_every=2, name="seed_a")["result"][3]
    b = learn(pack, models, steps=2, preview_every=2, name="seed_b")["result"][3]
    assert torch.equal(a, b)  # same run, same seed: the same preview


def test_the_norm_constraint_holds_after_every_step(pack, models):
    host_mod, core = pack["mods"]("nodes.adapters.learn_host"), pack["mods"]("dreamid_core.learning")
    li = pack["mods"]("dreamid_core.identities.learned_identity")
    with torch.inference_mode(False), torch.enable_grad():
        host = host_mod.ComfyHost(models["model"], models["clip"])
        faces = pack["mods"]("dreamid_core.faces.pipeline").FacePipeline(
            pack["mods"]("dreamid_core.faces.detectors").make_detector("mtcnn")).process(photo()).faces
        photos = host_mod.encode_photos(models["vae"], host, photo(), faces, RES)
        with host:
            target = host.vocabulary_norm()["clip_h"]
            for layout, norm in (("words", "vocabulary"), ("per_stage", "vocabulary"), ("words", "free")):
                cfg = li.IdentityConfig(layout=layout, steps=6, lr=0.2, attn_weight=0.003, resolution=RES,
                                        num_stages=3, norm=norm)
                start = {"clip_h": torch.randn(2, 96) * 3}  # far off the sphere
                learner = core.IdentityLearner(host, photos, cfg, start)
                for i in range(6):
                    learner.step(i)
                    norms = learner.params["clip_h"].detach().norm(dim=-1)
                    if norm == "vocabulary":
                        torch.testing.assert_close(norms, torch.full_like(norms, target), rtol=1e-5, atol=0)
                    else:
                        assert (norms - target).abs().max() > 1.0
            extra = learner.identity().config.extra
            assert extra["vocabulary_norm"]["clip_h"] == pytest.approx(target, abs=1e-4)
            assert len(extra["norms"]["clip_h"]) == 2


@pytest.mark.parametrize("kw, match", [
    (dict(preview_every=20), "preview_every=20 is more than steps=8"),
    (dict(snapshot_every=9), "snapshot_every=9 is more than steps=8"),
    (dict(preview_every=-1), "preview_every=-1 must be an integer >= 0"),
    (dict(preview_every=2, preview_prompt="a photo of a man"), "preview_prompt .* has no S\\*"),
    (dict(name="con"), "Windows device name"),
    (dict(name="x" * 300), "300 bytes long .* at most 200"),
    (dict(name=".."), "is a path"),
])
def test_bad_settings_fail_before_learning(pack, models, kw, match):
    with pytest.raises(Exception, match=match):
        learn(pack, models, **kw)


def test_a_resume_that_changes_the_method_is_refused_with_the_values(pack, models, comfyui):
    learn(pack, models, steps=2, snapshot_every=2, name="method")
    _, embeds = load(pack, "identities/method_00002.safetensors")
    with pytest.raises(Exception, match="learned with layout='words', this run has layout='per_stage'"):
        learn(pack, models, steps=4, layout="per_stage", init_identity=embeds, name="method2")
    with pytest.raises(Exception, match="learned with norm='vocabulary', this run has norm='free'"):
        learn(pack, models, steps=4, norm="free", init_identity=embeds, name="method3")
    with pytest.raises(Exception, match="snapshot is at step 2 and steps is 2"):
        learn(pack, models, steps=2, init_identity=embeds, name="method4")
    from comfy_tiny import tiny_clip
    from test_learn_nodes import small_sdxl_model

    with torch.inference_mode():
        sdxl = {"model": small_sdxl_model(), "clip": tiny_clip("sdxl"), "vae": models["vae"]}
    learn(pack, sdxl, steps=2, snapshot_every=2, name="family")
    _, xl = load(pack, "identities/family_00002.safetensors")
    with pytest.raises(Exception, match="learned on a sdxl model, this run's model is sd2"):
        learn(pack, models, steps=4, init_identity=xl, name="family2")


def test_snapshots_of_another_run_are_never_replaced_and_keep_last_prunes_only_this_run(pack, models, folder):
    learn(pack, models, steps=4, snapshot_every=2, name="mine")
    with pytest.raises(Exception, match="snapshots named 'mine' already exist"):
        learn(pack, models, steps=4, snapshot_every=2, name="mine")
    learn(pack, models, steps=8, snapshot_every=2, keep_last=2, name="pruned")
    assert sorted(p.name for p in folder.glob("pruned_*")) == ["pruned_00006.safetensors", "pruned_00008.safetensors"]
    assert sorted(p.name for p in folder.glob("mine_*")) == ["mine_00002.safetensors", "mine_00004.safetensors"]
    listed = pack["nodes"]["DreamID_LoadIdentity"].INPUT_TYPES()["required"]["identity_name"][0]
    assert "identities/pruned_00008.safetensors" in listed
