"""Embedding file names: any script is a name, a path or a Windows device name is not."""

from __future__ import annotations

import unicodedata

import pytest

from dreamid_core.embedding_io import MAX_NAME_BYTES, sanitize_name


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


def test_long_names_fit_a_file_system_name():
    name = sanitize_name("名" * 300)
    assert len(name.encode()) <= MAX_NAME_BYTES and len((name + ".safetensors").encode()) < 255
    assert set(name) == {"名"}
