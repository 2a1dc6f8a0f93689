"""The trigger contract on the DiT families' text encoders, in a real ComfyUI: for every generated prompt,
DreamID_InjectIDTokens(prompt) equals (torch.equal, cond and pooled) CLIPTextEncode of the prompt with each
trigger replaced by ``embedding:NAME``, NAME being ONE multi-key file (``clip_l`` + ``clip_g`` + ``t5xxl`` for
SD3, ``clip_l`` + ``t5xxl`` for FLUX.1) that DreamID_SaveIDEmbedding wrote and DreamID_LoadIdentity reads back.

ComfyUI's own tokenizers: CLIP's BPE in 77-token chunks, and T5's sentencepiece with its own rules (no start
token, an end token, one unchunked sequence padded to 77 (SD3) or 256 (FLUX) tokens). Also: the families
that cannot take a word identity are refused by name, and an identity of one family on another's CLIP names
both."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from comfy_env import load_pack
from test_inject_contract import assert_same, generate, render

pytestmark = pytest.mark.comfyui
PACK = Path(__file__).resolve().parents[1]
PARTS = {"sd3": ("clip_l", "clip_g", "t5xxl"), "flux": ("clip_l", "t5xxl")}
CASES = {"sd3": (31, 40), "flux": (32, 60)}  # kind -> (seed, number of prompts)


@pytest.fixture(scope="module")
def pack(comfyui):
    nodes = load_pack(comfyui.nodes, PACK)
    root = nodes["DreamID_EncodeFace"].__module__.split(".nodes.")[0]
    return {"nodes": nodes, "mods": lambda name: sys.modules[f"{root}.{name}"]}


@pytest.fixture(scope="module")
def emb_dir(comfyui):
    return comfyui.models_dir("embeddings")


@pytest.fixture(scope="module")
def clips(comfyui, emb_dir):
    from comfy_tiny import tiny_dit_clip

    with torch.inference_mode():
        return {kind: tiny_dit_clip(kind, embedding_directory=str(emb_dir)) for kind in PARTS}


def widths(clip) -> dict[str, int]:
    cm = clip.cond_stage_model
    return {part: getattr(cm, part).transformer.get_input_embeddings().weight.shape[1]
            for part in ("clip_l", "clip_g", "t5xxl") if getattr(cm, part, None) is not None}


def random_identity(pack, clip, k, seed):
    g = torch.Generator().manual_seed(seed)
    parts = {part: torch.randn(k, w, generator=g) * 0.2 for part, w in widths(clip).items()}
    return pack["mods"]("dreamid_core.identities.embeds").IdentityEmbeds(parts=parts, info={})


def save(pack, embeds, name):
    return pack["nodes"]["DreamID_SaveIDEmbedding"]().save(embeds, name, True)["result"][0]


def inject(pack, clip, embeds, text, trigger="S*"):
    with torch.inference_mode():
        return pack["nodes"]["DreamID_InjectIDTokens"]().encode(clip, embeds, text, trigger)["result"][0]


def encode(comfyui, clip, text):
    with torch.inference_mode():
        return comfyui.nodes.CLIPTextEncode().encode(clip, text)[0]


@pytest.mark.parametrize("kind", list(PARTS))
def test_inject_equals_one_multi_key_embedding_on_generated_prompts(comfyui, pack, emb_dir, clips, kind):
    seed, n = CASES[kind]
    rng = random.Random(seed)
    clip = clips[kind]
    identities = {}
    for k in (1, 2, 3, 9):
        embeds = random_identity(pack, clip, k, seed * 10 + k)
        token = save(pack, embeds, f"dit {kind} k{k}")
        identities[k] = (embeds, token)
        assert set(pack["mods"]("dreamid_core.identities.embedding_io").read_embedding(
            emb_dir / f"{token.split(':', 1)[1]}.safetensors")) == set(PARTS[kind])  # one file, every encoder
    checked = 0
    for i in range(n):
        k = (1, 2, 3, 9)[i % 4]
        embeds, token = identities[k]
        trigger = rng.choice(["S*", "S*", "sks", "ohwx", "<me>"])
        n_words = rng.choice([1, 3, 8, 20, 60, 74, 75, 76, 120, 150, 240, 300])
        pieces = generate(rng, [trigger], n_words, rng.choice([1, 1, 2, 3]))
        prompt = render(pieces, lambda w: w)
        reference = render(pieces, lambda w, token=token: f" {token} ")
        assert_same(inject(pack, clip, embeds, prompt, trigger), encode(comfyui, clip, reference), prompt)
        checked += 1
    assert checked == n


@pytest.mark.parametrize("kind", list(PARTS))
def test_load_identity_keeps_every_part_and_the_family(comfyui, pack, emb_dir, clips, kind):
    embeds = random_identity(pack, clips[kind], 2, 5)
    token = save(pack, embeds, f"loaded {kind}")
    ident, again = pack["nodes"]["DreamID_LoadIdentity"]().load(f"embeddings/{token.split(':', 1)[1]}.safetensors")
    assert set(ident.tensors) == set(PARTS[kind]) and ident.config.target == kind
    for part, t in embeds.parts.items():
        assert torch.equal(again.parts[part], t)
    prompt = "a photo of S*, in the rain"
    assert_same(inject(pack, clips[kind], again, prompt), encode(comfyui, clips[kind], prompt.replace("S*", f" {token} ")),
                prompt)


def test_an_identity_of_one_family_on_another_names_both(comfyui, pack, clips):
    from comfy_tiny import tiny_clip

    errors = pack["mods"]("dreamid_core.errors")
    with torch.inference_mode():
        sdxl = tiny_clip("sdxl", dtype=torch.float32)
    flux_identity = random_identity(pack, clips["flux"], 2, 3)
    with pytest.raises(errors.IncompatibleEncoderError, match=r"\['clip_l', 't5xxl'\].*sdxl.*needs \['clip_g', "
                                                               r"'clip_l'\] \(no clip_g\)"):
        inject(pack, sdxl, flux_identity, "a photo of S*")
    sdxl_identity = pack["mods"]("dreamid_core.identities.embeds").IdentityEmbeds(
        parts={"clip_l": torch.randn(2, 64), "clip_g": torch.randn(2, 96)})
    with pytest.raises(errors.IncompatibleEncoderError, match=r"\['clip_g', 'clip_l'\].*flux.*\(no t5xxl\)"):
        inject(pack, clips["flux"], sdxl_identity, "a photo of S*")


def test_families_without_word_identities_are_refused_by_name(comfyui, pack):
    """Qwen-Image and Wan: ComfyUI loads no embeddings for their text encoders; the error names them and the
    families that work. (Their real encoders are 7B-parameter models: a stand-in CLIP object carries their
    tokenizers' embedding keys.)"""
    from types import SimpleNamespace

    errors = pack["mods"]("dreamid_core.errors")
    for key, model in (("qwen25_7b", "QwenImageTEModel"), ("umt5xxl", "WanTEModel")):
        tok = SimpleNamespace(embedding_key=key)
        clip = SimpleNamespace(tokenizer=SimpleNamespace(**{key: tok}),
                               cond_stage_model=type(model, (), {key: object()})(),
                               tokenize=lambda text, _k=key: {_k: [[]]})
        embeds = pack["mods"]("dreamid_core.identities.embeds").IdentityEmbeds(parts={"clip_l": torch.zeros(2, 768)})
        with pytest.raises(errors.IncompatibleEncoderError, match=rf"\({model}\).*{key} cannot take a word identity"
                                                                   r".*FLUX\.1"):
            pack["nodes"]["DreamID_InjectIDTokens"]().encode(clip, embeds, "a photo of S*", "S*")


def test_learning_with_a_dit_clip_on_a_unet_is_refused_naming_both_families(comfyui, pack, clips):
    """FLUX.1 / SD3 learn (tests/test_learn_dit.py); their CLIP on an SD2 UNet is refused, both families named."""
    from face_photos import HAVE_PHOTOS
    from test_learn_nodes import small_sd2_model

    if not HAVE_PHOTOS:
        pytest.skip("needs the sample photos")
    with torch.inference_mode():
        model = small_sd2_model()
    node = pack["nodes"]["DreamID_LearnIdentity"]()
    for kind, name in (("sd3", r"SD3/3\.5"), ("flux", r"FLUX\.1")):
        with pytest.raises(Exception, match=rf"the MODEL is SD2\.x but this CLIP \({name}, .*Connect the CLIP that "
                                            r"belongs to this MODEL \(SD2\.x\)"):
            node.learn(model=model, clip=clips[kind], vae=object(), image=torch.zeros(1, 64, 64, 3), steps=1,
                       learning_rate=0.01, attention_loss_weight=0.0, layout="words", num_tokens=2, init_word="person",
                       class_word="person", resolution=64, batch_size=1, seed=0, gradient_checkpointing=False)
