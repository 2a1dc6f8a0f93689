"""The weights file: exact round trip, rebuilt from metadata alone, and every bad file refused clearly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreamid_core import (
    BackboneConfig,
    EncoderConfig,
    IDEncoder,
    WeightFormatError,
    load_encoder,
    read_encoder_config,
    save_encoder,
)
from dreamid_core.weights import META_CONFIG, META_FORMAT

BB = BackboneConfig(width=32, depth=4, num_heads=4, num_features=16, patch_size=28)


@pytest.fixture
def encoder() -> IDEncoder:
    torch.manual_seed(0)
    enc = IDEncoder(EncoderConfig.for_target("sdxl", BB, hidden_dim=40)).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as a trained backbone has
        enc.backbone.feature[1].running_mean.normal_()
        enc.backbone.feature[3].running_var.uniform_(0.5, 2.0)
    return enc


def test_save_load_is_bit_exact_and_rebuilds_from_metadata(encoder, tmp_path):
    path = save_encoder(encoder, tmp_path / "enc.safetensors", provenance={"steps": 123, "base": "sd2.1"})
    config, provenance, contents = read_encoder_config(path)
    assert config == encoder.config and provenance == {"steps": 123, "base": "sd2.1"}
    assert contents == "projection+backbone"
    loaded = load_encoder(path)
    faces = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(faces), encoder(faces))
    assert loaded.provenance["steps"] == 123


def test_projection_only_file_needs_the_backbone(encoder, tmp_path):
    path = save_encoder(encoder, tmp_path / "proj.safetensors", include_backbone=False)
    assert not any(k.startswith("backbone.") for k in load_file(str(path)))
    with pytest.raises(WeightFormatError, match="only the projection.*backbone_path"):
        load_encoder(path)
    bb_path = tmp_path / "model.pt"
    torch.save(encoder.backbone.state_dict(), bb_path)
    loaded = load_encoder(path, backbone_path=bb_path)
    faces = torch.rand(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(loaded(faces), encoder(faces))


def test_corrupt_file(encoder, tmp_path):
    path = save_encoder(encoder, tmp_path / "enc.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # truncated download
    with pytest.raises(WeightFormatError, match=r"enc.safetensors.*(corrupt|truncated)"):
        load_encoder(path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    with pytest.raises(WeightFormatError, match="garbage.safetensors"):
        load_encoder(garbage)


def test_pickle_renamed_safetensors_is_refused_without_unpickling(encoder, tmp_path):
    path = tmp_path / "sneaky.safetensors"
    torch.save(encoder.state_dict(), path)  # a torch zip pickle with the wrong extension
    with pytest.raises(WeightFormatError, match="pickle.*never unpickles"):
        load_encoder(path)
    import pickle

    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(WeightFormatError, match="Python pickle"):
        read_encoder_config(plain)


def _rewrite_metadata(path, **changes):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = dict(fh.metadata())
    meta.update(changes)
    save_file(load_file(str(path)), str(path), metadata=meta)


def test_newer_format_version_is_refused(encoder, tmp_path):
    path = save_encoder(encoder, tmp_path / "enc.safetensors")
    _rewrite_metadata(path, **{META_FORMAT: "7"})
    with pytest.raises(WeightFormatError, match="format version 7.*reads up to 1.*Update the pack"):
        load_encoder(path)


def test_widths_disagreeing_with_metadata(encoder, tmp_path):
    path = save_encoder(encoder, tmp_path / "enc.safetensors")
    cfg = json.loads(EncoderConfig.for_target("sd1", BB, hidden_dim=40).to_json())  # says 768, tensors are 2048
    _rewrite_metadata(path, **{META_CONFIG: json.dumps(cfg)})
    with pytest.raises(WeightFormatError, match=r"disagree with the metadata's widths.*projections\.0\.out\.weight"):
        load_encoder(path)


def test_missing_tensor_is_named(encoder, tmp_path):
    path = save_encoder(encoder, tmp_path / "enc.safetensors")
    tensors = load_file(str(path))
    del tensors["projections.1.fc1.weight"]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = dict(fh.metadata())
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(WeightFormatError, match=r"missing.*projections\.1\.fc1\.weight"):
        load_encoder(path)


def test_textual_inversion_file_is_not_an_encoder(tmp_path):
    path = tmp_path / "ti.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, str(path))
    with pytest.raises(WeightFormatError, match="not a DreamIdentity encoder.*textual-inversion"):
        load_encoder(path)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_encoder(tmp_path / "nope.safetensors")


def test_save_is_atomic_and_needs_safetensors_suffix(encoder, tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        save_encoder(encoder, tmp_path / "enc.pt")
    save_encoder(encoder, tmp_path / "enc.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["enc.safetensors"]  # no temp files left behind
