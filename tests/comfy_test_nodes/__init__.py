"""Test-only ComfyUI node pack (installed by tests/comfy_server.py, never shipped).

``DreamIDTest_TinyCLIP`` builds a tiny real CLIP inside the server process: a tiny-width text encoder
cannot live in a checkpoint file (ComfyUI rebuilds it at the real width), so test graphs take their
CLIP from this node instead of CheckpointLoaderSimple's (or DualCLIPLoader's) CLIP output.
``DreamIDTest_TinyDiT`` does the same for a FLUX.1 / SD3 MODEL: ComfyUI detects a FLUX file at FLUX's
real widths only, so test graphs take the UNETLoader's MODEL from it.
"""

import importlib.util
import sys
from pathlib import Path

_TINY_PATH = Path(__file__).resolve().parent.parent / "comfy_tiny.py"  # resolves the symlink to tests/
_MODULE_NAME = "dreamid_test_comfy_tiny"


def _comfy_tiny():
    module = sys.modules.get(_MODULE_NAME)
    if module is None:
        spec = importlib.util.spec_from_file_location(_MODULE_NAME, _TINY_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_MODULE_NAME] = module
        spec.loader.exec_module(module)
    return module


class DreamIDTest_TinyCLIP:
    """A seeded tiny CLIP of the given kind; width 0 picks the default (SD2: 1024, the width the
    tiny SD2 checkpoint's UNet expects)."""

    CATEGORY = "DreamIdentity/testing"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "build"
    _cache: dict = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "kind": (["sd2", "sd1", "sdxl", "flux", "sd3"], {"default": "sd2"}),
            "width": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                              "tooltip": "0 = default (sd2: 1024 to match the tiny checkpoint)"}),
            "init_seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                                  "tooltip": "weight init seed (not named seed: no randomize widget)"}),
        }}

    def build(self, kind, width, init_seed):
        tiny = _comfy_tiny()
        key = (kind, width, init_seed)
        if key not in self._cache:  # building the 1024-wide one takes ~1 s; keep the last few
            if kind == "sd2" and width in (0, tiny.SERVER_SD2_WIDTH):
                clip = tiny.server_sd2_clip(seed=init_seed)
            elif kind in ("flux", "sd3"):
                clip = tiny.tiny_dit_clip(kind, seed=init_seed)
            else:
                clip = tiny.tiny_clip(kind, width or None, seed=init_seed)
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = clip
        return (self._cache[key].clone(),)


class DreamIDTest_TinyDiT:
    """A seeded tiny FLUX.1 or SD3 MODEL (tests/comfy_tiny.py ``tiny_dit_model``) that reads the tiny CLIP
    of the same kind."""

    CATEGORY = "DreamIdentity/testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"
    _cache: dict = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "kind": (["flux", "sd3"], {"default": "flux"}),
            "init_seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
        }}

    def build(self, kind, init_seed):
        key = (kind, init_seed)
        if key not in self._cache:
            self._cache[key] = _comfy_tiny().tiny_dit_model(kind, seed=init_seed)
        return (self._cache[key].clone(),)


NODE_CLASS_MAPPINGS = {"DreamIDTest_TinyCLIP": DreamIDTest_TinyCLIP, "DreamIDTest_TinyDiT": DreamIDTest_TinyDiT}
NODE_DISPLAY_NAME_MAPPINGS = {"DreamIDTest_TinyCLIP": "Tiny CLIP (DreamIdentity tests)",
                              "DreamIDTest_TinyDiT": "Tiny FLUX.1 / SD3 model (DreamIdentity tests)"}
