"""Which text encoders a model family reads: THE table of the pack (identities, encoders, learning).

An identity holds vectors per text encoder, keyed by ComfyUI's ``embedding_key`` of that encoder's
tokenizer ("clip_l", "clip_h", "clip_g", "t5xxl"): the key under which ComfyUI's ``embedding:NAME``
takes a multi-key textual-inversion file's tensor, so one file serves every encoder of a family.

API
- ``FAMILY_PARTS``: family -> its encoders' keys; ``PART_WIDTHS``: each key's real word-embedding width;
  ``UNET_FAMILIES``: the families encoders, learning and training work on; ``DIT_FAMILIES``: the
  transformers identity learning also works on; ``family_name(family)``: "FLUX.1", "SDXL", … for messages.
- ``family_of(keys) -> str``: the family whose encoders are exactly ``keys`` ("unknown" otherwise).
- ``check_word_identities(keys, what)``: raises :class:`IncompatibleEncoderError` for a text encoder
  the pack cannot put word identities into (Qwen-Image's ``qwen25_7b``, Wan's ``umt5xxl``, …: ComfyUI
  gives their tokenizers no embedding directory, and nothing learned or tested them), naming the family
  and what is supported.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import IncompatibleEncoderError

FAMILY_PARTS: dict[str, tuple[str, ...]] = {
    "sd1": ("clip_l",),
    "sd2": ("clip_h",),
    "sdxl": ("clip_l", "clip_g"),
    "sd3": ("clip_l", "clip_g", "t5xxl"),
    "flux": ("clip_l", "t5xxl"),
    "chroma": ("t5xxl",),
}
PART_WIDTHS = {"clip_l": 768, "clip_h": 1024, "clip_g": 1280, "t5xxl": 4096}
#: the UNet families: encoder files, identity learning and the training stack work on these
UNET_FAMILIES = ("sd1", "sd2", "sdxl")
#: the diffusion transformers whose identities can be learned (on their own text encoders)
DIT_FAMILIES = ("sd3", "flux")
WORD_PARTS = frozenset(PART_WIDTHS)
_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sd3": "SD3/3.5", "flux": "FLUX.1", "chroma": "Chroma"}
#: every family's encoders and widths, for messages: "SD1.x: clip_l 768, ..., FLUX.1: clip_l 768 + t5xxl 4096"
FAMILY_WIDTHS = ", ".join(f"{_NAMES[f]}: " + " + ".join(f"{k} {PART_WIDTHS[k]}" for k in parts)
                          for f, parts in FAMILY_PARTS.items())
SUPPORTED = ("SD1.x (clip_l), SD2.x (clip_h), SDXL (clip_l + clip_g), SD3/3.5 (clip_l + clip_g + t5xxl), "
             "FLUX.1 dev/schnell/Krea/Kontext (clip_l + t5xxl), Chroma (t5xxl)")


def family_name(family: str) -> str:
    """"sdxl" -> "SDXL", "flux" -> "FLUX.1"; anything else as given."""
    return _NAMES.get(family, family)


def family_of(keys: Iterable[str]) -> str:
    found = set(keys)
    for name, parts in FAMILY_PARTS.items():
        if found == set(parts):
            return name
    return "unknown"


def check_word_identities(keys: Iterable[str], what: str = "this CLIP") -> None:
    keys = list(keys)
    unsupported = [k for k in keys if k not in WORD_PARTS]
    if unsupported or not keys:
        raise IncompatibleEncoderError(
            f"{what} has the text encoder(s) {keys}: {', '.join(unsupported) or 'none'} cannot take a word identity "
            f"(ComfyUI loads no embeddings for it, e.g. Qwen-Image's qwen25_7b or Wan's umt5xxl). Word identities "
            f"work on {SUPPORTED}.")
