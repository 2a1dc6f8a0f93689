"""FaceViT loads arcface_torch checkpoints as published and returns the taps explicitly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dreamid_core import BackboneConfig, FaceViT, WeightFormatError, load_arcface_backbone
from dreamid_core.encoder.weights import backbone_config_from_state_dict


def arcface_state_dict(width: int, depth: int, patch: int = 9, image: int = 112, feats: int = 512,
                       cls: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Key names and shapes written out from arcface_torch's VisionTransformer, random values."""
    g = torch.Generator().manual_seed(seed)
    n = (image // patch) ** 2
    r = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    sd = {"pos_embed": r(1, n + int(cls), width), "mask_token": r(1, 1, width),
          "patch_embed.proj.weight": r(width, 3, patch, patch), "patch_embed.proj.bias": r(width)}
    if cls:
        sd["cls_token"] = r(1, 1, width)
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(width), p + "norm1.bias": r(width),
                   p + "attn.qkv.weight": r(3 * width, width),
                   p + "attn.proj.weight": r(width, width), p + "attn.proj.bias": r(width),
                   p + "norm2.weight": 1 + r(width), p + "norm2.bias": r(width),
                   p + "mlp.fc1.weight": r(4 * width, width), p + "mlp.fc1.bias": r(4 * width),
                   p + "mlp.fc2.weight": r(width, 4 * width), p + "mlp.fc2.bias": r(width)})
    sd.update({"norm.weight": 1 + r(width), "norm.bias": r(width),
               "feature.0.weight": r(width, width if cls else width * n)})
    for idx, dim in ((1, width), (3, feats)):
        sd.update({f"feature.{idx}.weight": 1 + r(dim), f"feature.{idx}.bias": r(dim),
                   f"feature.{idx}.running_mean": r(dim), f"feature.{idx}.running_var": 1 + r(dim).abs(),
                   f"feature.{idx}.num_batches_tracked": torch.tensor(7)})
    sd["feature.2.weight"] = r(feats, width)
    return sd


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, depth: int, heads: int = 8):
    """arcface_torch's forward written out with explicit attention, for comparison. Returns the
    per-layer token means, the per-layer CLS tokens (None without one) and the identity."""
    cls = "cls_token" in sd
    x = (x - 0.5) / 0.5
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                 stride=sd["patch_embed.proj.weight"].shape[-1])
    t = t.flatten(2).transpose(1, 2)
    if cls:
        t = torch.cat([sd["cls_token"].expand(t.shape[0], -1, -1), t], dim=1)
    t = t + sd["pos_embed"]
    b, n, d = t.shape
    means, cls_tokens = [], []
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(t, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        qkv = (h @ sd[p + "attn.qkv.weight"].T).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1)
        a = (attn @ qkv[2]).transpose(1, 2).reshape(b, n, d) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        t = t + a
        h = F.layer_norm(t, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        h = F.relu6(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]) @ sd[p + "mlp.fc2.weight"].T
        t = t + h + sd[p + "mlp.fc2.bias"]
        means.append(t.mean(1))
        cls_tokens.append(t[:, 0])
    t = F.layer_norm(t, (d,), sd["norm.weight"], sd["norm.bias"])
    t = t[:, 0] if cls else t.reshape(b, -1)

    def bn(v, i):
        return F.batch_norm(v, sd[f"feature.{i}.running_mean"], sd[f"feature.{i}.running_var"],
                            sd[f"feature.{i}.weight"], sd[f"feature.{i}.bias"], False, 0.0, 2e-5)

    ident = bn(bn(t @ sd["feature.0.weight"].T, 1) @ sd["feature.2.weight"].T, 3)
    return means, cls_tokens if cls else None, ident


def test_published_vit_shapes_match_arcface_names():
    for name, (width, depth) in {"vit_t": (256, 12), "vit_s": (512, 12), "vit_b": (512, 24), "vit_l": (768, 24)}.items():
        with torch.device("meta"):
            ours = FaceViT(BackboneConfig.preset(name)).state_dict()
            theirs = arcface_state_dict(width, depth)
        assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}, name


def test_loads_arcface_checkpoint_and_matches_reference_forward(tmp_path):
    sd = arcface_state_dict(width=64, depth=12, feats=32)
    path = tmp_path / "model.pt"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)  # DDP-style prefix, as some releases have
    model = load_arcface_backbone(path)
    assert model.config.width == 64 and model.config.depth == 12 and model.config.num_features == 32
    assert model.config.patch_size == 9 and model.config.num_patches == 144 and not model.config.cls_token
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
        means, _, ident = reference_forward(sd, x, depth=12)
    assert out.taps.shape == (2, 4, 64) and out.identity.shape == (2, 32)
    for i, layer in enumerate((3, 6, 9, 12)):
        torch.testing.assert_close(out.taps[:, i], means[layer - 1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.identity, ident, rtol=1e-4, atol=1e-4)


def test_custom_tap_layers_are_returned_in_request_order():
    torch.manual_seed(0)
    model = FaceViT(BackboneConfig(width=32, depth=6, num_heads=4, num_features=16, patch_size=28)).eval()
    x = torch.rand(1, 3, 112, 112)
    with torch.no_grad():
        a = model(x, taps=(2, 5)).taps
        b = model(x, taps=(5, 2)).taps
    torch.testing.assert_close(a[:, 0], b[:, 1])
    with pytest.raises(ValueError, match="outside 1..6"):
        model(x, taps=(7,))


def test_cls_variant_summary_is_the_cls_token(tmp_path):
    sd = arcface_state_dict(width=32, depth=4, patch=8, feats=16, cls=True)
    path = tmp_path / "cls.safetensors"
    from safetensors.torch import save_file

    save_file(sd, str(path))
    model = load_arcface_backbone(path)
    assert model.config.cls_token and model.config.patch_size == 8 and model.config.num_patches == 196
    x = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(x, taps=(1, 2, 3, 4))
        means, cls_tokens, ident = reference_forward(sd, x, depth=4, heads=model.config.num_heads)
    assert out.taps.shape == (3, 4, 32) and out.identity.shape == (3, 16)
    for i in range(4):
        torch.testing.assert_close(out.taps[:, i], cls_tokens[i], rtol=1e-4, atol=1e-5)  # the CLS token itself
        assert not torch.allclose(out.taps[:, i], means[i], atol=1e-3)  # ... not the mean of the tokens
    torch.testing.assert_close(out.identity, ident, rtol=1e-4, atol=1e-4)  # the head reads the CLS token
    assert not torch.allclose(out.taps[0], out.taps[1], atol=1e-3)  # and it depends on the face


def test_wrong_input_size_names_the_shape():
    model = FaceViT(BackboneConfig(width=32, depth=2, num_heads=4, num_features=8, patch_size=28))
    with pytest.raises(ValueError, match=r"\[B, 3, 112, 112\].*\(1, 3, 64, 64\)"):
        model(torch.rand(1, 3, 64, 64))


def test_pickled_module_is_refused(tmp_path):
    model = FaceViT(BackboneConfig(width=32, depth=2, num_heads=4, num_features=8, patch_size=28))
    path = tmp_path / "whole_model.pt"
    torch.save(model, path)  # a whole pickled module, not a state dict
    with pytest.raises(WeightFormatError, match="weights_only=True"):
        load_arcface_backbone(path)


def test_not_a_vit_checkpoint_names_expected_keys(tmp_path):
    path = tmp_path / "r50.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(WeightFormatError, match="patch_embed.proj.weight"):
        load_arcface_backbone(path)


def test_config_from_state_dict_rejects_inconsistent_positions():
    sd = arcface_state_dict(width=32, depth=2, feats=8)
    sd["pos_embed"] = torch.zeros(1, 100, 32)
    with pytest.raises(WeightFormatError, match="100 positions"):
        backbone_config_from_state_dict(sd)
    assert math.isclose(backbone_config_from_state_dict(arcface_state_dict(32, 2, feats=8)).mlp_ratio, 4.0)
