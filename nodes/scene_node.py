"""DreamID_ScenePosition: put the head where you want it on the canvas, through a ControlNet."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from ..dreamid_core.faces.keypoints import STYLES, draw_hint, head_mask, place_head, reference_landmarks
from .adapters.validation import require_finite

if TYPE_CHECKING:
    from comfy.controlnet import ControlBase
    from comfy.sd import VAE

logger = logging.getLogger(__name__)
CATEGORY = "DreamIdentity"


MAX_HEADS = 3


def _more_heads() -> dict:
    """Optional heads 2 and 3, each with its own layout, place and size (size 0 = no such head)."""
    frac = {"min": -1.0, "max": 2.0, "step": 0.01}
    extra = {}
    for i in range(2, MAX_HEADS + 1):
        extra[f"face_layout_{i}"] = ("DREAMID_FACE_LAYOUT", {"tooltip": f"Person {i}'s face layout (pose)."})
        extra[f"x_{i}"] = ("FLOAT", {"default": 0.25 * i, **frac, "tooltip": f"Person {i}'s face centre, fraction "
                                                                              "of the width."})
        extra[f"y_{i}"] = ("FLOAT", {"default": 0.4, **frac, "tooltip": f"Person {i}'s face centre, fraction of the "
                                                                        "height."})
        extra[f"head_size_{i}"] = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.01, "tooltip": (
            f"Person {i}'s face height as a fraction of the canvas height; 0 = no head {i}.")})
    return extra


def _head_floats(more: dict) -> dict:
    """The FLOAT inputs of heads 2 and 3 (x_2, y_2, head_size_2, ...) among a node's optional inputs."""
    return {k: v for k, v in more.items() if k.split("_")[0] in ("x", "y", "head")}


def place_heads(width: int, height: int, style: str, face_layout: dict[str, Any] | None, x: float, y: float,
                head_size: float, more: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The hint image ``[1, H, W, 3]`` with every head drawn, and one MASK ``[1, H, W]`` per head slot."""
    heads = [(face_layout, x, y, head_size)]
    for i in range(2, MAX_HEADS + 1):
        size = more.get(f"head_size_{i}", 0.0)
        heads.append((more.get(f"face_layout_{i}"), more.get(f"x_{i}", 0.5), more.get(f"y_{i}", 0.4), size)
                     if size > 0 else None)
    placements = [place_head(reference_landmarks(h[0]), (width, height), h[1], h[2], h[3]) if h else None
                  for h in heads]
    hint = draw_hint([p for p in placements if p], style)  # [H, W, 3] uint8; raises for a head off the canvas
    image = torch.from_numpy(hint).float().div(255.0)[None]  # [1, H, W, 3]
    masks = [torch.from_numpy(head_mask(p))[None] if p else torch.zeros(1, height, width) for p in placements]
    return image, masks


def _placement_inputs() -> dict:
    frac = {"min": -1.0, "max": 2.0, "step": 0.01}  # beyond 0..1: a head partly off the edge
    return {
        "width": ("INT", {"default": 512, "min": 64, "max": 8192, "step": 8,
                          "tooltip": "Canvas width: the size of the image you generate."}),
        "height": ("INT", {"default": 512, "min": 64, "max": 8192, "step": 8,
                           "tooltip": "Canvas height: the size of the image you generate."}),
        "x": ("FLOAT", {"default": 0.5, **frac, "tooltip": (
            "Face centre, fraction of the width (0 left, 1 right; outside 0..1 crops the head at the edge).")}),
        "y": ("FLOAT", {"default": 0.4, **frac, "tooltip": "Face centre, fraction of the height (0 top, 1 bottom)."}),
        "head_size": ("FLOAT", {"default": 0.3, "min": 0.02, "max": 2.0, "step": 0.01,
                                "tooltip": "Face height (forehead to chin) as a fraction of the canvas height."}),
    }


class DreamIDHeadPlacement:
    DESCRIPTION = ("Where the heads go, without applying a ControlNet: the keypoint image of up to three heads (each "
                   "reference pose kept, moved to its x, y and scaled to its head_size) and one head MASK per person, "
                   "for DreamID_IdentityRegions. Feed control_image to ComfyUI's Apply ControlNet.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                **_placement_inputs(),
                "style": (list(STYLES), {"default": "openpose", "tooltip": (
                    "openpose: COCO-18 head (nose, neck, eyes, ears) in OpenPose colours; keypoints_5: "
                    "InstantID-style eyes, nose, mouth corners.")}),
            },
            "optional": {
                "face_layout": ("DREAMID_FACE_LAYOUT", {"tooltip": (
                    "From DreamID_EncodeFace: keeps the reference face's pose. Without it a frontal face is drawn.")}),
                **_more_heads(),
            },
        }

    RETURN_TYPES = ("IMAGE", "MASK", "MASK", "MASK")
    RETURN_NAMES = ("control_image", "head_mask", "head_mask_2", "head_mask_3")
    OUTPUT_TOOLTIPS = ("The keypoint image of every head, for Apply ControlNet (preview it).",
                       "Where head 1 is (face, hair, ears).", "Where head 2 is (empty when head_size_2 is 0).",
                       "Where head 3 is (empty when head_size_3 is 0).")
    FUNCTION = "place"
    CATEGORY = CATEGORY

    def place(self, width: int, height: int, x: float, y: float, head_size: float, style: str,
              face_layout: dict[str, Any] | None = None, **more: float | dict[str, Any]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        require_finite("DreamID_HeadPlacement", x=x, y=y, head_size=head_size, **_head_floats(more))
        image, masks = place_heads(width, height, style, face_layout, x, y, head_size, more)
        return (image, *masks)


class DreamIDScenePosition:
    DESCRIPTION = ("Scene switch: draws the reference face's keypoints (pose kept), moved to (x, y) and scaled to "
                   "head_size, as an OpenPose head (or InstantID-style 5-point) image, and applies the ControlNet "
                   "with ComfyUI's own Apply ControlNet. Use an OpenPose ControlNet for the openpose style.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "positive": ("CONDITIONING", {"tooltip": "Positive conditioning (e.g. from DreamID_InjectIDTokens)."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative conditioning."}),
                "control_net": ("CONTROL_NET", {"tooltip": "An OpenPose (or keypoint) ControlNet for this model."}),
                **_placement_inputs(),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "ControlNet strength."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                            "tooltip": "When the ControlNet starts acting (fraction of sampling)."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                          "tooltip": "When it stops acting."}),
                "style": (list(STYLES), {"default": "openpose", "tooltip": (
                    "openpose: COCO-18 head (nose, neck, eyes, ears) in OpenPose colours; keypoints_5: "
                    "InstantID-style eyes, nose, mouth corners.")}),
            },
            "optional": {
                "face_layout": ("DREAMID_FACE_LAYOUT", {"tooltip": (
                    "From DreamID_EncodeFace: keeps the reference face's pose. Without it a frontal face is drawn.")}),
                "vae": ("VAE", {"tooltip": "Only for ControlNets that need a VAE (passed to Apply ControlNet)."}),
                **_more_heads(),
            },
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "IMAGE", "MASK", "MASK", "MASK")
    RETURN_NAMES = ("positive", "negative", "control_image", "head_mask", "head_mask_2", "head_mask_3")
    OUTPUT_TOOLTIPS = ("Positive with the ControlNet attached.", "Negative with the ControlNet attached.",
                       "The keypoint image given to the ControlNet (preview it).",
                       "Where head 1 is (face, hair, ears): a region for DreamID_IdentityRegions.",
                       "Where head 2 is (empty when head_size_2 is 0).", "Where head 3 is (empty when head_size_3 is 0).")
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, positive: list[list], negative: list[list], control_net: ControlBase, width: int, height: int,
              x: float, y: float, head_size: float, strength: float, start_percent: float, end_percent: float,
              style: str, face_layout: dict[str, Any] | None = None, vae: VAE | None = None,
              **more: float | dict[str, Any]
              ) -> tuple[list[list], list[list], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        import nodes as comfy_nodes  # ComfyUI's own nodes module (this pack's folder is <pack>.nodes)

        require_finite("DreamID_ScenePosition", x=x, y=y, head_size=head_size, strength=strength,
                       start_percent=start_percent, end_percent=end_percent, **_head_floats(more))
        if end_percent < start_percent:
            raise ValueError(f"end_percent {end_percent} is before start_percent {start_percent}; swap them.")
        image, masks = place_heads(width, height, style, face_layout, x, y, head_size, more)
        pos, neg = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
            positive, negative, control_net, image, strength, start_percent, end_percent, vae=vae)
        return (pos, neg, image, *masks)
