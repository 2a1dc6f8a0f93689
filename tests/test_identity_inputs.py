"""Inputs an artist (or an attacker) gives the identity nodes, in a real ComfyUI (in-process, CPU): identity files
of the wrong shape, empty, or a pickle in disguise; one policy for an identity made for more text encoders than
the CLIP has; unusual words and sizes for learning; file names in any script; the overwrite sequence. Errors
name files relative to their models folder, never the server's paths."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from face_photos import face_photo, needs_photos
from test_learn_nodes import small_sd2_model
from training_fixtures import one_thread  # noqa: F401  (fixture)

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread")]
PACK = Path(__file__).resolve().parents[1]
RES = 64


@pytest.fixture(scope="module")
def pack(comfyui):
    from comfy_env import load_pack

    nodes = load_pack(comfyui.nodes, PACK)
    root = nodes["DreamID_LearnIdentity"].__module__.split(".nodes.")[0]
    return {"nodes": nodes, "mods": lambda name: sys.modules[f"{root}.{name}"]}


@pytest.fixture(scope="module")
def folders(comfyui):
    return {"embeddings": comfyui.models_dir("embeddings"), "identities": comfyui.models_dir("dreamid_identities"),
            "base": comfyui.base}


@pytest.fixture(scope="module")
def sd2(comfyui, tmp_path_factory):
    import comfy.sd
    from comfy_tiny import tiny_clip, write_tiny_sd2_checkpoint

    ckpt = write_tiny_sd2_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_sd2.safetensors")
    with torch.inference_mode():
        _, _, vae, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=False)
        return {"model": small_sd2_model(), "clip": tiny_clip("sd2"), "vae": vae}


def photo():
    return torch.from_numpy(np.asarray(face_photo("tom", size=128), dtype=np.float32) / 255.0)[None]


def learn(pack, models, **kw):
    args = dict(model=models["model"], clip=models["clip"], vae=models["vae"], image=photo(), steps=1,
                learning_rate=0.01, attention_loss_weight=0.003, layout="words", num_tokens=2, init_word="person",
                class_word="person", resolution=RES, batch_size=1, seed=0, gradient_checkpointing=False,
                preview_every=0, snapshot_every=0) | kw
    with torch.inference_mode():
        return pack["nodes"]["DreamID_LearnIdentity"]().learn(**args)


def load(pack, name, clip=None):
    return pack["nodes"]["DreamID_LoadIdentity"]().load(name, clip)


# -- identity files ---------------------------------------------------------------------------------------

def test_bad_identity_files_get_clear_errors_naming_the_file_not_the_server_path(pack, folders):
    from safetensors.torch import save_file

    emb = folders["embeddings"]
    save_file({"emb_params": torch.randn(2, 3, 768)}, str(emb / "three_d.safetensors"))
    save_file({"emb_params": torch.zeros(0, 768)}, str(emb / "empty.safetensors"))
    torch.save({"emb_params": torch.randn(2, 768)}, emb / "pickled.safetensors")  # a torch.save zip, renamed
    (emb / "proto.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 32)  # a bare pickle stream
    cases = {"three_d": r"shape \(2, 3, 768\); a textual-inversion embedding is \[k, width\]",
             "empty": r"embedding is empty \(shape \(0, 768\)\)",
             "pickled": r"refused: it is a torch.save zip file \(a pickle inside\) renamed .safetensors",
             "proto": r"refused: it is a pickle renamed .safetensors"}
    for name, match in cases.items():
        with pytest.raises(Exception, match=match) as info:
            load(pack, f"embeddings/{name}.safetensors")
        message = str(info.value)
        assert f"embeddings/{name}.safetensors" in message and str(folders["base"]) not in message, message


def test_an_identity_for_more_encoders_than_the_clip_has_works_the_same_everywhere(pack, sd2, comfyui):
    """One policy, as ComfyUI's embedding:NAME: the parts the CLIP reads are used, the others ignored
    (an SDXL identity on an SD2.x CLIP reads only... here the extra part rides along unused)."""
    identity = pack["mods"]("dreamid_core.identities.embeds")
    width = sd2["clip"].cond_stage_model.clip_h.transformer.get_input_embeddings().weight.shape[1]
    parts = {"clip_h": torch.randn(2, width) * 0.1, "clip_g": torch.randn(2, 1280)}
    embeds = identity.IdentityEmbeds(parts=parts, info={"source": "two-encoder test"})
    with torch.inference_mode():
        cond = pack["nodes"]["DreamID_InjectIDTokens"]().encode(sd2["clip"], embeds, "a photo of S*", "S*")
    assert cond is not None
    ident = learn(pack, sd2, init_identity=embeds, norm="free", learning_rate=1e-6)["result"][0]
    assert set(ident.tensors) == {"clip_h"}
    torch.testing.assert_close(ident.tensors["clip_h"], parts["clip_h"], rtol=0, atol=1e-4)
    missing = identity.IdentityEmbeds(parts={"clip_l": torch.randn(2, 768)})
    with pytest.raises(Exception, match=r"needs \['clip_h'\] \(no clip_h\)"):
        learn(pack, sd2, init_identity=missing)


# -- words and sizes for learning --------------------------------------------------------------------------

@needs_photos
@pytest.mark.parametrize("kw, match", [
    (dict(class_word=""), "class_word is empty"),
    (dict(class_word="   "), "class_word is empty"),
    (dict(init_word=""), "init_word is empty"),
    (dict(init_word="S*"), "init_word 'S\\*' is the identity's placeholder"),
])
def test_words_that_cannot_start_or_anchor_learning_are_refused(pack, sd2, kw, match):
    with pytest.raises(Exception, match=match):
        learn(pack, sd2, **kw)


@needs_photos
@pytest.mark.parametrize("word", ["a smiling young woman", "😀", "astronaut"])
def test_any_ordinary_word_or_phrase_starts_learning(pack, sd2, word):
    ident = learn(pack, sd2, init_word=word, norm="free", learning_rate=1e-6)["result"][0]
    assert ident.config.init == f"word:{word}" and torch.isfinite(ident.tensors["clip_h"]).all()


@needs_photos
def test_eight_tokens_and_twenty_stages(pack, sd2, comfyui):
    ident = learn(pack, sd2, layout="per_stage", num_tokens=8, num_stages=20, stage_kind="unet")["result"][0]
    assert ident.tensors["clip_h"].shape == (20, 2, 8, 96)
    with torch.inference_mode():
        model, positive = pack["nodes"]["DreamID_ApplyPerStageIdentity"]().apply(sd2["model"], sd2["clip"], ident,
                                                                                  "a photo of S*", "S*")
        latent = {"samples": torch.zeros(1, 4, RES // 8, RES // 8)}
        neg = comfyui.nodes.CLIPTextEncode().encode(sd2["clip"], "")[0]
        out = comfyui.nodes.KSampler().sample(model, 1, 2, 5.0, "euler", "normal", positive, neg, latent)[0]
    assert torch.isfinite(out["samples"]).all()


# -- file names and the overwrite sequence -------------------------------------------------------------------

NAMES = {"évelyne": "évelyne", "😀face": "face", "my identity!": "my_identity", ".hidden": "hidden"}
BAD_NAMES = {"": "no usable characters", "..": "is a path", "a/b": "is a path", "con": "Windows device name"}


def _identity(pack, layout):
    li = pack["mods"]("dreamid_core.identities.learned_identity")
    words = li.LearnedIdentity.words({"clip_h": torch.randn(2, 96)}, li.IdentityConfig(target="sd2"))
    return words if layout == "words" else li.LearnedIdentity.per_stage_from_words(
        words.tensors, li.IdentityConfig(target="sd2", num_stages=2))


@pytest.mark.parametrize("layout", ["words", "per_stage"])
def test_names_in_any_script_for_saved_identities(pack, folders, layout):
    save = pack["nodes"]["DreamID_SaveLearnedIdentity"]()
    folder = folders["embeddings" if layout == "words" else "identities"]
    for given, stored in NAMES.items():
        out = save.save(_identity(pack, layout), given, True)
        assert (folder / f"{stored}.safetensors").is_file(), (given, out)
        assert str(folders["base"]) not in out["ui"]["text"][0]
    for given, match in BAD_NAMES.items():
        with pytest.raises(ValueError, match=match):
            save.save(_identity(pack, layout), given, True)


def test_names_in_any_script_for_saved_embeddings(pack, folders):
    identity = pack["mods"]("dreamid_core.identities.embeds")
    save = pack["nodes"]["DreamID_SaveIDEmbedding"]()
    embeds = identity.IdentityEmbeds(parts={"clip_h": torch.randn(2, 96)}, info={"target": "sd2"})
    for given, stored in NAMES.items():
        assert save.save(embeds, given, True)["result"] == (f"embedding:{stored}",)
        assert (folders["embeddings"] / f"{stored}.safetensors").is_file()
    for given, match in BAD_NAMES.items():
        with pytest.raises(ValueError, match=match):
            save.save(embeds, given, True)


@needs_photos
def test_names_for_snapshots(pack, sd2, folders):
    learn(pack, sd2, steps=2, snapshot_every=2, name="évelyne")
    assert (folders["identities"] / "évelyne_00002.safetensors").is_file()
    for given, match in BAD_NAMES.items():
        with pytest.raises(Exception, match=match):
            learn(pack, sd2, name=given)


@pytest.mark.parametrize("layout", ["words", "per_stage"])
def test_the_overwrite_sequence(pack, folders, layout):
    save = pack["nodes"]["DreamID_SaveLearnedIdentity"]()
    folder = folders["embeddings" if layout == "words" else "identities"]
    other = _identity(pack, layout)
    save.save(other, f"someone_else_{layout}", False)
    before = (folder / f"someone_else_{layout}.safetensors").read_bytes()
    first, second = _identity(pack, layout), _identity(pack, layout)
    save.save(first, f"me_{layout}", False)
    with pytest.raises(FileExistsError, match=rf"models/.*me_{layout}.safetensors already exists") as info:
        save.save(second, f"me_{layout}", False)
    assert str(folders["base"]) not in str(info.value)
    name = f"{'embeddings' if layout == 'words' else 'identities'}/me_{layout}.safetensors"
    assert torch.equal(load(pack, name)[0].tensors["clip_h"], first.tensors["clip_h"])  # the refusal kept it
    save.save(second, f"me_{layout}", True)
    assert torch.equal(load(pack, name)[0].tensors["clip_h"], second.tensors["clip_h"])
    assert (folder / f"someone_else_{layout}.safetensors").read_bytes() == before


@needs_photos
def test_photos_without_a_face_are_skipped_when_asked_and_named_otherwise(pack, sd2):
    from face_photos import face_photo as fp

    none = torch.from_numpy(np.asarray(fp("none", size=128), dtype=np.float32) / 255.0)[None]
    batch = torch.cat([photo(), none])
    errors = pack["mods"]("dreamid_core.errors")
    with pytest.raises(errors.FaceNotFoundError, match=r"image 1.*skip photos without a face"):
        learn(pack, sd2, image=batch)
    out = learn(pack, sd2, image=batch, on_missing="skip")
    assert out["result"][0].config.extra["num_photos"] == 1
    assert "skipped photos [1] (no face)" in out["ui"]["text"][0]
