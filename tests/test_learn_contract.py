"""The node and the command line learn the same identity.

One tiny seeded SD1 and one tiny SDXL model, loaded by diffusers/transformers (the command line's host)
and by ComfyUI (the node's host) with the same weights (tests/twin_models.py); the same photo, seed and
settings. Compared, for words and per_stage, with and without the attention loss: the photos' latents,
the first step's loss and gradient, and the vectors after 10 steps. Then end to end: the
DreamID_LearnIdentity node against ``python -m training.learn_identity`` on the same photo file.

Tolerances (fp32 on the CPU, one thread): the two hosts compute the same maths with different
kernels and operation orders (ComfyUI's UNet/CLIP/attention vs diffusers'/transformers'; sigmas from
float64 in ComfyUI, float32 in diffusers), each op rounding at ~6e-8 relative. Measured: loss <= 2e-7
relative, gradient <= 3e-6, vectors after 10 Adam steps <= 1e-4 of how far they moved. Asserted with
about 10x margin: loss 2e-6, gradient 3e-5, vectors 1e-3 of the distance moved; a real drift (another
template, timestep, loss space, init or pairing) changes the first loss by more than 1e-2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from face_photos import face_photo, needs_photos
from training_fixtures import one_thread  # noqa: F401  (fixture)

pytest.importorskip("diffusers")

pytestmark = [pytest.mark.comfyui, needs_photos, pytest.mark.usefixtures("one_thread")]
PACK = Path(__file__).resolve().parents[1]
RES = 64
CASES = [("words", 0.0), ("words", 0.5), ("per_stage", 0.0), ("per_stage", 0.5)]


@pytest.fixture(scope="module")
def pack(comfyui):
    from comfy_env import load_pack

    nodes = load_pack(comfyui.nodes, PACK)
    root = nodes["DreamID_LearnIdentity"].__module__.split(".nodes.")[0]
    return {"nodes": nodes, "mods": lambda name: sys.modules[f"{root}.{name}"]}


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def twin(request, comfyui):
    from twin_models import twin

    return twin(request.param)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("contract") / "tom.png"
    face_photo("tom", size=128).save(path)
    return path


def _config(mod, family, layout, attn, steps=10):
    return mod.IdentityConfig(layout=layout, num_tokens=2, num_stages=3, steps=steps, lr=0.01, attn_weight=attn,
                              seed=0, target=family, resolution=RES)


def _run(learner, steps=10):
    first = learner.step(0)
    grads = {k: p.grad.detach().clone() for k, p in learner.params.items()}
    for i in range(1, steps):
        learner.step(i)
    return first, grads, learner.vectors()


def diffusers_side(tw, photo_path, layout, attn):
    from dreamid_core import FacePipeline, make_detector
    from dreamid_core.identities.learned_identity import IdentityConfig
    from dreamid_core.learning import IdentityLearner, RunOptions, from_word_rows
    from training.learn_identity.data import detect_faces, encode_photos
    from training.learn_identity.host import DiffusersHost

    arrays, faces = detect_faces([photo_path], FacePipeline(make_detector("mtcnn")))
    photos = encode_photos(arrays, faces, tw.base.vae, resolution=RES)
    with DiffusersHost(tw.base, num_stages=3) as host:
        start = from_word_rows(host.word_embeddings("person"), 2)
        cfg = _config(sys.modules["dreamid_core.identities.learned_identity"], tw.family, layout, attn)
        assert isinstance(cfg, IdentityConfig)
        learner = IdentityLearner(host, photos, cfg, start, RunOptions(batch_size=2))
        return photos, start, *_run(learner)


def comfy_side(pack, tw, photo_path, layout, attn):
    host_mod, core = pack["mods"]("nodes.adapters.learn_host"), pack["mods"]("dreamid_core.learning")
    faces_mod, det = pack["mods"]("dreamid_core.faces.pipeline"), pack["mods"]("dreamid_core.faces.detectors")
    image = torch.from_numpy(np.asarray(face_photo("tom", size=128), dtype=np.float32) / 255.0)[None]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(photo_path)), np.asarray(face_photo("tom", size=128)))
    with torch.inference_mode(False), torch.enable_grad():
        host = host_mod.ComfyHost(tw.model, tw.clip)
        faces = faces_mod.FacePipeline(det.make_detector("mtcnn")).process(image).faces
        photos = host_mod.encode_photos(tw.vae, host, image, faces, RES)
        with host:
            start = core.from_word_rows(host.word_embeddings("person"), 2)
            cfg = _config(pack["mods"]("dreamid_core.identities.learned_identity"), tw.family, layout, attn)
            learner = core.IdentityLearner(host, photos, cfg, start, core.RunOptions(batch_size=2))
            return photos, start, *_run(learner)


@pytest.mark.parametrize("layout, attn", CASES)
def test_both_hosts_learn_the_same_identity(pack, twin, photo, layout, attn):
    d_photos, d_start, d_first, d_grad, d_vec = diffusers_side(twin, photo, layout, attn)
    c_photos, c_start, c_first, c_grad, c_vec = comfy_side(pack, twin, photo, layout, attn)
    # the same photo pixels through each host's VAE and face geometry
    torch.testing.assert_close(c_photos.latents, d_photos.latents, rtol=0, atol=2e-5)
    assert c_photos.boxes == d_photos.boxes
    for key in d_start:
        assert torch.equal(c_start[key], d_start[key])  # the same init rows from two tokenizers
    assert c_first.loss == pytest.approx(d_first.loss, rel=2e-6), (c_first, d_first)
    assert c_first.attention == pytest.approx(d_first.attention, rel=2e-6, abs=1e-9)
    start = {k: v if layout == "words" else v[None, None] for k, v in d_start.items()}
    for key in d_grad:
        rel = float((c_grad[key] - d_grad[key]).norm() / d_grad[key].norm())
        assert rel < 3e-5, (key, rel)
        moved = float((d_vec[key] - start[key]).norm())
        assert moved > 1e-3
        assert float((c_vec[key] - d_vec[key]).norm()) < 1e-3 * moved, key


def test_the_node_and_the_command_line_give_the_same_file(pack, twin, photo, tmp_path):
    from twin_models import save_diffusers

    from dreamid_core.identities.learned_identity import load_learned_identity
    from training.learn_identity import cli

    folder = save_diffusers(twin, tmp_path / "base")
    out = tmp_path / "cli.safetensors"
    assert cli.main(["--base-model", str(folder), "--photos", str(photo), "--out", str(out), "--resolution",
                     str(RES), "--steps", "6", "--lr", "0.01", "--attn-weight", "0.5", "--device", "cpu",
                     "--log-every", "0"]) == 0
    from_cli = load_learned_identity(out)
    image = torch.from_numpy(np.asarray(face_photo("tom", size=128), dtype=np.float32) / 255.0)[None]
    node = pack["nodes"]["DreamID_LearnIdentity"]()
    with torch.inference_mode():
        ident = node.learn(model=twin.model, clip=twin.clip, vae=twin.vae, image=image, steps=6, learning_rate=0.01,
                           attention_loss_weight=0.5, layout="words", num_tokens=2, init_word="person",
                           class_word="person", resolution=RES, batch_size=1, seed=0,
                           gradient_checkpointing=False, preview_every=0, snapshot_every=0,
                           norm="vocabulary")["result"][0]
    assert set(ident.tensors) == set(from_cli.tensors)
    for key, t in ident.tensors.items():
        torch.testing.assert_close(t, from_cli.tensors[key], rtol=0, atol=1e-5)
    a, b = ident.config, from_cli.config
    assert (a.layout, a.num_tokens, a.init, a.class_word, a.steps, a.lr, a.attn_weight, a.seed, a.resolution,
            a.target) == (b.layout, b.num_tokens, b.init, b.class_word, b.steps, b.lr, b.attn_weight, b.seed,
                          b.resolution, b.target)
    assert set(a.extra) == set(b.extra)  # one set of provenance keys
    for k in ("initial_diffusion_loss", "final_diffusion_loss", "initial_face_mass", "face_mass"):
        assert a.extra[k] == pytest.approx(b.extra[k], rel=1e-4), k
