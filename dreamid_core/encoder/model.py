"""The M² ID encoder: multi-scale face features -> k pseudo-word embeddings S*.

V = [v_3, v_6, v_9, v_12, v_final] (each layer-normalised, then concatenated) goes through k
independent MLPs; MLP i gives the i-th pseudo-word, a vector in the text encoder's INPUT
word-embedding space (for SDXL the concatenation of the clip_l and clip_g vectors).
"""

from __future__ import annotations

import torch
from torch import nn

from .backbone import FaceViT
from .config import EncoderConfig

COMBINE_MODES = ("average", "average_features", "first")


class ProjectionMLP(nn.Module):
    """V [B, in] -> one pseudo-word [B, out]."""

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, out_dim)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.fc2(self.act(self.fc1(v)))))


class IDEncoder(nn.Module):
    """Aligned faces ``[B, 3, 112, 112]`` (0..1 RGB) -> S* ``[B, k, sum(widths)]``."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        bb = config.backbone
        self.backbone = FaceViT(bb)
        # one LayerNorm per tap and one for v_final: the residual stream grows with depth
        self.feature_norms = nn.ModuleList(
            [nn.LayerNorm(bb.width) for _ in config.tap_layers] + [nn.LayerNorm(bb.num_features)])
        self.projections = nn.ModuleList(
            [ProjectionMLP(in_dim=config.in_dim, hidden_dim=config.hidden_dim, out_dim=config.out_dim)
             for _ in range(config.num_tokens)])

    def features(self, faces: torch.Tensor) -> torch.Tensor:
        """Aligned faces -> V ``[B, in_dim]``."""
        out = self.backbone(faces, taps=self.config.tap_layers)
        parts = [norm(out.taps[:, i]) for i, norm in enumerate(self.feature_norms[:-1])]  # each [B, D]
        parts.append(self.feature_norms[-1](out.identity))  # [B, num_features]
        return torch.cat(parts, dim=-1)

    def project(self, v: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """V ``[B, in_dim]`` -> S* ``[B, k, out_dim]``, multiplied by ``scale`` (0 gives zeros)."""
        s = torch.stack([mlp(v) for mlp in self.projections], dim=1)  # [B, k, out_dim]
        return s * scale

    def forward(self, faces: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.project(self.features(faces), scale)

    def encode(self, faces: torch.Tensor, *, scale: float = 1.0, combine: str = "average") -> torch.Tensor:
        """Several photos of ONE person -> one S* ``[k, out_dim]``.

        ``combine``: "average" averages the per-photo S*; "average_features" averages V before
        the MLPs; "first" uses the first photo only.
        """
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
        if faces.shape[0] == 0:
            raise ValueError("encode() got an empty batch of faces")
        if combine == "first":
            faces = faces[:1]
        v = self.features(faces)  # [B, in_dim]
        if combine == "average_features":
            return self.project(v.mean(dim=0, keepdim=True), scale)[0]
        return self.project(v, scale).mean(dim=0)

    def split(self, s: torch.Tensor) -> dict[str, torch.Tensor]:
        """S* ``[..., k, out_dim]`` -> ``{"clip_l": [..., k, 768], ...}`` per text encoder."""
        widths = [w for _, w in self.config.token_widths]
        return dict(zip(self.config.widths, torch.split(s, widths, dim=-1), strict=True))

    def freeze_backbone(self) -> None:
        """Frozen and in eval mode (BatchNorm statistics stay as published)."""
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> IDEncoder:
        super().train(mode)
        self.backbone.eval()  # the backbone's BatchNorm never leaves eval mode
        return self
