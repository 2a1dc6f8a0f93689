"""The five nodes inside a real ComfyUI (in-process, CPU), with tiny real CLIPs and real photos."""

from __future__ import annotations

import importlib.util
import json
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
    return {"nodes": nodes, "core": core, "identity": sys.modules[f"{root}.dreamid_core.identities.embeds"]}


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
    out = pack["nodes"]["DreamID_InjectIDTokens"]().encode(clip, embeds, text, trigger)
    return (out["result"] if isinstance(out, dict) else out)[0]


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
    with pytest.raises(pack["core"].IncompatibleEncoderError,
                       match="vectors for \\['clip_l'\\].*needs \\['clip_h'\\]") as info:
        inject(pack, sd2, sd1_identity, "a photo of S*")
    assert "clip_h text encoder has clip_h" not in str(info.value)  # said the same thing twice
    narrow = pack["identity"].IdentityEmbeds(parts={"clip_l": torch.zeros(2, 32)}, info={"target": "sd1"})
    with pytest.raises(pack["core"].IncompatibleEncoderError, match=r"(32 wide|\(2, 32\)).*64 wide"):
        inject(pack, sd1, narrow, "a photo of S*")
    with pytest.raises(pack["core"].TriggerNotFoundError, match="a photo of a man.*does not contain the trigger"):
        inject(pack, sd1, sd1_identity, "a photo of a man")
    custom = inject(pack, sd1, sd1_identity, "a photo of sks person", trigger="sks")
    # "sks" became the identity's vectors (here the word embeddings of "s", "*"): exactly the plain "S*"
    same_conditioning(custom, encode_plain(comfyui, sd1, "a photo of S* person"))
    assert not torch.equal(custom[0][0], encode_plain(comfyui, sd1, "a photo of sks person")[0][0])


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
    out = encode.encode(bundle, photo("t1.jpg"), 1.0, "average", 0, "largest", "error")
    embeds, crops, layout, report, *others = out["result"]
    assert others == [None, None, None, None]  # no second or third person asked for
    assert embeds.parts["clip_l"].shape == (2, 64) and crops.shape == (1, 112, 112, 3)
    assert 0 < layout["box"][0] < layout["box"][2] < 1 and len(layout["landmarks"]) == 5
    assert out["ui"]["text"] == [report] and report == "1 of 1 photo(s) encoded (image 0); 0 skipped."
    off = encode.encode(bundle, photo("t1.jpg"), 0.0, "average", 0, "largest", "error")["result"][0]
    assert off.parts["clip_l"].shape == (0, 64)  # strength 0: no vectors, the trigger drops out of the prompt
    assert torch.equal(inject(pack, clip_for("sd1", emb_dir), off, "a photo of S*, smiling")[0][0],
                       encode_plain(comfyui, clip_for("sd1", emb_dir), "a photo of , smiling")[0][0])
    other = encode.encode(bundle, photo("t1.jpg"), 1.0, "average", 1, "largest", "error")["result"][0]
    assert not torch.allclose(other.parts["clip_l"], embeds.parts["clip_l"])  # another person, another S*
    clip = clip_for("sd1", emb_dir)
    cond, plain = inject(pack, clip, embeds, "a photo of S*")[0][0], encode_plain(comfyui, clip, "a photo of S*")[0][0]
    assert cond.shape == plain.shape == (1, 77, 64)
    assert torch.equal(cond[:, :4], plain[:, :4])  # start + "a photo of": before S*, unchanged (causal encoder)
    assert not torch.allclose(cond[:, 4:], plain[:, 4:])  # the photo's S* was spliced in


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
    out = encode.encode(bundle, batch, 1.0, "average", 0, "largest", "skip")
    embeds, crops, _, report, *_ = out["result"]
    assert crops.shape[0] == 1 and embeds.info["skipped"] == 1
    # the skip is shown on the node and given to the graph, not only written to the server log
    assert out["ui"]["text"] == [report]
    assert report.startswith("1 of 2 photo(s) encoded (image 1); 1 skipped.\nskipped image 0: No face found in image 0")


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
    template = sys.modules[pack["core"].__name__ + ".faces.align"].ARCFACE_TEMPLATE_112
    layout = {"image_size": [400, 300], "landmarks": (template / [112, 112] *
                                                      [0.5, 0.5] + [0.25, 0.25]).tolist()}
    node = pack["nodes"]["DreamID_ScenePosition"]()
    pos, neg, image, mask, mask_2, mask_3 = node.apply(cond, cond, control_net, 256, 192, 0.3, 0.4, 0.25, 0.8, 0.0,
                                                        0.9, "openpose", layout)
    assert image.shape == (1, 192, 256, 3) and image.max() > 0.9
    assert mask[0, int(0.4 * 192), int(0.3 * 256)] == 1 and float(mask_2.max()) == float(mask_3.max()) == 0
    for c in (pos, neg):
        cn = c[0][1]["control"]
        assert cn.strength == 0.8 and cn.timestep_percent_range == (0.0, 0.9)
        assert cn.cond_hint_original.shape == (1, 3, 192, 256)
    with pytest.raises(ValueError, match="entirely outside the 256x192 canvas"):
        node.apply(cond, cond, control_net, 256, 192, 1.5, 0.5, 0.2, 1.0, 0.0, 1.0, "keypoints_5", None)


# -- inputs that arrive through the API unchecked --------------------------------------------------

def _call_with_defaults(cls, links: dict, **override):
    """Call a node with its widgets at their defaults (first choice for lists), ``links`` for the
    rest, and ``override`` on top."""
    kwargs = {}
    for section in ("required", "optional"):
        for name, spec in (cls.INPUT_TYPES().get(section) or {}).items():
            opts = spec[1] if len(spec) > 1 else {}
            if name in links:
                kwargs[name] = links[name]
            elif isinstance(spec[0], list):
                kwargs[name] = opts.get("default", spec[0][0])
            elif "default" in opts:
                kwargs[name] = opts["default"]
    kwargs.update(override)
    return getattr(cls(), cls.FUNCTION)(**kwargs)


@pytest.fixture
def node_links(pack, encoder_file):
    """Values for every non-widget input of the pack's nodes (enough to reach the input checks)."""
    (bundle,) = pack["nodes"]["DreamID_LoadIDEncoder"]().load(encoder_file.name, "mtcnn", "auto")
    cond = [[torch.zeros(1, 77, 1024), {"pooled_output": None}]]
    return {"DreamID_EncodeFace": {"encoder": bundle, "image": torch.rand(1, 64, 64, 3)},
            "DreamID_ScenePosition": {"positive": cond, "negative": cond, "control_net": None},
            "DreamID_HeadPlacement": {},
            # the finiteness check comes before the models are looked at
            "DreamID_LearnIdentity": {"model": None, "clip": None, "vae": None, "image": torch.rand(1, 64, 64, 3)}}


@pytest.mark.parametrize("bad,shown", [(float("nan"), "NaN"), (float("inf"), "inf"), (float("-inf"), "-inf")])
def test_every_float_input_refuses_nan_and_infinity(pack, node_links, bad, shown):
    # ComfyUI's min/max check lets NaN through (NaN < min is False): strength=NaN made a black image
    floats = sorted((node_id, name) for node_id, cls in pack["nodes"].items()
                    for section in cls.INPUT_TYPES().values() for name, spec in section.items() if spec[0] == "FLOAT")
    assert {node_id for node_id, _ in floats} <= set(node_links), "a node with FLOAT inputs is not tested here"
    assert ("DreamID_EncodeFace", "strength") in floats and ("DreamID_ScenePosition", "x") in floats
    for node_id, name in floats:
        with pytest.raises(ValueError, match=rf"^{node_id}: {name}={shown} is not a finite number"):
            _call_with_defaults(pack["nodes"][node_id], node_links[node_id], **{name: bad})


def test_scene_position_with_finite_inputs_passes_the_check(pack, node_links):
    # the same call with a finite x gets past the check and fails where it should: the head is off the canvas
    with pytest.raises(ValueError, match="entirely outside"):
        _call_with_defaults(pack["nodes"]["DreamID_ScenePosition"], node_links["DreamID_ScenePosition"], x=1.9,
                            head_size=0.1)


def test_blank_image_from_load_image_says_it_is_blank(comfyui, pack, encoder_file):
    if IMAGES is None:
        pytest.skip("insightface (sample photos) is not installed")
    grey = np.asarray(Image.open(IMAGES / "t1.jpg").convert("L"), dtype=np.uint16) * 257  # 16-bit greyscale
    Image.fromarray(grey).save(Path(comfyui.folder_paths.get_input_directory()) / "grey16.png")
    (image, _) = comfyui.nodes.LoadImage().load_image("grey16.png")
    (bundle,) = pack["nodes"]["DreamID_LoadIDEncoder"]().load(encoder_file.name, "mtcnn", "auto")
    encode = pack["nodes"]["DreamID_EncodeFace"]().encode
    blank = r"image 0 \(1280x\d+ px\): the image is blank.*16-bit"
    if float((image > 0.99).float().mean()) > 0.98:  # ComfyUI 0.3.x's PIL loader turns it (nearly) all white
        with pytest.raises(pack["core"].FaceNotFoundError, match=blank):
            encode(bundle, image, 1.0, "average", 0, "largest", "error")
    else:  # newer loaders (PyAV, ComfyUI 0.33) keep the picture: then the faces are found
        assert encode(bundle, image, 1.0, "average", 0, "largest", "error")["result"][0].num_tokens == 2
    with pytest.raises(pack["core"].FaceNotFoundError, match=blank):  # what that white image gives, either way
        encode(bundle, torch.ones_like(image), 1.0, "average", 0, "largest", "error")


# -- what the pack writes ------------------------------------------------------------------------

def test_saved_embedding_names_only_the_encoder_file(comfyui, pack, emb_dir, encoder_file):
    from safetensors import safe_open

    (bundle,) = pack["nodes"]["DreamID_LoadIDEncoder"]().load(encoder_file.name, "mtcnn", "auto")
    embeds = pack["nodes"]["DreamID_EncodeFace"]().encode(bundle, photo("t1.jpg"), 1.0, "average", 0, "largest",
                                                          "error")["result"][0]
    pack["nodes"]["DreamID_SaveIDEmbedding"]().save(embeds, "where_from", False)
    with safe_open(str(emb_dir / "where_from.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert "dreamid" not in meta  # one schema: the identity config, for every file the pack writes
    config = json.loads(meta["dreamid_identity"])
    assert config["init"] == "encoder" and config["target"] == "sd1" and config["layout"] == "words"
    assert config["extra"]["source"] == encoder_file.name == "tiny_sd1.safetensors"
    assert str(encoder_file.parent) not in json.dumps(meta) and str(comfyui.base) not in json.dumps(meta)


def test_embedding_names_in_any_script_but_never_a_device(comfyui, pack, emb_dir):
    clip = clip_for("sd2", emb_dir)
    parts = {"clip_h": torch.randn(2, word_embeddings(clip, "h", [0]).shape[1],
                                   generator=torch.Generator().manual_seed(3)) * 0.1}
    embeds = pack["identity"].IdentityEmbeds(parts=parts, info={"target": "sd2"})
    save = pack["nodes"]["DreamID_SaveIDEmbedding"]()
    token = save.save(embeds, "名前", False)["result"][0]
    assert token == "embedding:名前" and (emb_dir / "名前.safetensors").is_file()
    same_conditioning(encode_plain(comfyui, clip, f"a photo of {token} in paris"),
                      inject(pack, clip, embeds, "a photo of S* in paris"))  # ComfyUI finds the file by that name
    for device in ("CON", "nul", "Com1.txt", "lpt9.safetensors", "AUX"):
        with pytest.raises(ValueError, match="Windows device name"):
            save.save(embeds, device, False)
    with pytest.raises(ValueError, match="is a path"):
        save.save(embeds, "../outside", False)
    assert not (emb_dir.parent / "outside.safetensors").exists()


def test_backbone_list_holds_only_backbone_checkpoints(comfyui, pack, encoder_file):
    from safetensors.torch import save_file

    core, folder = pack["core"], encoder_file.parent
    load = pack["nodes"]["DreamID_LoadIDEncoder"]
    torch.manual_seed(2)
    bb = core.BackboneConfig(width=32, depth=4, num_heads=4, num_features=16, patch_size=28)
    cfg = core.EncoderConfig(backbone=bb, target="sd1", token_widths=(("clip_l", 64),), tap_layers=(1, 2, 3, 4),
                             hidden_dim=32)
    encoder = core.IDEncoder(cfg).eval()
    torch.save(encoder.backbone.state_dict(), folder / "arc_vit.pt")
    save_file({f"module.{k}": v for k, v in encoder.backbone.state_dict().items()}, str(folder / "arc_vit.safetensors"))
    core.save_encoder(encoder, folder / "projection_only.safetensors", include_backbone=False)
    save_file({"emb_params": torch.zeros(2, 64)}, str(folder / "ti_embedding.safetensors"))
    torch.save({"emb_params": torch.zeros(2, 64)}, folder / "ti_embedding.pt")
    (folder / "broken.safetensors").write_bytes(b"\x00" * 32)
    listed = load.INPUT_TYPES()["optional"]["backbone_name"][0]
    assert listed[0] == "(from encoder file)" and {"arc_vit.pt", "arc_vit.safetensors"} <= set(listed)
    assert not set(listed) & {encoder_file.name, "projection_only.safetensors", "ti_embedding.safetensors",
                              "ti_embedding.pt", "broken.safetensors"}, listed
    with pytest.raises(pack["core"].WeightFormatError, match="only the projection.*as backbone_name on"):
        load().load("projection_only.safetensors", "mtcnn", "auto")
    for name in ("arc_vit.pt", "arc_vit.safetensors"):
        (bundle,) = load().load("projection_only.safetensors", "mtcnn", "auto", name)
        faces = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            assert torch.equal(bundle.patcher.model(faces), encoder(faces))


def test_templates_list_the_node_outputs(pack):
    # saved workflows link outputs by slot index: a template's output list must match the node's
    for path in sorted((PACK / "workflows").glob("*.json")):
        for node in json.loads(path.read_text(encoding="utf-8"))["nodes"]:
            cls = pack["nodes"].get(node["type"])
            if cls is None:
                continue
            names = list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)
            assert [o["name"] for o in node["outputs"]] == names, f"{path.name}: node {node['id']}"
            assert [o["type"] for o in node["outputs"]] == list(cls.RETURN_TYPES), f"{path.name}: node {node['id']}"
