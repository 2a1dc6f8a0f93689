"""DreamID_LearnIdentity and the identity nodes inside a real ComfyUI (in-process, CPU), with tiny real
models (a 32-channel SD2-layout UNet in a ModelPatcher, the tiny checkpoint's VAE, a tiny real CLIP with
ComfyUI's fp16 text-encoder weights) and a real face photo."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_env import load_pack
from face_photos import face_photo, needs_photos

pytestmark = [pytest.mark.comfyui, needs_photos]
PACK = Path(__file__).resolve().parents[1]
RES = 64  # 8x8 latents
SMALL_CONTEXT = 96  # tiny_clip("sd2") width


@pytest.fixture(scope="module")
def pack(comfyui):
    nodes = load_pack(comfyui.nodes, PACK)
    assert {"DreamID_LearnIdentity", "DreamID_ApplyPerStageIdentity", "DreamID_LoadIdentity",
            "DreamID_SaveLearnedIdentity"} <= set(nodes)
    root = nodes["DreamID_LearnIdentity"].__module__.split(".nodes.")[0]
    return {"nodes": nodes, "mods": lambda name: sys.modules[f"{root}.{name}"]}


def small_sd2_model(seed: int = 0):
    """An SD2-layout (eps, one level) UNet with 32 channels and context width 96, in a ModelPatcher."""
    import comfy.model_patcher
    import comfy.supported_models
    from comfy_tiny import init_weights_, tiny_sd2_unet_config

    config = comfy.supported_models.SD20(tiny_sd2_unet_config() | {"model_channels": 32,
                                                                   "context_dim": SMALL_CONTEXT})
    config.unet_config["num_head_channels"] = 16  # SD20 forces 64, wider than these 32 channels
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    init_weights_(model.diffusion_model, seed)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def small_sdxl_model(seed: int = 0):
    """An SDXL-layout UNet (attention on level 1 only, 32 channels, context 64 + 96, pooled 96 + the
    6 size embeddings) in a ModelPatcher, for tiny_clip("sdxl")."""
    import comfy.model_patcher
    import comfy.supported_models
    from comfy_tiny import init_weights_

    cfg = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
           "channel_mult": [1, 2], "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
           "transformer_depth_middle": 1, "context_dim": 160, "use_linear_in_transformer": True,
           "num_head_channels": 16, "num_heads": -1, "use_spatial_transformer": True, "legacy": False,
           "adm_in_channels": 96 + 6 * 256, "num_classes": "sequential", "use_checkpoint": False,
           "use_temporal_resblock": False, "use_temporal_attention": False}
    config = comfy.supported_models.SDXL(cfg)
    config.unet_config["num_head_channels"] = 16
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    init_weights_(model.diffusion_model, seed)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@pytest.fixture(scope="module")
def models(comfyui, tmp_path_factory):
    import comfy.sd
    from comfy_tiny import tiny_clip, write_tiny_sd2_checkpoint

    ckpt = write_tiny_sd2_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_sd2.safetensors")
    with torch.inference_mode():  # as ComfyUI loads them: the weights are inference tensors
        ckpt_model, _, vae, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=False)
        model = small_sd2_model()
        clip = tiny_clip("sd2")  # fp16 weights, ComfyUI's default
    return {"model": model, "clip": clip, "vae": vae, "ckpt_model": ckpt_model}


def photo(person="tom", size=128):
    return torch.from_numpy(np.asarray(face_photo(person, size=size), dtype=np.float32) / 255.0)[None]


def learn(pack, models, *, steps=4, lr=0.01, weight=0.003, layout="words", seed=0, image=None, **kw):
    node = pack["nodes"]["DreamID_LearnIdentity"]()
    args = dict(model=models["model"], clip=models["clip"], vae=models["vae"], image=photo() if image is None else image,
                steps=steps, learning_rate=lr, attention_loss_weight=weight, layout=layout, num_tokens=2,
                init_word="person", class_word="person", resolution=RES, batch_size=1, seed=seed,
                gradient_checkpointing=False, preview_every=0, snapshot_every=0) | kw
    with torch.inference_mode():  # the whole prompt runs under inference mode in ComfyUI
        out = node.learn(**args)
    return out["result"]


def state_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def no_grads(module: torch.nn.Module) -> bool:
    return all(p.grad is None for p in module.parameters())


def leftover_wrappers(module: torch.nn.Module) -> int:
    return sum(len(getattr(m, k, None) or []) for m in module.modules() for k in ("weight_function", "bias_function"))


def sample(comfyui, model, positive, negative, seed=3, steps=3):
    latent = {"samples": torch.zeros(1, 4, RES // 8, RES // 8)}
    with torch.inference_mode():
        return comfyui.nodes.KSampler().sample(model, seed, steps, 5.0, "euler", "normal", positive, negative,
                                               latent, denoise=1.0)[0]["samples"]


def encode(comfyui, clip, text):
    with torch.inference_mode():
        return comfyui.nodes.CLIPTextEncode().encode(clip, text)[0]


def test_words_learning_lowers_the_loss_and_leaves_the_inputs_untouched(comfyui, pack, models):
    model, clip = models["model"], models["clip"]
    neg = encode(comfyui, clip, "blurry")
    before = (state_hash(model.model), state_hash(clip.cond_stage_model), dict(model.model_options),
              sample(comfyui, model, encode(comfyui, clip, "a photo of a person"), neg))
    ident, embeds, curve, _ = learn(pack, models, steps=6, lr=0.005)
    extra = ident.config.extra
    assert extra["final_diffusion_loss"] < extra["initial_diffusion_loss"]  # fixed noise, every photo
    assert ident.layout == "words" and ident.tensors["clip_h"].shape == (2, SMALL_CONTEXT)
    assert ident.config.init == "word:person" and ident.config.steps == 6
    init = clip.cond_stage_model.clip_h.transformer.get_input_embeddings().weight[2533].float()
    assert not torch.allclose(ident.tensors["clip_h"][0], init)  # gradients reached S* through the fp16 CLIP
    assert torch.equal(embeds.parts["clip_h"], ident.tensors["clip_h"])
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and float(curve.max()) <= 1.0
    assert state_hash(model.model) == before[0] and state_hash(clip.cond_stage_model) == before[1]
    assert no_grads(model.model) and no_grads(clip.cond_stage_model)
    assert model.model_options == before[2] and leftover_wrappers(model.model) == 0
    assert leftover_wrappers(clip.cond_stage_model) == 0
    assert torch.equal(sample(comfyui, model, encode(comfyui, clip, "a photo of a person"), neg), before[3])


def run_learner(pack, models, *, steps=4, lr=0.05, weight=0.0, terms=(1.0, 1.0, 1.0), layout="words", **opts):
    """The core learner on the node's host (ComfyHost), as DreamID_LearnIdentity runs it."""
    host_mod, core = pack["mods"]("nodes.adapters.learn_host"), pack["mods"]("dreamid_core.learning")
    li = pack["mods"]("dreamid_core.identities.learned_identity")
    with torch.inference_mode(False), torch.enable_grad():
        host = host_mod.ComfyHost(models["model"], models["clip"])
        faces = pack_pipeline(pack).process(photo()).faces
        photos = host_mod.encode_photos(models["vae"], host, photo(), faces, RES)
        cfg = li.IdentityConfig(layout=layout, steps=steps, lr=lr, attn_weight=weight, resolution=RES, num_stages=3)
        with host:
            learner = core.IdentityLearner(host, photos, cfg, core.from_word_rows(host.word_embeddings("person"), 2),
                                           core.RunOptions(attn_terms=terms, **opts))
            return learner.run()


def pack_pipeline(pack):
    faces = pack["mods"]("dreamid_core.faces.pipeline")
    return faces.FacePipeline(pack["mods"]("dreamid_core.faces.detectors").make_detector("mtcnn"))


def test_attention_face_term_moves_identity_attention_into_the_face(pack, models):
    # same seed, same steps; only the attention loss differs (its face term, weighted up so that a few CPU
    # steps show the direction); face mass measured before and after on the same fixed draws
    off = run_learner(pack, models, steps=8, weight=0.0)
    on = run_learner(pack, models, steps=8, weight=20.0, terms=(0.0, 0.0, 1.0))
    assert off.initial.face_mass == on.initial.face_mass  # identical start, measured by the same patch
    assert on.final.face_mass > on.initial.face_mass + 0.01, (on.initial, on.final)
    assert on.final.face_mass > off.final.face_mass


def test_the_full_attention_loss_falls_on_a_fixed_draw(pack, models):
    host_mod = pack["mods"]("nodes.adapters.learn_host")
    core, li = pack["mods"]("dreamid_core.learning"), pack["mods"]("dreamid_core.identities.learned_identity")
    with torch.inference_mode(False), torch.enable_grad():
        host = host_mod.ComfyHost(models["model"], models["clip"])
        photos = host_mod.encode_photos(models["vae"], host, photo(), pack_pipeline(pack).process(photo()).faces, RES)
        with host:
            learner = core.IdentityLearner(host, photos, li.IdentityConfig(steps=20, lr=0.05, attn_weight=1.0,
                                                                             resolution=RES),
                                           core.from_word_rows(host.word_embeddings("person"), 2))
            first = [learner.step(0).attention for _ in range(10)]  # the same draw ten times
    assert first[-1] < 0.97 * first[0], first


def test_encoder_init_starts_where_word_init_arrives(pack, models):
    """Wiring check: an encoder whose S* is a word-init run's result starts at (or below) the loss that
    run needed its steps to reach."""
    from dreamid_core import BackboneConfig, EncoderConfig, FacePipeline, IDEncoder, make_detector

    learned = learn(pack, models, steps=6, lr=0.05, weight=0.0)[0]
    target = learned.config.extra["final_diffusion_loss"]
    assert learned.config.extra["initial_diffusion_loss"] > target
    torch.manual_seed(0)
    bb = BackboneConfig(width=32, depth=4, num_heads=4, num_features=16, patch_size=28)
    enc = IDEncoder(EncoderConfig(backbone=bb, target="sd2", token_widths=(("clip_h", SMALL_CONTEXT),),
                                  tap_layers=(1, 2, 3, 4), hidden_dim=32)).eval()
    with torch.no_grad():
        for i, proj in enumerate(enc.projections):  # S* token i = the learned vector i, for any face
            proj.out.weight.zero_()
            proj.out.bias.copy_(learned.tensors["clip_h"][i])
    import comfy.model_patcher

    bundle_cls = pack["mods"]("nodes.encoder_nodes").EncoderBundle
    patcher = comfy.model_patcher.ModelPatcher(enc, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    bundle = bundle_cls(patcher, FacePipeline(make_detector("mtcnn")), enc.config, "test-encoder")
    with_encoder = learn(pack, models, steps=1, lr=1e-6, weight=0.0, encoder=bundle)[0]
    assert with_encoder.config.init == "encoder"
    assert with_encoder.config.extra["initial_diffusion_loss"] == pytest.approx(target, rel=1e-5)


def _ident(pack, clip, stages=5, kind="time"):
    """Every stage's K and V = S*, the own word embeddings of "S*" (ids 338, 265) per text encoder."""
    li = pack["mods"]("dreamid_core.identities.learned_identity")
    keys = [k for k in ("clip_l", "clip_h", "clip_g") if getattr(clip.cond_stage_model, k, None) is not None]
    parts = {k: getattr(clip.cond_stage_model, k).transformer.get_input_embeddings().weight[[338, 265]].float()
             for k in keys}
    ident = li.LearnedIdentity.per_stage_from_words(parts, li.IdentityConfig(num_stages=stages, stage_kind=kind))
    return ident, parts


@pytest.fixture(scope="module")
def checkpoint_models(models):
    """The tiny SD2 checkpoint as CheckpointLoaderSimple detects it (320 channels, context 1024), with
    the 1024-wide tiny CLIP that matches it."""
    from comfy_tiny import server_sd2_clip

    with torch.inference_mode():
        return {"model": models["ckpt_model"], "clip": server_sd2_clip(), "vae": models["vae"]}


@pytest.fixture(scope="module")
def sdxl_models(models):
    from comfy_tiny import tiny_clip

    with torch.inference_mode():
        return {"model": small_sdxl_model(), "clip": tiny_clip("sdxl"), "vae": models["vae"]}


@pytest.mark.parametrize("kind, which", [("time", "small"), ("unet", "small"), ("time", "checkpoint"),
                                         ("time", "sdxl")])
def test_per_stage_with_plain_s_star_equals_inject_id_tokens(comfyui, pack, request, kind, which):
    chosen = request.getfixturevalue({"small": "models", "checkpoint": "checkpoint_models",
                                      "sdxl": "sdxl_models"}[which])
    model, clip = chosen["model"], chosen["clip"]
    ident, s_star = _ident(pack, clip, kind=kind)
    text, neg = "a photo of S* in a garden", encode(comfyui, clip, "blurry")
    embeds = pack["mods"]("dreamid_core.identities.embeds").IdentityEmbeds(parts=s_star)
    with torch.inference_mode():
        injected = pack["nodes"]["DreamID_InjectIDTokens"]().encode(clip, embeds, text, "S*")
        injected = injected["result"][0] if isinstance(injected, dict) else injected[0]
        staged_model, positive = pack["nodes"]["DreamID_ApplyPerStageIdentity"]().apply(model, clip, ident, text, "S*")
    assert staged_model is not model and not model.model_options["transformer_options"].get("patches")
    reference = sample(comfyui, model, injected, neg)
    assert torch.equal(sample(comfyui, staged_model, positive, neg), reference)
    # the patch is live: another VALUE for one stage changes the image
    for t in ident.tensors.values():
        t[:, 1] += 0.5  # every stage's VALUE (a one-level UNet leaves some stages unused)
    with torch.inference_mode():
        changed, positive = pack["nodes"]["DreamID_ApplyPerStageIdentity"]().apply(model, clip, ident, text, "S*")
    assert not torch.equal(sample(comfyui, changed, positive, neg), reference)


def test_per_stage_learning_then_generating_leaves_the_model_alone(comfyui, pack, models):
    model, clip = models["model"], models["clip"]
    ident, embeds, _, _ = learn(pack, models, steps=2, layout="per_stage", num_stages=3)
    assert ident.layout == "per_stage" and ident.tensors["clip_h"].shape == (3, 2, 2, SMALL_CONTEXT)
    start = clip.cond_stage_model.clip_h.transformer.get_input_embeddings().weight[2533].float()
    trained = [s for s in range(3) if not torch.allclose(ident.tensors["clip_h"][s, 0, 0], start)]
    assert trained  # the stages of the two steps' timesteps
    assert not model.model_options["transformer_options"].get("patches")
    with torch.inference_mode():
        out_model, positive = pack["nodes"]["DreamID_ApplyPerStageIdentity"]().apply(model, clip, ident,
                                                                                      "a photo of S*", "S*")
    assert out_model is not model and out_model.model_options["transformer_options"]["patches"]["attn2_patch"]
    out = sample(comfyui, out_model, positive, encode(comfyui, clip, "blurry"))
    assert torch.isfinite(out).all()


def test_cancel_mid_loop_leaves_nothing_and_the_next_run_works(pack, models):
    import comfy.model_management as mm
    import comfy.utils

    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append(value)
        if value == 1:  # the first update: ComfyUI 0.33 throttles the later ones, every version sends this one
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            learn(pack, models, steps=6)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert seen[-1] == 1  # stopped at the next step's interruption check
    assert leftover_wrappers(models["model"].model) == 0 and leftover_wrappers(models["clip"].cond_stage_model) == 0
    assert no_grads(models["model"].model) and no_grads(models["clip"].cond_stage_model)
    assert not models["model"].model_options["transformer_options"].get("patches_replace")
    assert learn(pack, models, steps=1)[0].config.steps == 1


def test_gradient_checkpointing_gives_the_same_identity(pack, models):
    plain = learn(pack, models, steps=2, weight=0.5)[0]
    ckpt = learn(pack, models, steps=2, weight=0.5, gradient_checkpointing=True)[0]
    assert torch.allclose(plain.tensors["clip_h"], ckpt.tensors["clip_h"], atol=1e-5)
    dm = models["model"].model.diffusion_model
    assert all("forward" not in b.__dict__ for b in [*dm.input_blocks, dm.middle_block, *dm.output_blocks])


def test_bad_inputs_give_clear_errors(pack, models):
    from comfy_tiny import tiny_clip

    errors = pack["mods"]("dreamid_core.errors")  # the classes the pack raises (it is loaded as its own package)
    DreamIDError, FaceNotFoundError = errors.DreamIDError, errors.FaceNotFoundError
    with pytest.raises(FaceNotFoundError, match="No face"):
        learn(pack, models, image=photo("none"))
    with pytest.raises(DreamIDError, match="steps=0"):
        learn(pack, models, steps=0)
    with pytest.raises(DreamIDError, match="learning_rate=NaN"):
        learn(pack, models, lr=float("nan"))
    with pytest.raises(DreamIDError, match="vae input is None"):
        learn(pack, models, vae=None)
    with torch.inference_mode():
        sd1 = tiny_clip("sd1")  # 64 wide: not this MODEL's family
    with pytest.raises(DreamIDError, match="expects text features 96 wide"):
        learn(pack, models, clip=sd1)
    with pytest.raises(DreamIDError, match="resolution=100 must be a positive multiple of 8"):  # a one-level UNet
        learn(pack, models, resolution=100)
    with pytest.raises(DreamIDError, match="class_word is empty"):
        learn(pack, models, class_word="  ")
    assert no_grads(models["model"].model) and no_grads(models["clip"].cond_stage_model)


def test_save_and_load_both_layouts(comfyui, pack, models):
    comfyui.models_dir("embeddings")
    ident_dir = comfyui.models_dir("dreamid_identities")
    staged, _ = _ident(pack, models["clip"], stages=3)
    save = pack["nodes"]["DreamID_SaveLearnedIdentity"]()
    label = save.save(staged, "staged_me", False)["result"][0]
    assert label == "identities/staged_me.safetensors" and (ident_dir / "staged_me.safetensors").is_file()
    loaded, embeds = pack["nodes"]["DreamID_LoadIdentity"]().load(label)
    assert loaded.layout == "per_stage" and torch.equal(loaded.tensors["clip_h"], staged.tensors["clip_h"])
    li = pack["mods"]("dreamid_core.identities.learned_identity")
    words = li.LearnedIdentity.words({"clip_h": staged.tensors["clip_h"][0, 0]}, li.IdentityConfig(target="sd2"))
    assert save.save(words, "words_me", False)["result"][0] == "embedding:words_me"
    back, embeds = pack["nodes"]["DreamID_LoadIdentity"]().load("embeddings/words_me.safetensors", models["clip"])
    assert back.layout == "words" and torch.equal(embeds.parts["clip_h"], words.tensors["clip_h"])
    with pytest.raises(FileNotFoundError, match="pick a file"):
        pack["nodes"]["DreamID_LoadIdentity"]().load("(no identity files)")
    # a loaded embedding as the init of a learning run
    started = learn(pack, models, steps=1, lr=1e-6, weight=0.0, init_identity=embeds, norm="free")[0]
    assert started.config.init == "file:embeddings/words_me.safetensors"
    assert torch.allclose(started.tensors["clip_h"], embeds.parts["clip_h"], atol=1e-4)


def test_every_input_and_output_is_described(pack):
    for node_id in ("DreamID_LearnIdentity", "DreamID_ApplyPerStageIdentity", "DreamID_LoadIdentity",
                    "DreamID_SaveLearnedIdentity"):
        cls = pack["nodes"][node_id]
        assert cls.CATEGORY == "DreamIdentity" and len(cls.DESCRIPTION) > 40, node_id
        spec = cls.INPUT_TYPES()
        for name, (_, *opts) in {**spec["required"], **spec.get("optional", {})}.items():
            assert opts and opts[0].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES), node_id


@pytest.mark.parametrize("layout", ["words", "per_stage"])
def test_sdxl_learns_and_generates(comfyui, pack, sdxl_models, layout):
    ident, embeds, _, _ = learn(pack, sdxl_models, steps=2, layout=layout, num_stages=2)
    with torch.inference_mode():
        model, positive = pack["nodes"]["DreamID_ApplyPerStageIdentity"]().apply(
            sdxl_models["model"], sdxl_models["clip"], ident, "a photo of S*", "S*")
    assert set(ident.tensors) == {"clip_l", "clip_g"} and ident.config.target == "sdxl"
    assert set(embeds.parts) == {"clip_l", "clip_g"}
    out = sample(comfyui, model, positive, encode(comfyui, sdxl_models["clip"], "blurry"))
    assert torch.isfinite(out).all()


def test_several_photos_and_a_batch_of_two(pack, models):
    two = torch.cat([photo(), torch.from_numpy(np.asarray(face_photo("tom", size=128, jitter=12),
                                                          dtype=np.float32) / 255.0)[None]])
    ident = learn(pack, models, steps=2, image=two, batch_size=2, weight=0.5)[0]
    assert ident.config.extra["num_photos"] == 2
    assert torch.isfinite(ident.tensors["clip_h"]).all()
