"""dreamid_core.identities.learned_identity: the identity container, its file, and plain textual-inversion files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dreamid_core.errors import WeightFormatError
from dreamid_core.identities.learned_identity import (
    IDENTITY_FORMAT_VERSION,
    META_KEY,
    IdentityConfig,
    LearnedIdentity,
    load_learned_identity,
    save_learned_identity,
    write_embedding,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def words(widths=(("clip_h", 1024),), k=2, seed=0):
    g = _gen(seed)
    return {key: torch.randn(k, w, generator=g) for key, w in widths}


def test_words_round_trip_is_a_standard_ti_file(tmp_path):
    parts = words()
    ident = LearnedIdentity.words(parts, IdentityConfig(target="sd2", steps=40, init="encoder", seed=3))
    path = save_learned_identity(tmp_path / "me", ident)
    assert path.name == "me.safetensors"
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["emb_params"]  # what ComfyUI's embedding:NAME reads
        meta = json.loads(f.metadata()[META_KEY])
    assert meta["steps"] == 40 and meta["layout"] == "words"
    back = load_learned_identity(path)
    assert back.config == ident.config
    assert torch.equal(back.tensors["clip_h"], parts["clip_h"])
    assert torch.equal(back.to_embeds().parts["clip_h"], parts["clip_h"])


def test_per_stage_round_trip_and_stage_vectors(tmp_path):
    parts = words((("clip_l", 768), ("clip_g", 1280)))
    cfg = IdentityConfig(layout="per_stage", num_stages=4, target="sdxl")
    ident = LearnedIdentity.per_stage_from_words(parts, cfg)
    assert ident.tensors["clip_g"].shape == (4, 2, 2, 1280)
    for s in range(4):
        for kv in ("key", "value", 0, 1):
            vec = ident.stage_vectors(s, kv)
            assert all(torch.equal(vec[k], parts[k]) for k in parts)
    ident.tensors["clip_l"][2, 1] += 1.0  # stage 2's value differs from its key now
    path = save_learned_identity(tmp_path / "staged.safetensors", ident)
    back = load_learned_identity(path)
    assert back.layout == "per_stage" and back.config.num_stages == 4
    assert torch.equal(back.stage_vectors(2, "value")["clip_l"], parts["clip_l"] + 1.0)
    assert torch.equal(back.stage_vectors(2, "key")["clip_l"], parts["clip_l"])
    with pytest.raises(ValueError, match="per_stage"):
        back.to_embeds()
    with pytest.raises(ValueError, match="out of range"):
        back.stage_vectors(4, "key")


def test_save_refuses_to_overwrite(tmp_path):
    ident = LearnedIdentity.words(words())
    save_learned_identity(tmp_path / "a", ident)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_learned_identity(tmp_path / "a", ident)
    save_learned_identity(tmp_path / "a", ident, overwrite=True)


def test_files_from_save_id_embedding_load_with_their_target(tmp_path):
    parts = words((("clip_l", 768), ("clip_g", 1280)), k=3)
    path = write_embedding(tmp_path / "enc", parts, metadata={"target": "sdxl"})
    back = load_learned_identity(path)
    assert back.layout == "words" and back.num_tokens == 3 and back.config.target == "sdxl"
    assert back.config.init == "encoder"  # where its vectors came from (written by the one identity writer)
    assert all(torch.equal(back.tensors[k], parts[k]) for k in parts)


def test_single_tensor_files_need_a_key_when_the_width_says_nothing(tmp_path):
    t = torch.randn(2, 96, generator=_gen())
    save_file({"emb_params": t}, str(tmp_path / "tiny.safetensors"))
    with pytest.raises(WeightFormatError, match="single_key"):
        load_learned_identity(tmp_path / "tiny.safetensors")
    back = load_learned_identity(tmp_path / "tiny.safetensors", single_key="clip_h")
    assert torch.equal(back.tensors["clip_h"], t)
    save_file({"emb_params": torch.randn(1, 768, generator=_gen())}, str(tmp_path / "sd1.safetensors"))
    assert set(load_learned_identity(tmp_path / "sd1.safetensors").tensors) == {"clip_l"}


def test_a1111_pt_and_diffusers_learned_embeds(tmp_path):
    t = torch.randn(3, 768, generator=_gen(1))
    torch.save({"string_to_param": {"*": t}, "name": "x", "step": 500}, tmp_path / "a1111.pt")
    back = load_learned_identity(tmp_path / "a1111.pt")
    assert torch.equal(back.tensors["clip_l"], t) and back.num_tokens == 3
    v = torch.randn(1024, generator=_gen(2))  # diffusers: {"<tok>": [D]}
    torch.save({"<sks>": v}, tmp_path / "learned_embeds.bin")
    assert torch.equal(load_learned_identity(tmp_path / "learned_embeds.bin").tensors["clip_h"], v[None])
    save_file({"<sks>": v[None]}, str(tmp_path / "learned_embeds.safetensors"))
    assert load_learned_identity(tmp_path / "learned_embeds.safetensors").tensors["clip_h"].shape == (1, 1024)


class NotATensor:  # a pickle that weights_only refuses
    def __init__(self):
        self.x = 1


def test_pickles_that_need_more_than_weights_only_are_refused(tmp_path):
    torch.save({"emb": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(WeightFormatError, match="weights_only"):
        load_learned_identity(tmp_path / "evil.pt")


def _with_config(tmp_path, **changes):
    ident = LearnedIdentity.words(words())
    path = save_learned_identity(tmp_path / "x", ident, overwrite=True)
    cfg = json.loads(ident.config.to_json())
    cfg.update(changes)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(cfg)})
    return path


def test_newer_versions_unknown_fields_and_bad_values_are_refused(tmp_path):
    with pytest.raises(WeightFormatError, match="version"):
        load_learned_identity(_with_config(tmp_path, format_version=IDENTITY_FORMAT_VERSION + 1))
    with pytest.raises(WeightFormatError, match="unknown"):
        load_learned_identity(_with_config(tmp_path, colour="blue"))
    with pytest.raises(WeightFormatError, match="layout"):
        load_learned_identity(_with_config(tmp_path, layout="grid"))
    save_file({"emb_params": torch.full((2, 768), float("nan"))}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(WeightFormatError, match="NaN"):
        load_learned_identity(tmp_path / "nan.safetensors")


def test_shapes_are_checked():
    with pytest.raises(WeightFormatError, match=r"\[S, 2, k, D\]"):
        LearnedIdentity(IdentityConfig(layout="per_stage", num_stages=5), {"clip_h": torch.zeros(4, 2, 2, 8)})
    with pytest.raises(WeightFormatError, match="k=3"):
        LearnedIdentity(IdentityConfig(num_tokens=3), {"clip_h": torch.zeros(2, 8)})
    with pytest.raises(ValueError, match="init"):
        IdentityConfig(init="person")


def test_one_writer_one_schema_and_old_files_still_read(tmp_path):
    """Every file the pack writes carries the identity config under one key, byte-reproducibly; files of the
    older embedding writer (config under "dreamid") are still read."""
    import hashlib
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from dreamid_core.identities.learned_identity import write_embedding

    parts = {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}
    info = {"target": "sdxl", "scale": 1.0, "source": "enc.safetensors", "num_images": 3}
    a = write_embedding(tmp_path / "a", parts, metadata=info)
    b = write_embedding(tmp_path / "b", parts, metadata=dict(reversed(list(info.items()))))
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    with safe_open(str(a), "pt") as fh:
        meta = fh.metadata()
    assert set(meta) == {"format", "dreamid_identity"}
    config = json.loads(meta["dreamid_identity"])
    assert (config["init"], config["target"], config["extra"]["num_images"]) == ("encoder", "sdxl", 3)
    old = tmp_path / "old.safetensors"  # what the pack wrote before: tensors + {"dreamid": info}
    save_file({k: v.contiguous() for k, v in parts.items()}, str(old),
              metadata={"format": "pt", "dreamid": json.dumps({"target": "sdxl"})})
    ident = load_learned_identity(old)
    assert ident.config.target == "sdxl" and torch.equal(ident.tensors["clip_g"], parts["clip_g"])
