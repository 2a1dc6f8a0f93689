"""DreamID_LearnIdentity on the diffusion transformers (FLUX.1, SD3) inside a real ComfyUI (in-process, CPU):
tiny real FLUX.1- and SD3-layout models built from config by ComfyUI's own classes, ComfyUI's own
tokenizers (CLIP BPE, T5 sentencepiece), a 16-channel VAE and a real face photo.

What is checked: the step is rectified-flow matching through the model's own sampling (the shifted sigma
table, FLUX's guidance embedding), written out here independently of ComfyUI; the vectors of every text
encoder the model reads learn and the fixed-pair loss falls; MODEL and CLIP come back bit for bit, with no
gradient and no wrapper left; checkpointing and offloading learn the same vectors, fp8 weights learn with
no weight gradient; the saved identity is one multi-key file that ``embedding:NAME`` reads like
DreamID_InjectIDTokens; and what is not supported on these families is refused by name."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_env import load_pack
from face_photos import face_photo, needs_photos
from test_learn_nodes import leftover_wrappers, no_grads, state_hash

pytestmark = [pytest.mark.comfyui, needs_photos]
PACK = Path(__file__).resolve().parents[1]
KINDS = ("flux", "sd3")
PARTS = {"flux": {"clip_l": 64, "t5xxl": 48}, "sd3": {"clip_l": 64, "clip_g": 96, "t5xxl": 4096}}
RES = 64  # 8x8 latents, 4x4 patches


@pytest.fixture(scope="module")
def pack(comfyui):
    nodes = load_pack(comfyui.nodes, PACK)
    root = nodes["DreamID_LearnIdentity"].__module__.split(".nodes.")[0]
    return {"nodes": nodes, "mods": lambda name: sys.modules[f"{root}.{name}"]}


def build(kind, **model_kw):
    from comfy_tiny import tiny_dit_clip, tiny_dit_model, tiny_vae16

    with torch.inference_mode():  # as ComfyUI loads them: the weights are inference tensors
        return {"model": tiny_dit_model(kind, **model_kw), "clip": tiny_dit_clip(kind), "vae": tiny_vae16()}


@pytest.fixture(scope="module")
def dits(comfyui):
    return {kind: build(kind) for kind in KINDS}


def photo(size=128):
    return torch.from_numpy(np.asarray(face_photo("tom", size=size), dtype=np.float32) / 255.0)[None]


def learn(pack, models, *, steps=3, lr=0.05, **kw):
    args = dict(model=models["model"], clip=models["clip"], vae=models["vae"], image=photo(), steps=steps,
                learning_rate=lr, attention_loss_weight=0.0, layout="words", num_tokens=2, init_word="person",
                class_word="person", resolution=RES, batch_size=1, seed=0, gradient_checkpointing=False,
                preview_every=0, snapshot_every=0) | kw
    with torch.inference_mode():  # the whole prompt runs under inference mode in ComfyUI
        return pack["nodes"]["DreamID_LearnIdentity"]().learn(**args)


# -- the step ----------------------------------------------------------------------------------------

def _shifted(kind: str, sampling, t: torch.Tensor) -> torch.Tensor:
    """The sigma of integer training timestep ``t``, written from the papers' formulas: FLUX.1's
    exp(mu) / (exp(mu) + 1/s - 1) over s in (0, 1] (10000 steps), SD3's shift*s / (1 + (shift-1)*s) (1000)."""
    if kind == "flux":
        s = (t.double() + 1) / 10000
        mu = float(sampling.shift)
        return math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    s = (t.double() + 1) / 1000
    shift = float(sampling.shift)
    return shift * s / (1 + (shift - 1) * s)


@pytest.mark.parametrize("kind", KINDS)
def test_the_step_is_flow_matching_through_the_models_own_sampling(comfyui, pack, dits, kind):
    """The host's loss equals mean((v - (noise - x0))^2) with v from a direct call of the transformer at
    x_t = (1 - sigma) x0 + sigma noise, sigma from the shifted schedule, FLUX's guidance 3.5."""
    host_mod = pack["mods"]("nodes.adapters.learn_host")
    loss_mod = pack["mods"]("dreamid_core.learning.loss")
    m = dits[kind]
    g = torch.Generator().manual_seed(5)
    with torch.inference_mode(False), torch.no_grad(), host_mod.ComfyHost(m["model"], m["clip"]) as host:
        assert host.prediction == "flow" and host.resolution_multiple == 16
        vectors = {k: torch.randn(2, w, generator=g) * 0.3 for k, w in PARTS[kind].items()}
        enc = host.encode("a photo of S* smiling", vectors)
        x0, noise = torch.randn(3, 16, 8, 8, generator=g), torch.randn(3, 16, 8, 8, generator=g)
        t = torch.tensor([7, host.num_timesteps // 2, host.num_timesteps - 3])
        noised = host.noise(x0, noise, t)
        sampling = host.sampling
        torch.testing.assert_close(noised.sigma.double(), _shifted(kind, sampling, t), rtol=2e-6, atol=1e-7)
        context, pooled = enc.context.repeat(3, 1, 1), enc.pooled.repeat(3, 1)
        denoised, maps = host.denoise(noised, pack["mods"]("dreamid_core.learning").Conditioning(context, pooled))
        got = loss_mod.prediction_error("flow", x0, denoised, noised.sigma)
        # the same step without ComfyUI's apply_model: the transformer itself, its timestep convention
        dm = m["model"].model.diffusion_model
        s = noised.sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        torch.testing.assert_close(noised.x_t, x_t, rtol=1e-6, atol=1e-6)
        if kind == "flux":
            v = dm(x_t, noised.sigma, context, y=pooled, guidance=torch.full((3,), 3.5))
        else:
            v = dm(x_t, noised.sigma * 1000, context=context, y=pooled)
        want = v.float() - (noise - x0)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        assert maps == []


# -- joint attention -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_joint_attention_maps_leave_the_output_as_it_was_and_steer_the_identity(comfyui, pack, kind):
    """Recording computes the image rows explicitly: the output stays ComfyUI's (to float error); one map per
    joint layer, image queries on the text keys; and the face term's gradient reaches the vectors through
    the maps, also out of checkpointed blocks (the same masses to float error)."""
    host_mod = pack["mods"]("nodes.adapters.learn_host")
    core = pack["mods"]("dreamid_core.learning")
    al = pack["mods"]("dreamid_core.learning.attention_loss")
    layers = {"flux": 4, "sd3": 2}[kind]  # FLUX: 2 double + 2 single blocks; SD3: 2 joint blocks
    runs = []
    for ckpt in (False, True):
        m = build(kind)
        g = torch.Generator().manual_seed(0)
        with torch.inference_mode(False), torch.enable_grad(), \
                host_mod.ComfyHost(m["model"], m["clip"], gradient_checkpointing=ckpt) as host:
            rows = host.word_embeddings("person")
            vec = {k: torch.nn.Parameter(v[:1].repeat(2, 1).clone()) for k, v in rows.items()}
            x0 = torch.randn(1, 16, 8, 8, generator=g)
            noised = host.noise(x0, torch.randn(x0.shape, generator=g), torch.tensor([host.num_timesteps // 2]))
            with torch.no_grad():
                enc = host.encode("a photo of S*", vec)
                cond = core.Conditioning(enc.context, enc.pooled)
                plain, none = host.denoise(noised, cond)
                recorded, maps = host.denoise(noised, cond, record=True)
            assert none == [] and len(maps) == layers
            torch.testing.assert_close(recorded, plain, rtol=1e-4, atol=1e-4 * float(plain.abs().max()))
            for p in maps:
                assert p.shape[2:] == (16, enc.context.shape[1]) and float(p.sum(-1).max()) <= 1 + 1e-5
            mask = torch.zeros(1, 8, 8)
            mask[:, :4, :4] = 1  # a "face" in the top-left quarter
            opt = torch.optim.Adam(vec.values(), lr=0.05)
            masses = []
            for _ in range(8):
                enc = host.encode("a photo of S*", vec)
                _, maps = host.denoise(noised, core.Conditioning(enc.context, enc.pooled), record=True)
                fm = torch.stack([al.face_mass(p, enc.positions, al.resize_mask(mask, p.shape[2])) for p in maps])
                masses.append(float(fm.detach().mean()))
                opt.zero_grad()
                (1 - fm.mean()).backward()
                opt.step()
        assert masses[-1] > masses[0] + 0.05, masses
        runs.append(masses)
    assert max(abs(a - b) for a, b in zip(*runs, strict=True)) < 1e-4, runs


# -- the node ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_learning_every_encoder_lowers_the_loss_and_leaves_model_and_clip_untouched(comfyui, pack, dits, kind):
    m = dits[kind]
    before = state_hash(m["model"].model.diffusion_model), state_hash(m["clip"].cond_stage_model)
    with_attention = learn(pack, m, steps=2, attention_loss_weight=0.003)
    assert "face attention n/a" not in with_attention["ui"]["text"][0]
    assert 0 < with_attention["result"][0].config.extra["face_mass"] < 1
    out = learn(pack, m, steps=8)
    ident = out["result"][0]
    assert {k: tuple(v.shape) for k, v in ident.tensors.items()} == {k: (2, w) for k, w in PARTS[kind].items()}
    extra = ident.config.extra
    assert extra["final_diffusion_loss"] < extra["initial_diffusion_loss"], extra
    assert ident.config.target == kind
    # the vectors keep their encoder's vocabulary norm (Directional Textual Inversion)
    for key, norms in extra["norms"].items():
        assert max(abs(n - extra["vocabulary_norm"][key]) for n in norms) < 1e-3, (key, norms)
    assert "face attention n/a" not in out["ui"]["text"][0]  # the before/after measure records maps anyway
    assert (state_hash(m["model"].model.diffusion_model), state_hash(m["clip"].cond_stage_model)) == before
    for module in (m["model"].model.diffusion_model, m["clip"].cond_stage_model):
        assert no_grads(module) and leftover_wrappers(module) == 0
        assert not any("forward" in mod.__dict__ for mod in module.modules())
    import comfy.model_management as mm

    assert not getattr(mm, "in_training", False)


@pytest.mark.parametrize("kind", KINDS)
def test_checkpointing_and_offloading_learn_the_same_vectors(comfyui, pack, dits, kind):
    """With the joint-attention loss on: its maps come out of checkpointed blocks with their gradients."""
    runs = {(ckpt, off): learn(pack, dits[kind], gradient_checkpointing=ckpt, offload=off,
                               attention_loss_weight=0.5)["result"][0].tensors
            for ckpt, off in ((False, False), (True, False), (False, True), (True, True))}
    plain = runs[(False, False)]
    for flags, tensors in runs.items():
        for key in plain:
            err = float((tensors[key] - plain[key]).abs().max())
            assert err < 1e-5, f"{kind} {flags} {key}: {err}"


def test_fp8_weights_learn_with_no_weight_gradient(comfyui, pack):
    m = build("flux", dtype=torch.float8_e4m3fn, manual_cast=torch.float32)
    dm = m["model"].model.diffusion_model
    assert next(dm.parameters()).dtype == torch.float8_e4m3fn
    before = state_hash(dm)
    ident = learn(pack, m, steps=8, gradient_checkpointing=True, offload=True)["result"][0]
    extra = ident.config.extra
    assert extra["final_diffusion_loss"] < extra["initial_diffusion_loss"], extra
    assert all(torch.isfinite(v).all() for v in ident.tensors.values())
    assert state_hash(dm) == before and no_grads(dm)


# -- the identity file -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_the_learned_identity_is_one_embedding_file_that_clip_text_encode_reads(comfyui, pack, dits, kind):
    from comfy_tiny import tiny_dit_clip

    emb_dir = comfyui.models_dir("embeddings")
    ident, embeds, _, _ = learn(pack, dits[kind], steps=2)["result"]
    label = pack["nodes"]["DreamID_SaveLearnedIdentity"]().save(ident, f"learned_{kind}", True)["result"][0]
    assert label == f"embedding:learned_{kind}"
    from safetensors.torch import load_file

    assert set(load_file(str(emb_dir / f"learned_{kind}.safetensors"))) == set(PARTS[kind])
    with torch.inference_mode():
        clip = tiny_dit_clip(kind, embedding_directory=str(emb_dir))
        text = "portrait of S*, rim light"
        (plain,) = comfyui.nodes.CLIPTextEncode().encode(clip, text.replace("S*", f"embedding:learned_{kind}"))
        injected = pack["nodes"]["DreamID_InjectIDTokens"]().encode(clip, embeds, text, "S*")["result"][0]
    assert torch.equal(plain[0][0], injected[0][0])
    assert torch.equal(plain[0][1]["pooled_output"], injected[0][1]["pooled_output"])


# -- refusals ----------------------------------------------------------------------------------------

def test_the_attention_loss_above_512_px_is_refused_by_name(comfyui, pack, dits):
    err = pack["mods"]("nodes.adapters.validation").NodeInputError
    # 1024 px is 4096 image tokens: more than the layers whose maps the attention loss keeps
    with pytest.raises(err, match=r"attention_loss_weight=0\.003 at resolution 1024: SD3/3\.5's joint attention "
                                  r"has 4096 image tokens.*Use resolution <= 512, or attention_loss_weight 0"):
        learn(pack, dits["sd3"], attention_loss_weight=0.003, resolution=1024)


def test_a_model_and_clip_of_different_families_are_refused_naming_both(comfyui, pack, dits):
    from comfy_tiny import tiny_clip
    from test_learn_nodes import small_sdxl_model

    err = pack["mods"]("nodes.adapters.validation").NodeInputError
    with torch.inference_mode():
        sdxl_model, sdxl_clip = small_sdxl_model(), tiny_clip("sdxl")
    flux, sd3 = dits["flux"], dits["sd3"]
    cases = [(dict(flux, model=sdxl_model), r"MODEL is SDXL but this CLIP \(FLUX\.1"),
             (dict(flux, clip=sdxl_clip), r"MODEL is FLUX\.1 but this CLIP \(SDXL"),
             (dict(flux, clip=sd3["clip"]), r"MODEL is FLUX\.1 but this CLIP \(SD3/3\.5"),
             (dict(sd3, clip=flux["clip"]), r"MODEL is SD3/3\.5 but this CLIP \(FLUX\.1")]
    for models, pattern in cases:
        with pytest.raises(err, match=pattern):
            learn(pack, models)
    narrow = build("flux", context_in_dim=40)["model"]
    with pytest.raises(err, match=r"reads t5xxl 40 wide but this CLIP \(FLUX\.1.*gives t5xxl 48"):
        learn(pack, dict(flux, model=narrow))
