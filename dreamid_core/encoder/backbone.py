"""Face-recognition ViT with insightface arcface_torch's parameter names.

``FaceViT.forward`` returns, explicitly, one summary token per requested layer (the CLS token
where the model has one, otherwise the mean of the patch tokens) and the final identity vector.
Module names match arcface_torch's ``VisionTransformer`` so its published state dicts load with
``strict=True``: ``patch_embed.proj``, ``pos_embed``, ``mask_token``, ``blocks.{i}.norm1 / attn.qkv /
attn.proj / norm2 / mlp.fc1 / mlp.fc2``, ``norm``, ``feature.{0,1,2,3}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import BackboneConfig


@dataclass
class FaceViTOutput:
    taps: torch.Tensor  # [B, T, D]: one summary token per requested layer, in request order
    identity: torch.Tensor  # [B, num_features]: the recognition embedding (not L2-normalised)


class PatchEmbed(nn.Module):
    def __init__(self, *, patch_size: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(pixels), "b d h w -> b (h w) d")


class Attention(nn.Module):
    def __init__(self, *, width: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, width * 3, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, N, D] -> q, k, v each [B, heads, N, D/heads]
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    def __init__(self, *, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        eps = config.layer_norm_eps
        self.norm1 = nn.LayerNorm(config.width, eps=eps)
        self.attn = Attention(width=config.width, num_heads=config.num_heads, qkv_bias=config.qkv_bias)
        self.norm2 = nn.LayerNorm(config.width, eps=eps)
        self.mlp = Mlp(width=config.width, hidden=int(config.width * config.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FaceViT(nn.Module):
    """ArcFace ViT. Input: aligned RGB faces ``[B, 3, S, S]`` in 0..1 (normalised inside)."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        width, n = config.width, config.num_patches
        self.patch_embed = PatchEmbed(patch_size=config.patch_size, width=width)
        self.pos_embed = nn.Parameter(torch.zeros(1, n + int(config.cls_token), width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))  # unused at inference; kept for strict loading
        if config.cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        head_in = width if config.cls_token else width * n
        self.feature = nn.Sequential(
            nn.Linear(head_in, width, bias=False),
            nn.BatchNorm1d(width, eps=2e-5),
            nn.Linear(width, config.num_features, bias=False),
            nn.BatchNorm1d(config.num_features, eps=2e-5),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        if self.config.cls_token:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, pixels: torch.Tensor, taps: tuple[int, ...] | None = None) -> FaceViTOutput:
        """``taps`` are 1-based layer numbers (default: the config's quarters, 3/6/9/12 at depth 12)."""
        cfg = self.config
        taps = tuple(taps) if taps is not None else cfg.default_taps()
        bad = [t for t in taps if not 1 <= t <= cfg.depth]
        if bad:
            raise ValueError(f"tap layers {bad} outside 1..{cfg.depth}")
        if pixels.ndim != 4 or pixels.shape[1:] != (3, cfg.image_size, cfg.image_size):
            raise ValueError(f"FaceViT expects aligned faces [B, 3, {cfg.image_size}, {cfg.image_size}], "
                             f"got {tuple(pixels.shape)}")
        x = self.patch_embed((pixels - 0.5) / 0.5)  # [B, N, D]
        if cfg.cls_token:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1+N, D]
        x = x + self.pos_embed
        summaries: dict[int, torch.Tensor] = {}
        for depth, block in enumerate(self.blocks, start=1):
            x = block(x)
            if depth in taps:
                summaries[depth] = self._summary(x)  # [B, D]
        x = self.norm(x)
        head_in = x[:, 0] if cfg.cls_token else rearrange(x, "b n d -> b (n d)")  # [B, D] or [B, N*D]
        identity = self.feature(head_in)
        return FaceViTOutput(taps=torch.stack([summaries[t] for t in taps], dim=1), identity=identity)

    def _summary(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.config.cls_token else x.mean(dim=1)
