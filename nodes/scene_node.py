"""DreamID_ScenePosition: put the head where you want it on the canvas, through a ControlNet."""

from __future__ import annotations

import logging

import torch

from ..dreamid_core.keypoints import STYLES, draw_hint, place_head, reference_landmarks
from .validation import require_finite

logger = logging.getLogger(__name__)
CATEGORY = "DreamIdentity"


class DreamIDScenePosition:
    DESCRIPTION = ("Scene switch: draws the reference face's keypoints (pose kept), moved to (x, y) and scaled to "
                   "head_size, as an OpenPose head (or InstantID-style 5-point) image, and applies the ControlNet "
                   "with ComfyUI's own Apply ControlNet. Use an OpenPose ControlNet for the openpose style.")

    @classmethod
    def INPUT_TYPES(cls):
        frac = {"min": -1.0, "max": 2.0, "step": 0.01}  # beyond 0..1: a head partly off the edge
        return {
            "required": {
                "positive": ("CONDITIONING", {"tooltip": "Positive conditioning (e.g. from DreamID_InjectIDTokens)."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative conditioning."}),
                "control_net": ("CONTROL_NET", {"tooltip": "An OpenPose (or keypoint) ControlNet for this model."}),
                "width": ("INT", {"default": 512, "min": 64, "max": 8192, "step": 8,
                                  "tooltip": "Canvas width: the size of the image you generate."}),
                "height": ("INT", {"default": 512, "min": 64, "max": 8192, "step": 8,
                                   "tooltip": "Canvas height: the size of the image you generate."}),
                "x": ("FLOAT", {"default": 0.5, **frac, "tooltip": "Face centre, fraction of the width (0 left, 1 right; outside 0..1 crops the head at the edge)."}),
                "y": ("FLOAT", {"default": 0.4, **frac, "tooltip": "Face centre, fraction of the height (0 top, 1 bottom)."}),
                "head_size": ("FLOAT", {"default": 0.3, "min": 0.02, "max": 2.0, "step": 0.01,
                                        "tooltip": "Face height (forehead to chin) as a fraction of the canvas height."}),
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
            },
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "IMAGE")
    RETURN_NAMES = ("positive", "negative", "control_image")
    OUTPUT_TOOLTIPS = ("Positive with the ControlNet attached.", "Negative with the ControlNet attached.",
                       "The keypoint image given to the ControlNet (preview it).")
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, positive, negative, control_net, width, height, x, y, head_size, strength, start_percent,
              end_percent, style, face_layout=None, vae=None):
        import nodes as comfy_nodes  # ComfyUI's own nodes module (this pack's folder is <pack>.nodes)

        require_finite("DreamID_ScenePosition", x=x, y=y, head_size=head_size, strength=strength,
                       start_percent=start_percent, end_percent=end_percent)
        if end_percent < start_percent:
            raise ValueError(f"end_percent {end_percent} is before start_percent {start_percent}; swap them.")
        placement = place_head(reference_landmarks(face_layout), (width, height), x, y, head_size)
        hint = draw_hint(placement, style)  # [H, W, 3] uint8, raises when the head is entirely off the canvas
        image = torch.from_numpy(hint).float().div(255.0)[None]  # [1, H, W, 3]
        pos, neg = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
            positive, negative, control_net, image, strength, start_percent, end_percent, vae=vae)
        return (pos, neg, image)
