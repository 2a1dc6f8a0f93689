"""The M² encoder: shapes per target, strength, determinism, combining several photos."""

from __future__ import annotations

import pytest
import torch

from dreamid_core import BackboneConfig, EncoderConfig, IDEncoder, WeightFormatError

TINY_BB = BackboneConfig(width=32, depth=12, num_heads=4, num_features=16, patch_size=28)


def make(target: str, seed: int = 0, **kw) -> IDEncoder:
    torch.manual_seed(seed)
    return IDEncoder(EncoderConfig.for_target(target, TINY_BB, hidden_dim=48, **kw)).eval()


@pytest.mark.parametrize("target,widths", [("sd1", {"clip_l": 768}), ("sd2", {"clip_h": 1024}),
                                            ("sdxl", {"clip_l": 768, "clip_g": 1280})])
def test_output_shapes_per_text_encoder(target, widths):
    enc = make(target)
    faces = torch.rand(3, 3, 112, 112)
    with torch.no_grad():
        s = enc(faces)
    assert s.shape == (3, 2, sum(widths.values()))
    parts = enc.split(s)
    assert {k: tuple(v.shape) for k, v in parts.items()} == {k: (3, 2, w) for k, w in widths.items()}
    assert enc.config.tap_layers == (3, 6, 9, 12) and enc.config.in_dim == 4 * 32 + 16


def test_k_is_configurable():
    enc = make("sd2", num_tokens=3)
    with torch.no_grad():
        assert enc(torch.rand(1, 3, 112, 112)).shape == (1, 3, 1024)


def test_scale_zero_turns_identity_off_and_scale_is_linear():
    enc = make("sd1")
    faces = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        full = enc(faces, scale=1.0)
        assert torch.count_nonzero(enc(faces, scale=0.0)) == 0
        torch.testing.assert_close(enc(faces, scale=0.5), full * 0.5)
    assert full.abs().sum() > 0


def test_deterministic_and_face_dependent():
    a, b = make("sd2", seed=3), make("sd2", seed=3)
    faces = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(faces), b(faces))
        assert torch.equal(a(faces), a(faces))
        s = a(faces)
    assert not torch.allclose(s[0], s[1]), "different faces must give different S*"


def test_combine_modes():
    enc = make("sd2")
    faces = torch.rand(3, 3, 112, 112)
    with torch.no_grad():
        per_photo = enc(faces)
        torch.testing.assert_close(enc.encode(faces, combine="average"), per_photo.mean(0))
        torch.testing.assert_close(enc.encode(faces, combine="first"), per_photo[0])
        v = enc.features(faces).mean(0, keepdim=True)
        torch.testing.assert_close(enc.encode(faces, combine="average_features"), enc.project(v)[0])
    with pytest.raises(ValueError, match="combine must be one of"):
        enc.encode(faces, combine="median")


def test_backbone_stays_in_eval_mode_when_training():
    enc = make("sd2").train()
    assert enc.training and not enc.backbone.training
    enc.freeze_backbone()
    assert all(not p.requires_grad for p in enc.backbone.parameters())
    assert all(p.requires_grad for p in enc.projections.parameters())


def test_config_round_trip_and_validation():
    cfg = EncoderConfig.for_target("sdxl", BackboneConfig.preset("vit_b"))
    assert cfg.tap_layers == (6, 12, 18, 24)
    assert EncoderConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match=r"tap_layers \[13\] outside 1..12"):
        EncoderConfig(tap_layers=(3, 13))
    with pytest.raises(ValueError, match="unknown target 'sd3'"):
        EncoderConfig.for_target("sd3")
    newer = cfg.to_dict() | {"format_version": 99}
    with pytest.raises(WeightFormatError, match="format version 99.*Update the pack"):
        EncoderConfig.from_dict(newer)
    with pytest.raises(WeightFormatError, match=r"unknown config fields \['gate'\]"):
        EncoderConfig.from_dict(cfg.to_dict() | {"gate": 1})
