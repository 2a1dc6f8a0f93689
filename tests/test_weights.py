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
    load_arcface_backbone,
    load_encoder,
    read_encoder_config,
    save_encoder,
)
from dreamid_core.encoder.config import FORMAT_VERSION
from dreamid_core.encoder.weights import META_CONFIG, META_FORMAT
from dreamid_core.fileio import check_format_version

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
    with pytest.raises(WeightFormatError, match="only the projection.*backbone_name on DreamID_LoadIDEncoder.*--backbone"):
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


@pytest.mark.parametrize("protocol", [0, 1])
def test_old_protocol_pickle_renamed_safetensors_is_named_a_pickle(encoder, tmp_path, protocol):
    import pickle

    plain = tmp_path / f"p{protocol}.safetensors"
    plain.write_bytes(pickle.dumps({"weight": [1.0, 2.0], "name": "x"}, protocol=protocol))
    legacy = tmp_path / f"legacy{protocol}.safetensors"  # torch.save's pre-zip format
    torch.save({"w": torch.zeros(3)}, legacy, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    for path in (plain, legacy):
        with pytest.raises(WeightFormatError, match=r"is a Python pickle \(protocol 0/1.*never unpickles") as info:
            read_encoder_config(path)
        assert "truncated" not in str(info.value) and "download" not in str(info.value)
        with pytest.raises(WeightFormatError, match="pickle"):
            load_arcface_backbone(path)


def test_backbone_checkpoints_are_told_apart_by_their_headers(encoder, tmp_path):
    from dreamid_core.encoder.weights import is_backbone_checkpoint

    sd = encoder.backbone.state_dict()
    files = {"model.pt": lambda p: torch.save(sd, p),
             "ddp.pt": lambda p: torch.save({f"module.{k}": v for k, v in sd.items()}, p),
             "model.safetensors": lambda p: save_file(sd, str(p)),
             "prefixed.safetensors": lambda p: save_file({f"backbone.{k}": v for k, v in sd.items()}, str(p)),
             "legacy.pth": lambda p: torch.save(sd, p, _use_new_zipfile_serialization=False),
             "encoder.safetensors": lambda p: save_encoder(encoder, p),
             "projection.safetensors": lambda p: save_encoder(encoder, p, include_backbone=False),
             "embedding.safetensors": lambda p: save_file({"emb_params": torch.zeros(2, 8)}, str(p)),
             "embedding.pt": lambda p: torch.save({"string_to_param": {"*": torch.zeros(2, 8)}}, p),
             "patch_embed_like.safetensors": lambda p: save_file({"xpatch_embed.proj.weight": torch.zeros(1)}, str(p)),
             "garbage.safetensors": lambda p: p.write_bytes(b"\xff" * 64),
             "empty.pt": lambda p: p.write_bytes(b"")}
    for name, write in files.items():
        write(tmp_path / name)
    found = {name for name in files if is_backbone_checkpoint(tmp_path / name)}
    # a legacy (pre-zip) .pth cannot be read without unpickling, so it stays a candidate
    assert found == {"model.pt", "ddp.pt", "model.safetensors", "prefixed.safetensors", "legacy.pth"}
    for name in ("model.pt", "ddp.pt", "model.safetensors", "prefixed.safetensors", "legacy.pth"):
        assert load_arcface_backbone(tmp_path / name, BB).config == BB


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


@pytest.mark.parametrize("found", [None, "", "v2", "1.5", -1, True, 1.0])
def test_a_missing_or_non_integer_format_version_is_refused(found):
    with pytest.raises(WeightFormatError, match=r"enc\.safetensors: the encoder format_version is missing"):
        check_format_version(found, "enc.safetensors", "encoder", FORMAT_VERSION)


def test_format_version_up_to_the_supported_one_is_read():
    assert check_format_version("0", "old.safetensors", "encoder", FORMAT_VERSION) == 0  # files from before the metadata key
    assert check_format_version(FORMAT_VERSION, "enc.safetensors", "encoder", FORMAT_VERSION) == FORMAT_VERSION
    assert check_format_version(3, "id.safetensors", "identity", supported=3) == 3
    with pytest.raises(WeightFormatError, match=r"id\.safetensors: written in identity format version 4, .*up to 3"):
        check_format_version(4, "id.safetensors", "identity", supported=3)


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
