"""Embedding file names: any script is a name, a path or a Windows device name is not."""

from __future__ import annotations

import unicodedata

import pytest

from dreamid_core.identities.embedding_io import MAX_NAME_BYTES, sanitize_name


@pytest.mark.parametrize("given,saved", [
    ("my_identity", "my_identity"),
    ("名前", "名前"),
    ("Zoë", "Zoë"),
    (unicodedata.normalize("NFD", "Zoë"), "Zoë"),  # decomposed input: the same file name (NFC)
    ("नमस्ते", "नमस्ते"),  # combining vowel signs are part of the word
    ("person sd2!", "person_sd2"),
    ("anna.safetensors", "anna"),
    ("c:drive", "c_drive"),
    ("  spaced  ", "spaced"),
    ("console", "console"),  # only the exact device names are refused
    ("com10", "com10"),
])
def test_names_that_are_kept(given, saved):
    assert sanitize_name(given) == saved


@pytest.mark.parametrize("name", ["CON", "con", "Nul", "PRN.txt", "aux.safetensors", "COM1", "com9.tar.gz",
                                  "LPT1", "lpt9", "COM\u00b9"])
def test_windows_device_names_are_refused(name):
    with pytest.raises(ValueError, match="Windows device name"):
        sanitize_name(name)


@pytest.mark.parametrize("name", ["../escape", "a/b", "a\\b", "..", ".", "/etc/passwd"])
def test_paths_are_refused(name):
    with pytest.raises(ValueError, match="is a path"):
        sanitize_name(name)


@pytest.mark.parametrize("name", ["", "!!!", "___", "   "])
def test_nothing_usable(name):
    with pytest.raises(ValueError, match="no usable characters"):
        sanitize_name(name)


def test_long_names_are_refused_with_the_limit_never_cut():
    longest = "名" * (MAX_NAME_BYTES // 3)  # 3 bytes each in UTF-8
    assert sanitize_name(longest) == longest and len((longest + ".safetensors").encode()) < 255
    for name in ("名" * 300, "x" * 300, "a" * (MAX_NAME_BYTES + 1)):
        with pytest.raises(ValueError, match=rf"bytes long as a file name; at most {MAX_NAME_BYTES}"):
            sanitize_name(name)


# -- reading: the one reader of textual-inversion files, beside the writer ------------------------------

def _write_formats(tmp_path, vec):
    """The same [k, D] vectors as this pack's file, diffusers learned_embeds (.safetensors / .bin) and A1111 .pt."""
    import torch
    from safetensors.torch import save_file

    from dreamid_core.identities.learned_identity import write_embedding

    files = {"pack": write_embedding(tmp_path / "pack.safetensors", {"clip_h": vec})}
    save_file({"<tom>": vec.clone()}, str(tmp_path / "learned_embeds.safetensors"))
    files["diffusers"] = tmp_path / "learned_embeds.safetensors"
    torch.save({"<tom>": vec}, tmp_path / "learned_embeds.bin")
    files["diffusers_bin"] = tmp_path / "learned_embeds.bin"
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": vec}, "name": "tom"},
               tmp_path / "tom.pt")
    files["a1111"] = tmp_path / "tom.pt"
    return files


@pytest.mark.parametrize("k", [1, 2, 5])
def test_every_format_reads_back_what_was_written(tmp_path, k):
    import torch

    from dreamid_core.identities.embedding_io import read_embedding

    vec = torch.randn(k, 1024, generator=torch.Generator().manual_seed(k))
    for kind, path in _write_formats(tmp_path, vec).items():
        parts = read_embedding(path)  # 1024 wide, unnamed: SD2's clip_h by its width
        assert set(parts) == {"clip_h"}, kind
        assert torch.equal(parts["clip_h"], vec), kind
        assert torch.equal(read_embedding(path, single_key="clip_l")["clip_l"], vec), kind  # the caller names it


def test_sdxl_files_keep_both_encoders(tmp_path):
    import torch

    from dreamid_core.identities.embedding_io import read_embedding
    from dreamid_core.identities.learned_identity import write_embedding

    parts = {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}
    back = read_embedding(write_embedding(tmp_path / "xl", parts))
    assert set(back) == {"clip_l", "clip_g"} and all(torch.equal(back[k], parts[k]) for k in parts)


def test_the_nodes_and_the_evaluation_read_a_file_alike(tmp_path):
    """LoadIdentity (dreamid_core.identities.learned_identity) and the evaluation's baseline read the same vectors."""
    import torch

    pytest.importorskip("transformers")
    from dreamid_core.identities.learned_identity import load_learned_identity
    from training.evaluate.identity_sources import EmbeddingIdentity

    vec = torch.randn(3, 1024, generator=torch.Generator().manual_seed(0))
    for kind, path in _write_formats(tmp_path, vec).items():
        node = load_learned_identity(path).tensors["clip_h"]
        evaluation = EmbeddingIdentity(path, "sd2", {"clip_h": 1024}).parts(None)["clip_h"]
        assert torch.equal(node, evaluation) and torch.equal(node, vec), kind


def test_unreadable_files_name_the_file_and_the_fix(tmp_path):
    import torch

    from dreamid_core import WeightFormatError
    from dreamid_core.identities.embedding_io import read_embedding

    class RunsCode:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"string_to_param": {"*": RunsCode()}}, tmp_path / "evil.pt")
    with pytest.raises(WeightFormatError, match=r"evil\.pt.*weights_only=True.*safetensors"):
        read_embedding(tmp_path / "evil.pt")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(WeightFormatError, match=r"cut\.safetensors.*not a readable"):
        read_embedding(tmp_path / "cut.safetensors")
    (tmp_path / "odd.gguf").write_bytes(b"x")
    with pytest.raises(WeightFormatError, match=r"odd\.gguf.*\.safetensors"):
        read_embedding(tmp_path / "odd.gguf")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        read_embedding(tmp_path / "missing.safetensors")
    torch.save({"a": torch.zeros(2, 1000), "b": torch.zeros(2, 1000)}, tmp_path / "two.bin")
    with pytest.raises(WeightFormatError, match=r"two\.bin.*not a textual-inversion file"):
        read_embedding(tmp_path / "two.bin")
    torch.save({"<x>": torch.zeros(2, 999)}, tmp_path / "narrow.bin")
    with pytest.raises(WeightFormatError, match=r"999 wide"):
        read_embedding(tmp_path / "narrow.bin")
