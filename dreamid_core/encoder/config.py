"""The two config dataclasses: the face backbone's and the ID encoder's.

The encoder config (which holds the backbone config) is written as JSON into every weights file,
so a file can be rebuilt from its metadata alone. ``from_dict`` refuses what it does not know
rather than guessing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import WeightFormatError
from ..fileio import check_format_version, unknown_fields
from ..identities.families import FAMILY_PARTS, PART_WIDTHS, UNET_FAMILIES

#: Version of the weights-file layout this code writes. Files of a higher version are refused.
FORMAT_VERSION = 1

#: Word-embedding widths of the text encoders, keyed as ComfyUI names them ("clip_" + tokenizer key).
TEXT_ENCODER_PRESETS: dict[str, tuple[tuple[str, int], ...]] = {
    family: tuple((key, PART_WIDTHS[key]) for key in FAMILY_PARTS[family]) for family in UNET_FAMILIES}

#: insightface arcface_torch ViT shapes (recognition/arcface_torch/backbones/__init__.py).
BACKBONE_PRESETS: dict[str, dict[str, Any]] = {
    "vit_t": dict(width=256, depth=12, num_heads=8),
    "vit_s": dict(width=512, depth=12, num_heads=8),
    "vit_b": dict(width=512, depth=24, num_heads=8),
    "vit_l": dict(width=768, depth=24, num_heads=8),
}


def _check_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{owner}.{name} must be > 0, got {value!r}")



@dataclass(frozen=True)
class BackboneConfig:
    """A face-recognition ViT. Defaults are arcface_torch's vit_s (112 px, patch 9, no CLS token)."""

    image_size: int = 112
    patch_size: int = 9
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    num_features: int = 512  # the identity vector's width
    qkv_bias: bool = False
    cls_token: bool = False  # False: arcface_torch layout; True: CLS variant (Face2Diffusion style)
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _check_positive("BackboneConfig", image_size=self.image_size, patch_size=self.patch_size,
                        width=self.width, depth=self.depth, num_heads=self.num_heads,
                        mlp_ratio=self.mlp_ratio, num_features=self.num_features)
        if self.width % self.num_heads:
            raise ValueError(f"BackboneConfig.width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.patch_size > self.image_size:
            raise ValueError(f"BackboneConfig.patch_size {self.patch_size} exceeds image_size {self.image_size}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> BackboneConfig:
        if name not in BACKBONE_PRESETS:
            raise ValueError(f"unknown backbone preset {name!r}; choose one of {sorted(BACKBONE_PRESETS)}")
        return cls(**{**BACKBONE_PRESETS[name], **overrides})

    def default_taps(self) -> tuple[int, ...]:
        """Layers at each quarter of the depth: (3, 6, 9, 12) for a 12-layer ViT."""
        if self.depth < 4:
            return tuple(range(1, self.depth + 1))
        return tuple(self.depth * q // 4 for q in (1, 2, 3, 4))


@dataclass(frozen=True)
class EncoderConfig:
    """The M² ID encoder: backbone taps + identity vector -> k MLPs -> k word embeddings.

    ``token_widths`` lists the text encoders S* is made for and each one's word-embedding width,
    e.g. ``(("clip_h", 1024),)`` for SD2.x or ``(("clip_l", 768), ("clip_g", 1280))`` for SDXL.
    Every MLP outputs the concatenation; it is split per text encoder.
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    target: str = "sd2"
    token_widths: tuple[tuple[str, int], ...] = TEXT_ENCODER_PRESETS["sd2"]
    num_tokens: int = 2
    tap_layers: tuple[int, ...] = (3, 6, 9, 12)
    hidden_dim: int = 1024
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_widths", tuple((str(k), int(w)) for k, w in self.token_widths))
        object.__setattr__(self, "tap_layers", tuple(int(t) for t in self.tap_layers))
        _check_positive("EncoderConfig", num_tokens=self.num_tokens, hidden_dim=self.hidden_dim)
        if not self.token_widths:
            raise ValueError("EncoderConfig.token_widths is empty; give at least one (name, width)")
        names = [k for k, _ in self.token_widths]
        if len(set(names)) != len(names):
            raise ValueError(f"EncoderConfig.token_widths names repeat: {names}")
        for name, width in self.token_widths:
            if width <= 0:
                raise ValueError(f"EncoderConfig.token_widths: {name} has width {width}; must be > 0")
        if not self.tap_layers:
            raise ValueError("EncoderConfig.tap_layers is empty; default is (3, 6, 9, 12)")
        bad = [t for t in self.tap_layers if not 1 <= t <= self.backbone.depth]
        if bad:
            raise ValueError(f"EncoderConfig.tap_layers {bad} outside 1..{self.backbone.depth} "
                             f"(the backbone has {self.backbone.depth} layers)")

    @classmethod
    def for_target(cls, target: str, backbone: BackboneConfig | None = None, **overrides: Any) -> EncoderConfig:
        """Preset widths for "sd1", "sd2" or "sdxl"; taps default to the backbone's quarters."""
        if target not in TEXT_ENCODER_PRESETS:
            raise ValueError(f"unknown target {target!r}; choose one of {sorted(TEXT_ENCODER_PRESETS)} "
                             "or build EncoderConfig(token_widths=...) yourself")
        backbone = backbone or BackboneConfig()
        overrides.setdefault("tap_layers", backbone.default_taps())
        return cls(backbone=backbone, target=target, token_widths=TEXT_ENCODER_PRESETS[target], **overrides)

    @property
    def widths(self) -> dict[str, int]:
        return dict(self.token_widths)

    @property
    def out_dim(self) -> int:
        return sum(w for _, w in self.token_widths)

    @property
    def in_dim(self) -> int:
        """Width of V = [v_tap1, ..., v_tapN, v_final]."""
        return len(self.tap_layers) * self.backbone.width + self.backbone.num_features

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["token_widths"] = [list(p) for p in self.token_widths]
        d["tap_layers"] = list(self.tap_layers)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "metadata") -> EncoderConfig:
        if not isinstance(data, dict):
            raise WeightFormatError(f"{source}: the encoder config is {type(data).__name__}, expected a JSON object")
        check_format_version(data.get("format_version"), source, "encoder", FORMAT_VERSION)
        data = dict(data)
        backbone = data.pop("backbone", {})
        try:
            _reject_unknown(BackboneConfig, backbone, f"{source}: backbone")
            _reject_unknown(cls, data, source)
            return cls(backbone=BackboneConfig(**backbone), **data)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, WeightFormatError):
                raise
            raise WeightFormatError(f"{source}: invalid encoder config: {exc}") from exc

    @classmethod
    def from_json(cls, text: str, source: str = "metadata") -> EncoderConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WeightFormatError(f"{source}: the encoder config is not valid JSON ({exc})") from exc
        return cls.from_dict(data, source)


def _reject_unknown(kind: type, data: dict[str, Any], source: str) -> None:
    unknown = unknown_fields(kind, data)
    if unknown:
        raise WeightFormatError(f"{source}: unknown config fields {unknown}; the file was probably written "
                                "by a newer DreamIdentity. Update the pack to load it.")
