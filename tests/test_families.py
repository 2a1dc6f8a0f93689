"""dreamid_core.identities.families: the one table of which text encoders each model family reads, and what
is derived from it (encoder presets, the training stack's keys and choices, the rule of which identity fits)."""

from __future__ import annotations

import pytest
import torch

from dreamid_core.encoder.config import TEXT_ENCODER_PRESETS
from dreamid_core.errors import IncompatibleEncoderError
from dreamid_core.identities.embeds import fit_parts
from dreamid_core.identities.families import (
    FAMILY_PARTS,
    FAMILY_WIDTHS,
    PART_WIDTHS,
    UNET_FAMILIES,
    check_word_identities,
    family_of,
)


def test_every_family_is_named_by_its_encoders():
    for family, parts in FAMILY_PARTS.items():
        assert family_of(parts) == family and family_of(reversed(parts)) == family
    assert family_of(["clip_l", "qwen25_7b"]) == "unknown"
    assert FAMILY_WIDTHS.startswith("SD1.x: clip_l 768, SD2.x: clip_h 1024, SDXL: clip_l 768 + clip_g 1280")


def test_derived_tables_come_from_the_one_table():
    assert TEXT_ENCODER_PRESETS == {f: tuple((k, PART_WIDTHS[k]) for k in FAMILY_PARTS[f]) for f in UNET_FAMILIES}
    pytest.importorskip("diffusers")
    from training.common.base_model import FAMILIES
    from training.common.prompt_encoding import PART_FOR_ENCODER

    assert PART_FOR_ENCODER is FAMILY_PARTS and FAMILIES == UNET_FAMILIES


def test_encoders_that_take_no_word_identity_are_named():
    check_word_identities(["clip_l", "t5xxl"])
    for keys in (["qwen25_7b"], ["umt5xxl"], ["clip_l", "llama"], []):
        with pytest.raises(IncompatibleEncoderError, match="cannot take a word identity.*FLUX"):
            check_word_identities(keys, "this CLIP")


def test_the_fit_rule_ignores_extra_parts_and_names_missing_and_wrong_widths():
    sdxl = {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}
    assert set(fit_parts(sdxl, {"clip_l": 768})) == {"clip_l"}  # SDXL on SD1.x: its clip_l half
    with pytest.raises(IncompatibleEncoderError, match=r"needs \['clip_g', 'clip_l'\] \(no clip_g\)"):
        fit_parts({"clip_l": torch.zeros(2, 768)}, {"clip_l": 768, "clip_g": 1280})
    with pytest.raises(IncompatibleEncoderError, match=r"shape \(2, 64\).*768 wide"):
        fit_parts({"clip_l": torch.zeros(2, 64)}, {"clip_l": 768})
    assert fit_parts({"clip_h": torch.zeros(0, 1024)}, {"clip_h": 1024})["clip_h"].shape == (0, 1024)  # k = 0: off
