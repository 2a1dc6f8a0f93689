"""The five nodes inside a real ComfyUI (in-process, CPU), with tiny real CLIPs and real photos."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_env import load_pack
from PIL import Image

pytestmark = pytest.mark.comfyui
PACK = Path(__file__).resolve().parents[1]
_spec = importlib.util.find_spec("insightface")
IMAGES = Path(_spec.origin).parent / "data" / "images" if _spec and _spec.origin else None
TRIGGER_IDS = [338, 265]  # "S*" in the CLIP BPE: "s", "*"
LONG = ", ".join(f"detail number {i}" for i in range(40))  # > 77 tokens: several chunks


@pytest.fixture(scope="session")
def pack(comfyui):
    nodes = load_pack(comfyui.nodes, PACK)
    assert set(nodes) >= {"DreamID_LoadIDEncoder", "DreamID_EncodeFace", "DreamID_InjectIDTokens",
                          "DreamID_SaveIDEmbedding", "DreamID_ScenePosition"}
    root = nodes["DreamID_EncodeFace"].__module__.split(".nodes.")[0]
    core = sys.modules[f"{root}.dreamid_core"]
    return {"nodes": nodes, "core": core, "identity": sys.modules[f"{root}.dreamid_core.identity"]}


@pytest.fixture(scope="session")
def emb_dir(comfyui):
    return comfyui.models_dir("embeddings")


def clip_for(kind, emb_dir, **kw):
    from comfy_tiny import tiny_clip

    return tiny_clip(kind, embedding_directory=str(emb_dir), **kw)


def word_embeddings(clip, key, ids):
    model = getattr(clip.cond_stage_model, f"clip_{key}")
    return model.transformer.get_input_embeddings().weight[ids].float()


def own_identity(pack, clip, keys):
    return pack["identity"].IdentityEmbeds(parts={f"clip_{k}": word_embeddings(clip, k, TRIGGER_IDS) for k in keys},
                                           info={"target": "test"})


def encode_plain(comfyui, clip, text):
    return comfyui.nodes.CLIPTextEncode().encode(clip, text)[0]


def inject(pack, clip, embeds, text, trigger="S*"):
    return pack["nodes"]["DreamID_InjectIDTokens"]().encode(clip, embeds, text, trigger)[0]


def same_conditioning(a, b):
    assert len(a) == len(b)
    for (ca, da), (cb, db) in zip(a, b, strict=True):
        assert torch.equal(ca, cb), (ca - cb).abs().max()
        if da.get("pooled_output") is not None:
            assert torch.equal(da["pooled_output"], db["pooled_output"])


KEYS = {"sd1": ("l",), "sd2": ("h",), "sdxl": ("l", "g")}
TEXTS = ["a photo of S* as a chef", "(S*:1.2) in a garden, S* again", f"S* at the start, {LONG}, and S* at the end"]


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("text", TEXTS, ids=["simple", "weighted-twice", "over-77-tokens"])
def test_own_embeddings_give_exactly_the_plain_prompt(comfyui, pack, emb_dir, kind, text):
    clip = clip_for(kind, emb_dir)
    same_conditioning(inject(pack, clip, own_identity(pack, clip, KEYS[kind]), text), encode_plain(comfyui, clip, text))


def test_clip_set_last_layer_is_respected(comfyui, pack, emb_dir):
    clip = comfyui.nodes.CLIPSetLastLayer().set_last_layer(clip_for("sd1", emb_dir), -2)[0]
    text = "a portrait of S*"
    same_conditioning(inject(pack, clip, own_identity(pack, clip, ["l"]), text), encode_plain(comfyui, clip, text))


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_other_vectors_change_only_what_follows_the_trigger(comfyui, pack, emb_dir, kind):
    clip = clip_for(kind, emb_dir)
    text = f"a photo of a happy S* in the rain, {LONG}"
    g = torch.Generator().manual_seed(0)
    parts = {f"clip_{k}": torch.randn(2, word_embeddings(clip, k, [0]).shape[1], generator=g) * 0.1
             for k in KEYS[kind]}
    cond = inject(pack, clip, pack["identity"].IdentityEmbeds(parts=parts), text)[0][0]
    plain = encode_plain(comfyui, clip, text)[0][0]
    assert cond.shape == plain.shape and cond.shape[1] == 77 * 3
    prefix = [t for t, *_ in clip.tokenize("a photo of a happy")[KEYS[kind][0]][0]]
    pos = prefix.index(49407)  # start token + 5 words: where S* begins in chunk 0
    assert torch.equal(cond[:, :pos], plain[:, :pos])  # causal text encoder: tokens before S* unchanged
    assert not torch.allclose(cond[:, pos:77], plain[:, pos:77])
    assert torch.equal(cond[:, 77:], plain[:, 77:])  # the other chunks carry no S*


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_saved_embedding_reproduces_the_injected_identity(comfyui, pack, emb_dir, kind):
    clip = clip_for(kind, emb_dir)
    g = torch.Generator().manual_seed(1)
    parts = {f"clip_{k}": torch.randn(2, word_embeddings(clip, k, [0]).shape[1], generator=g) * 0.1
             for k in KEYS[kind]}
    embeds = pack["identity"].IdentityEmbeds(parts=parts, info={"target": kind})
    out = pack["nodes"]["DreamID_SaveIDEmbedding"]().save(embeds, f"person {kind}!", True)
    token = out["result"][0]
    assert token == f"embedding:person_{kind}" and (emb_dir / f"person_{kind}.safetensors").is_file()
    same_conditioning(encode_plain(comfyui, clip, f"a photo of {token} in paris"),
                      inject(pack, clip, embeds, "a photo of S* in paris"))
    with pytest.raises(FileExistsError, match="overwrite"):
        pack["nodes"]["DreamID_SaveIDEmbedding"]().save(embeds, f"person {kind}!", False)


def test_width_mismatch_and_missing_trigger_are_explained(comfyui, pack, emb_dir):
    sd1, sd2 = clip_for("sd1", emb_dir), clip_for("sd2", emb_dir)
    sd1_identity = own_identity(pack, sd1, ["l"])
    with pytest.raises(pack["core"].IncompatibleEncoderError, match="made for \\['clip_l'\\].*has clip_h"):
        inject(pack, sd2, sd1_identity, "a photo of S*")
    narrow = pack["identity"].IdentityEmbeds(parts={"clip_l": torch.zeros(2, 32)}, info={"target": "sd1"})
    with pytest.raises(pack["core"].IncompatibleEncoderError, match="32 wide.*64 wide"):
        inject(pack, sd1, narrow, "a photo of S*")
    with pytest.raises(pack["core"].TriggerNotFoundError, match="a photo of a man.*does not contain the trigger"):
        inject(pack, sd1, sd1_identity, "a photo of a man")
    custom = inject(pack, sd1, sd1_identity, "a photo of sks person", trigger="sks")
    assert custom[0][0].shape == (1, 77, 64)


# -- photos through LoadIDEncoder + EncodeFace ---------------------------------------------------

@pytest.fixture(scope="session")
def encoder_file(comfyui, pack):
    core = pack["core"]
    torch.manual_seed(0)
    bb = core.BackboneConfig(width=32, depth=4, num_heads=4, num_features=16, patch_size=28)
    cfg = core.EncoderConfig(backbone=bb, target="sd1", token_widths=(("clip_l", 64),), tap_layers=(1, 2, 3, 4),
                             hidden_dim=32)
    path = comfyui.models_dir("dreamidentity") / "tiny_sd1.safetensors"
    core.save_encoder(core.IDEncoder(cfg), path)
    return path


def photo(name: str, box=None) -> torch.Tensor:
    if IMAGES is None:
        pytest.skip("insightface (sample photos) is not installed")
    im = Image.open(IMAGES / name).convert("RGB")
    if box:
        im = im.crop(box)
    return torch.from_numpy(np.asarray(im).astype(np.float32) / 255.0)[None]  # ComfyUI IMAGE [1, H, W, 3]


def test_encode_face_end_to_end(comfyui, pack, emb_dir, encoder_file):
    nodes = pack["nodes"]
    (bundle,) = nodes["DreamID_LoadIDEncoder"]().load(encoder_file.name, "mtcnn", "auto")
    assert bundle.patcher.load_device is not None and bundle.config.num_tokens == 2
    encode = nodes["DreamID_EncodeFace"]()
    embeds, crops, layout = encode.encode(bundle, photo("t1.jpg"), 1.0, "average", 0, "largest", "error")
    assert embeds.parts["clip_l"].shape == (2, 64) and crops.shape == (1, 112, 112, 3)
    assert 0 < layout["box"][0] < layout["box"][2] < 1 and len(layout["landmarks"]) == 5
    off, _, _ = encode.encode(bundle, photo("t1.jpg"), 0.0, "average", 0, "largest", "error")
    assert torch.count_nonzero(off.parts["clip_l"]) == 0
    other, _, _ = encode.encode(bundle, photo("t1.jpg"), 1.0, "average", 1, "largest", "error")
    assert not torch.allclose(other.parts["clip_l"], embeds.parts["clip_l"])  # another person, another S*
    cond = inject(pack, clip_for("sd1", emb_dir), embeds, "a photo of S*")
    assert cond[0][0].shape == (1, 77, 64)


def test_encode_face_no_face_error_and_skip(comfyui, pack, encoder_file):
    nodes = pack["nodes"]
    (bundle,) = nodes["DreamID_LoadIDEncoder"]().load(encoder_file.name, "mtcnn", "auto")
    encode = nodes["DreamID_EncodeFace"]()
    mask = photo("mask_white.jpg")
    with pytest.raises(pack["core"].FaceNotFoundError, match="No face found in image 0"):
        encode.encode(bundle, mask, 1.0, "average", 0, "largest", "error")
    face = photo("t1.jpg", (350, 150, 700, 500))  # 350x350 around one head
    batch = torch.cat([torch.nn.functional.interpolate(mask.permute(0, 3, 1, 2), size=(350, 350)).permute(0, 2, 3, 1),
                       face])
    embeds, crops, _ = encode.encode(bundle, batch, 1.0, "average", 0, "largest", "skip")
    assert crops.shape[0] == 1 and embeds.info["skipped"] == 1


def test_loader_errors_name_the_fix(comfyui, pack, encoder_file):
    load = pack["nodes"]["DreamID_LoadIDEncoder"]()
    with pytest.raises(pack["core"].ModelFilesError, match="antelopev2.*scrfd_10g_bnkps.onnx.*mtcnn"):
        load.load(encoder_file.name, "insightface/antelopev2", "cpu")
    bad = encoder_file.parent / "corrupt.safetensors"
    bad.write_bytes(encoder_file.read_bytes()[:500])
    with pytest.raises(pack["core"].WeightFormatError, match="corrupt.safetensors"):
        load.load(bad.name, "mtcnn", "auto")
    with pytest.raises(FileNotFoundError, match="not in"):
        load.load("missing.safetensors", "mtcnn", "auto")


def test_scene_position_applies_the_controlnet(comfyui, pack, tmp_path):
    import comfy.controlnet
    from comfy_tiny import write_tiny_controlnet

    control_net = comfy.controlnet.load_controlnet(str(write_tiny_controlnet(tmp_path / "cn.safetensors")))
    cond = [[torch.zeros(1, 77, 1024), {"pooled_output": None}]]
    layout = {"image_size": [400, 300], "landmarks": (pack["core"].align.ARCFACE_TEMPLATE_112 / [112, 112] *
                                                      [0.5, 0.5] + [0.25, 0.25]).tolist()}
    node = pack["nodes"]["DreamID_ScenePosition"]()
    pos, neg, image = node.apply(cond, cond, control_net, 256, 192, 0.3, 0.4, 0.25, 0.8, 0.0, 0.9, "openpose", layout)
    assert image.shape == (1, 192, 256, 3) and image.max() > 0.9
    for c in (pos, neg):
        cn = c[0][1]["control"]
        assert cn.strength == 0.8 and cn.timestep_percent_range == (0.0, 0.9)
        assert cn.cond_hint_original.shape == (1, 3, 192, 256)
    with pytest.raises(ValueError, match="entirely outside the 256x192 canvas"):
        node.apply(cond, cond, control_net, 256, 192, 1.5, 0.5, 0.2, 1.0, 0.0, 1.0, "keypoints_5", None)
