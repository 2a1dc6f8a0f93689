"""Which per-stage token pair a cross-attention call uses: by denoising time (default) or UNet block.

API
- ``STAGE_KINDS = ("time", "unet")``.
- ``stage_for_timestep(t, num_stages, num_timesteps=1000) -> int``: S equal bins over the model's
  training timesteps ``0 .. num_timesteps-1``; ``stage = min(S-1, floor(t) * S // num_timesteps)``
  (t is clamped into range; fractional t from a sampler is floored). Stage 0 = the LAST, least noisy
  steps (texture), stage S-1 = the first, noisiest steps (layout and identity).
- ``UNetLayout(num_levels, num_res_blocks, attention_levels)`` and ``UNET_LAYOUTS`` (sd1, sd2, sdxl);
  ``layout_from_unet_config(cfg)`` reads ComfyUI's / the ldm ``unet_config`` dict
  (``channel_mult``, ``num_res_blocks``, ``transformer_depth``).
- ``stage_for_level(part, level, num_stages, layout) -> int``: ``part`` is "input", "middle" or
  "output"; ``level`` the resolution level (0 = full latent resolution). The attention-bearing units,
  in the order the UNet runs them (input levels ascending, middle, output levels descending), are
  spread evenly over the S stages: ``stage = unit * S // num_units``. diffusers adapters call this with
  ``down_blocks[i]`` -> ("input", i), ``mid_block`` -> ("middle", 0), ``up_blocks[i]`` ->
  ("output", num_levels - 1 - i).
- ``stage_for_block(block, num_stages, family_or_layout) -> int``: ComfyUI's
  ``extra_options["block"]`` (``("input", 4)``, ``("middle", 0)``, ``("output", 7)``) -> stage.

Why time is the default: identical for SD1/SD2/SDXL whose UNet layouts differ, ProSpect (the paper's
comparison) uses denoising-time stages, and early steps decide layout and identity while late ones
decide texture; the key/value split then separates "where" from "what" within each stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..identities.learned_identity import STAGE_KINDS

__all__ = ["PARTS", "STAGE_KINDS", "UNET_LAYOUTS", "UNetLayout", "layout_from_unet_config", "level_of_block",
           "stage_for_block", "stage_for_level", "stage_for_timestep"]

PARTS = ("input", "middle", "output")


def _check_stages(num_stages: int) -> None:
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be an integer >= 1, got {num_stages!r}")


def stage_for_timestep(t: float, num_stages: int, num_timesteps: int = 1000) -> int:
    """The stage of model timestep ``t`` (0 = clean end, ``num_timesteps - 1`` = pure noise)."""
    _check_stages(num_stages)
    if not math.isfinite(float(t)):
        raise ValueError(f"timestep must be finite, got {t!r}")
    step = min(max(int(math.floor(float(t))), 0), num_timesteps - 1)
    return min(num_stages - 1, step * num_stages // num_timesteps)


@dataclass(frozen=True)
class UNetLayout:
    """Resolution levels of a UNet, res blocks per level (input side), and which levels attend."""

    num_levels: int
    num_res_blocks: int
    attention_levels: tuple[int, ...]
    has_middle_attention: bool = True

    def units(self) -> list[tuple[str, int]]:
        """Attention-bearing (part, level) units in execution order."""
        out = [("input", lvl) for lvl in sorted(self.attention_levels)]
        if self.has_middle_attention:
            out.append(("middle", 0))
        out += [("output", lvl) for lvl in sorted(self.attention_levels, reverse=True)]
        return out


UNET_LAYOUTS: dict[str, UNetLayout] = {
    "sd1": UNetLayout(num_levels=4, num_res_blocks=2, attention_levels=(0, 1, 2)),
    "sd2": UNetLayout(num_levels=4, num_res_blocks=2, attention_levels=(0, 1, 2)),
    "sdxl": UNetLayout(num_levels=3, num_res_blocks=2, attention_levels=(1, 2)),
}


def layout_from_unet_config(cfg: dict) -> UNetLayout:
    """A layout from an ldm ``unet_config`` (ComfyUI ``model.model_config.unet_config``)."""
    mult = list(cfg.get("channel_mult", ()))
    if not mult:
        raise ValueError(f"unet_config has no channel_mult: {sorted(cfg)}")
    res = cfg.get("num_res_blocks", 2)
    res = int(res[0] if isinstance(res, (list, tuple)) else res)
    depth = cfg.get("transformer_depth", [1] * len(mult))
    if isinstance(depth, int):
        depth = [depth] * len(mult)
    # ComfyUI stores transformer_depth per input block (len = levels * res) or per level
    per_level = [int(depth[i * res]) if len(depth) == len(mult) * res else int(depth[i]) for i in range(len(mult))]
    levels = tuple(i for i, d in enumerate(per_level) if d > 0)
    middle = cfg.get("transformer_depth_middle", 1)
    return UNetLayout(num_levels=len(mult), num_res_blocks=res, attention_levels=levels,
                      has_middle_attention=middle is None or int(middle) > 0)


def _layout(family_or_layout: str | UNetLayout) -> UNetLayout:
    if isinstance(family_or_layout, UNetLayout):
        return family_or_layout
    if family_or_layout not in UNET_LAYOUTS:
        raise ValueError(f"unknown model family {family_or_layout!r} for UNet stages; choose one of "
                         f"{sorted(UNET_LAYOUTS)} or pass a UNetLayout")
    return UNET_LAYOUTS[family_or_layout]


def stage_for_level(part: str, level: int, num_stages: int, layout: str | UNetLayout) -> int:
    """The stage of the attention at (``part``, resolution ``level``); see the module docstring."""
    _check_stages(num_stages)
    layout = _layout(layout)
    if part not in PARTS:
        raise ValueError(f"UNet part must be one of {PARTS}, got {part!r}")
    units = layout.units()
    key = ("middle", 0) if part == "middle" else (part, int(level))
    if key not in units:  # a level without attention in this layout: use the nearest unit on that side
        same = [u for u in units if u[0] == part] or units
        key = min(same, key=lambda u: abs(u[1] - int(level)))
    return units.index(key) * num_stages // len(units)


def level_of_block(block: tuple[str, int], layout: str | UNetLayout) -> tuple[str, int]:
    """ComfyUI block id (``("input", i)``, ``("middle", 0)``, ``("output", j)``) -> (part, level)."""
    layout = _layout(layout)
    part, index = block[0], int(block[1])
    per = layout.num_res_blocks + 1  # input: res blocks + a downsample per level; output: res + 1 each
    if part == "input":
        return part, min(layout.num_levels - 1, max(0, (index - 1) // per))
    if part == "output":
        return part, max(0, layout.num_levels - 1 - index // per)
    if part == "middle":
        return part, 0
    raise ValueError(f"UNet block must start with one of {PARTS}, got {block!r}")


def stage_for_block(block: tuple[str, int], num_stages: int, family_or_layout: str | UNetLayout) -> int:
    """The stage of ComfyUI's ``extra_options["block"]`` under ``stage_kind="unet"``."""
    part, level = level_of_block(block, family_or_layout)
    return stage_for_level(part, level, num_stages, family_or_layout)
