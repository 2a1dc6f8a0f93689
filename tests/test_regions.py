"""Identity regions (issue: two people in one image): the maths without ComfyUI, then the node and its
patch on a tiny real SD2 checkpoint in ComfyUI, sampled with KSampler."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from dreamid_core.identities.regions import (
    RegionError,
    attention_probs,
    biased_attention,
    check_aspect,
    check_region_mask,
    mask_on_grid,
    region_bias,
)

PACK = Path(__file__).resolve().parents[1]


def halves(h=64, w=64):
    left = torch.zeros(h, w)
    left[:, : w // 2] = 1
    return left, 1 - left


def test_bias_is_zero_inside_log_floor_outside_and_only_on_identity_tokens():
    left, right = halves()
    bias = region_bias([left, right], [[1, 2], [5]], context_len=8, grid=(4, 4))
    grid = bias.reshape(4, 4, 8)
    assert torch.equal(grid[:, :2, 1:3], torch.zeros(4, 2, 2))  # A inside its region
    assert torch.allclose(grid[:, 2:, 1:3], torch.full((4, 2, 2), math.log(1e-6)))
    assert torch.allclose(grid[:, :2, 5], torch.full((4, 2), math.log(1e-6))) and torch.equal(grid[:, 2:, 5],
                                                                                            torch.zeros(4, 2))
    assert torch.equal(bias[:, [0, 3, 4, 6, 7]], torch.zeros(16, 5))  # the scene's tokens stay global


def test_soft_edges_scale_attention_by_the_mask_fraction():
    mask = torch.zeros(8, 8)
    mask[:, :3] = 1  # grid 2x2: left cells 3/4 covered
    assert torch.allclose(mask_on_grid(mask, (2, 2)), torch.tensor([0.75, 0.0, 0.75, 0.0]))


def test_biased_attention_equals_the_reference_softmax():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 32, generator=g) for _ in range(3))
    left, _ = halves(8, 8)
    bias = region_bias([left], [[3]], 16, (4, 4))
    out = biased_attention(q, k, v, 4, bias)
    probs = attention_probs(q, k, 4, bias)  # [B, heads, Nq, Nk]
    ref = torch.einsum("bhij,bhjd->bhid", probs, v.reshape(2, 16, 4, 8).permute(0, 2, 1, 3))
    assert torch.allclose(out, ref.permute(0, 2, 1, 3).reshape(2, 16, 32), atol=1e-5)
    outside = probs.reshape(2, 4, 4, 4, 16)[:, :, :, 2:, 3]  # token 3 at pixels of the right half
    assert float(outside.max()) < 1e-4


def test_bad_masks_are_explained():
    with pytest.raises(RegionError, match="empty"):
        check_region_mask(torch.zeros(64, 64))
    with pytest.raises(RegionError, match="one mask"):
        check_region_mask(torch.ones(2, 64, 64))
    with pytest.raises(RegionError, match="512x256 but the image being generated is 512x512"):
        check_aspect(torch.ones(256, 512), (64, 64))
    check_aspect(torch.ones(1024, 1024), (64, 64))  # any size of the same aspect is fine


# ---- in ComfyUI -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(comfyui):
    from comfy_env import load_pack
    from comfy_tiny import server_sd2_clip, write_tiny_sd2_checkpoint

    nodes = load_pack(comfyui.nodes, PACK)
    root = nodes["DreamID_EncodeFace"].__module__.split(".nodes.")[0]
    write_tiny_sd2_checkpoint(comfyui.models_dir("checkpoints") / "regions_sd2.safetensors")
    model, _, _ = comfyui.nodes.CheckpointLoaderSimple().load_checkpoint("regions_sd2.safetensors")
    clip = server_sd2_clip(dtype=torch.float32)
    identity = sys.modules[f"{root}.dreamid_core.identities.embeds"]
    g = torch.Generator().manual_seed(3)

    def person(scale=0.5):
        return identity.IdentityEmbeds(parts={"clip_h": torch.randn(2, 1024, generator=g) * scale}, info={})

    return {"nodes": nodes, "comfy": comfyui.nodes, "model": model, "clip": clip, "person": person,
            "patch_cls": sys.modules[f"{root}.nodes.region_nodes"].RegionPatch}


PROMPT = "a photo of S1* and S2* in a cafe"


def sample(setup, model, positive, seed=1):
    comfy = setup["comfy"]
    negative = comfy.CLIPTextEncode().encode(setup["clip"], "")[0]
    latent = comfy.EmptyLatentImage().generate(64, 64, 1)[0]
    with torch.inference_mode():
        return comfy.KSampler().sample(model, seed, 2, 4.0, "euler", "normal", positive, negative, latent)[0]["samples"]


def regions(setup, a, b, mask_a=None, mask_b=None, model=None, text=PROMPT):
    node = setup["nodes"]["DreamID_IdentityRegions"]()
    return node.apply(model or setup["model"], setup["clip"], text, a, "S1*", mask_a, id_embeds_2=b, trigger_2="S2*",
                      mask_2=mask_b)


@pytest.mark.comfyui
def test_each_identity_attends_only_inside_its_region(setup):
    a, b = setup["person"](), setup["person"]()
    left, right = halves(64, 64)
    model, positive = regions(setup, a, b, left, right)
    patches = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    patch = next(iter(patches.values()))
    assert isinstance(patch, setup["patch_cls"]) and "attn2" not in setup["model"].model_options.get(
        "transformer_options", {}).get("patches_replace", {})  # the input MODEL is untouched
    patch.record = []
    sample(setup, model, positive)
    assert patch.record, "the region patch never ran on a positive chunk"
    pos_a, pos_b = patch.positions
    for _, probs, (h, w) in patch.record:
        maps = probs.reshape(*probs.shape[:2], h, w, probs.shape[-1])
        out_a = maps[..., :, w // 2:, :][..., pos_a]  # A's tokens at pixels of B's half
        out_b = maps[..., :, : w // 2, :][..., pos_b]
        in_a = maps[..., :, : w // 2, :][..., pos_a]
        assert float(out_a.max()) < 1e-5 and float(out_b.max()) < 1e-5
        assert float(in_a.mean()) > 1e-3  # and they do attend inside their own region


@pytest.mark.comfyui
def test_both_identities_change_the_image_and_full_regions_change_nothing(setup):
    a, b, c = setup["person"](), setup["person"](), setup["person"]()
    left, right = halves(64, 64)
    base_model, base_pos = regions(setup, a, b, left, right)
    base = sample(setup, base_model, base_pos)
    other_a = sample(setup, *regions(setup, c, b, left, right))
    other_b = sample(setup, *regions(setup, a, c, left, right))
    assert not torch.allclose(base, other_a) and not torch.allclose(base, other_b)
    # a region covering the whole canvas is no restriction: same as the unpatched model with the same prompt
    full = torch.ones(64, 64)
    model, positive = regions(setup, a, b, full, full)
    inject = setup["nodes"]["DreamID_InjectIDTokens"]().encode(setup["clip"], a, PROMPT, "S1*", id_embeds_2=b,
                                                                trigger_2="S2*")["result"][0]
    assert torch.equal(positive[0][0], inject[0][0])
    assert torch.allclose(sample(setup, model, positive), sample(setup, setup["model"], inject), rtol=1e-5, atol=1e-3)


@pytest.mark.comfyui
def test_region_errors(setup):
    a, b = setup["person"](), setup["person"]()
    node = setup["nodes"]["DreamID_IdentityRegions"]()
    with pytest.raises(ValueError, match="same trigger"):
        node.apply(setup["model"], setup["clip"], "S1* and s1*", a, "S1*", None, id_embeds_2=b, trigger_2="s1*")
    with pytest.raises(ValueError, match="empty"):
        regions(setup, a, b, torch.zeros(1, 64, 64), None)
    with pytest.raises(ValueError, match="mask_2 is connected but id_embeds_2 is not"):
        node.apply(setup["model"], setup["clip"], "S1*", a, "S1*", None, mask_2=torch.ones(1, 64, 64))
    model, positive = regions(setup, a, b, torch.ones(1, 32, 64), None)  # 2:1 mask for a square image
    with pytest.raises(ValueError, match="64x32 but the image being generated is 64x64"):
        sample(setup, model, positive)


# ---- several people from one photo, several heads on one canvas ------------------------------------


@pytest.fixture(scope="module")
def encoder_bundle(comfyui, setup):
    from dreamid_core import BackboneConfig, EncoderConfig, IDEncoder, save_encoder

    torch.manual_seed(0)
    bb = BackboneConfig(width=32, depth=4, num_heads=4, num_features=16, patch_size=28)
    cfg = EncoderConfig(backbone=bb, target="sd2", token_widths=(("clip_h", 1024),), tap_layers=(1, 2, 3, 4),
                        hidden_dim=32)
    save_encoder(IDEncoder(cfg), comfyui.models_dir("dreamidentity") / "regions_sd2.safetensors")
    return setup["nodes"]["DreamID_LoadIDEncoder"]().load("regions_sd2.safetensors", "mtcnn", "cpu")[0]


def group_photo():
    import importlib.util

    import numpy as np
    from PIL import Image

    spec = importlib.util.find_spec("insightface")
    if spec is None or spec.origin is None:
        pytest.skip("insightface (sample photos) is not installed")
    im = Image.open(Path(spec.origin).parent / "data" / "images" / "t1.jpg").convert("RGB")
    return torch.from_numpy(np.asarray(im).astype(np.float32) / 255.0)[None]


@pytest.mark.comfyui
def test_two_people_from_one_group_photo(setup, encoder_bundle):
    encode = setup["nodes"]["DreamID_EncodeFace"]().encode
    photo = group_photo()
    both = encode(encoder_bundle, photo, 1.0, "average", 0, "largest", "error", face_index_2=1)["result"]
    one = encode(encoder_bundle, photo, 1.0, "average", 1, "largest", "error")["result"]
    assert torch.equal(both[4].parts["clip_h"], one[0].parts["clip_h"])  # person 2 = face 1 on its own
    assert not torch.equal(both[0].parts["clip_h"], both[4].parts["clip_h"])
    assert both[5] == one[2] and both[6] is None and both[7] is None  # layouts; person 3 off
    with pytest.raises(ValueError, match=r"person 2 \(face_index_2 = 9\).*6 face\(s\) were found"):
        encode(encoder_bundle, photo, 1.0, "average", 0, "largest", "error", face_index_2=9)
    with pytest.raises(ValueError, match="same face twice"):
        encode(encoder_bundle, photo, 1.0, "average", 1, "largest", "error", face_index_2=1)


@pytest.mark.comfyui
def test_head_placement_draws_every_head_and_masks_each(setup):
    place = setup["nodes"]["DreamID_HeadPlacement"]().place
    image, m1, m2, m3 = place(256, 128, 0.25, 0.5, 0.4, "openpose", None, x_2=0.75, y_2=0.5, head_size_2=0.4)
    assert image.shape == (1, 128, 256, 3) and m1.shape == m2.shape == m3.shape == (1, 128, 256)
    left, right = image[0, :, :128].amax(), image[0, :, 128:].amax()
    assert left > 0.5 and right > 0.5  # a head drawn on each side
    assert m1[0, 64, 64] == 1 and m1[0, 64, 192] == 0 and m2[0, 64, 192] == 1 and m2[0, 64, 64] == 0
    assert float(m3.max()) == 0  # no third head
    single, *_ = place(256, 128, 0.25, 0.5, 0.4, "openpose", None)
    assert float(single[0, :, 128:].max()) == 0
    with pytest.raises(ValueError, match="x_2=NaN is not a finite number"):
        place(256, 128, 0.25, 0.5, 0.4, "openpose", None, x_2=float("nan"), y_2=0.5, head_size_2=0.4)


@pytest.mark.comfyui
def test_regions_node_runs_with_its_own_defaults(setup):
    """Its default prompt holds its default triggers, so the node works unedited with two people."""
    spec = setup["nodes"]["DreamID_IdentityRegions"].INPUT_TYPES()
    text = spec["required"]["text"][1]["default"]
    t1, t2 = spec["required"]["trigger"][1]["default"], spec["optional"]["trigger_2"][1]["default"]
    model, positive = regions(setup, setup["person"](), setup["person"](), *halves(64, 64), text=text)
    assert t1 in text and t2 in text and positive[0][0].shape[1] == 77
    assert sample(setup, model, positive).shape == (1, 4, 8, 8)
