"""The encoder's weights file, and the loading of arcface_torch backbone checkpoints.

One ``.safetensors`` file holds the projection (``feature_norms.*``, ``projections.*``) and,
optionally, the backbone (``backbone.*``). Its metadata carries:

- ``dreamid_format``: the format version (an integer as text),
- ``dreamid_config``: :class:`EncoderConfig` as JSON (target, widths, k, taps, backbone config),
- ``dreamid_provenance``: JSON about how the weights were made (training run, steps, data),
- ``dreamid_contents``: ``"projection"`` or ``"projection+backbone"``.

The loader rebuilds the model from the metadata alone, checks every tensor's name and shape,
and never unpickles: safetensors only, and ``torch.load(weights_only=True)`` for arcface ``.pt``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickletools
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..errors import WeightFormatError
from ..fileio import atomic_save_safetensors, check_format_version
from .backbone import FaceViT
from .config import FORMAT_VERSION, BackboneConfig, EncoderConfig
from .model import IDEncoder

logger = logging.getLogger(__name__)

META_FORMAT = "dreamid_format"
META_CONFIG = "dreamid_config"
META_PROVENANCE = "dreamid_provenance"
META_CONTENTS = "dreamid_contents"

_PICKLE_MAGIC = {b"PK\x03\x04": "a torch.save zip archive (pickle)", b"\x80\x02": "a Python pickle",
                 b"\x80\x03": "a Python pickle", b"\x80\x04": "a Python pickle", b"\x80\x05": "a Python pickle"}
#: first opcodes of a protocol 0/1 pickle (no PROTO header): MARK, GLOBAL, EMPTY_DICT/LIST/TUPLE, LONG, INT
_OLD_PICKLE_FIRST = frozenset(b"(c}])LI")
_SNIFF_BYTES = 4096


def _safetensors_shaped(head: bytes, size: int) -> bool:
    """A safetensors file starts with its JSON header's length (u64, little-endian) and then ``{``."""
    return len(head) >= 9 and 0 < int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{"


def _parses_as_pickle(head: bytes) -> bool:
    """True when the bytes read as pickle opcodes (parsed with pickletools, never executed)."""
    ops = []
    try:
        for op, _, _ in pickletools.genops(io.BytesIO(head)):
            ops.append(op.name)
            if len(ops) == 3:
                break
    except Exception:  # unknown opcode, or the head ends inside one: not the start of a pickle
        return False
    return len(ops) == 3 or (bool(ops) and ops[-1] == "STOP")


def _sniff_pickle(path: Path) -> str | None:
    """What pickle format ``path`` is in, or None. Reads the first few KB only."""
    with open(path, "rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    for magic, what in _PICKLE_MAGIC.items():
        if head.startswith(magic):
            return what
    if head[:1] and head[0] in _OLD_PICKLE_FIRST and not _safetensors_shaped(head, path.stat().st_size) \
            and _parses_as_pickle(head):
        return "a Python pickle (protocol 0/1, e.g. a legacy torch.save file)"
    return None


def save_encoder(encoder: IDEncoder, path: str | os.PathLike[str], *, include_backbone: bool = True,
                 provenance: dict[str, Any] | None = None) -> Path:
    """Write ``encoder`` to ``path`` (atomically). Tensors are stored as float32, contiguous."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"encoder files are .safetensors; got {path.name!r}")
    tensors = {name: (t.detach().to("cpu", torch.float32) if t.is_floating_point() else t.detach().cpu()).contiguous()
               for name, t in encoder.state_dict().items()
               if include_backbone or not name.startswith("backbone.")}
    metadata = {
        META_FORMAT: str(FORMAT_VERSION),
        META_CONFIG: encoder.config.to_json(),
        META_PROVENANCE: json.dumps(provenance or {}, sort_keys=True, default=str),
        META_CONTENTS: "projection+backbone" if include_backbone else "projection",
    }
    atomic_save_safetensors(tensors, path, metadata)
    logger.info("saved DreamIdentity encoder to %s (%s, %d tensors)", path, metadata[META_CONTENTS], len(tensors))
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The raw safetensors metadata, after checking the file is a readable safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder file not found: {path}")
    pickled = _sniff_pickle(path)
    if pickled:
        raise WeightFormatError(
            f"{path.name} is {pickled}, not safetensors. DreamIdentity never unpickles files (a pickle "
            "can run code). Use a .safetensors encoder file exported by `python -m training.export`.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        size = path.stat().st_size
        raise WeightFormatError(f"{path.name} ({size} bytes) is not a readable safetensors file ({exc}). "
                                "It is probably truncated or corrupt: download or export it again.") from exc


def read_encoder_config(path: str | os.PathLike[str]) -> tuple[EncoderConfig, dict[str, Any], str]:
    """(config, provenance, contents) of an encoder file, without loading its tensors."""
    path = Path(path)
    meta = read_metadata(path)
    if META_CONFIG not in meta:
        raise WeightFormatError(
            f"{path.name} is a safetensors file but not a DreamIdentity encoder (no {META_CONFIG!r} in its "
            f"metadata; keys: {sorted(meta)}). Is it a textual-inversion embedding or another model? "
            "Put it in the folder that matches what it is.")
    check_format_version(meta.get(META_FORMAT, "0"), path.name, "encoder", FORMAT_VERSION)  # files before the key: 0
    config = EncoderConfig.from_json(meta[META_CONFIG], source=path.name)
    try:
        provenance = json.loads(meta.get(META_PROVENANCE, "{}"))
    except json.JSONDecodeError:
        provenance = {"unreadable": meta.get(META_PROVENANCE)}
    return config, provenance, meta.get(META_CONTENTS, "projection+backbone")


_EXPORT_AGAIN = ("The file's tensors do not match its own config: it was edited or written by another tool. "
                 "Export it again.")


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str,
                   optional_prefix: str | None, hint: str = _EXPORT_AGAIN) -> None:
    shape_errors = [f"{k}: file {tuple(v.shape)} vs config {tuple(expected[k].shape)}"
                    for k, v in tensors.items() if k in expected and v.shape != expected[k].shape]
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(k for k in set(expected) - set(tensors)
                     if not (optional_prefix and k.startswith(optional_prefix)))
    if shape_errors or unexpected or missing:
        parts = []
        if shape_errors:
            parts.append(f"{len(shape_errors)} tensors disagree with the metadata's widths: "
                         + "; ".join(shape_errors[:4]))
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        raise WeightFormatError(f"{source}: " + "; ".join(parts) + ". " + hint)


def load_encoder(path: str | os.PathLike[str], *, backbone_path: str | os.PathLike[str] | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> IDEncoder:
    """Rebuild an :class:`IDEncoder` from its file. The backbone comes from the file, else from
    ``backbone_path`` (an arcface_torch ``.pt`` or ``.safetensors`` state dict)."""
    path = Path(path)
    config, provenance, _ = read_encoder_config(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightFormatError(f"{path.name}: tensors unreadable ({exc}); the file is corrupt. "
                                "Download or export it again.") from exc
    with torch.device("meta"):
        skeleton = IDEncoder(config)
    expected = skeleton.state_dict()
    _check_tensors(tensors, expected, path.name, optional_prefix="backbone.")
    encoder = IDEncoder(config)
    has_backbone = any(k.startswith("backbone.") for k in tensors)
    if has_backbone:
        _check_tensors({k: v for k, v in tensors.items() if k.startswith("backbone.")},
                       {k: v for k, v in expected.items() if k.startswith("backbone.")}, path.name, None)
    if backbone_path is not None:
        backbone = load_arcface_backbone(backbone_path, config.backbone)
        if has_backbone:
            logger.info("%s has its own backbone; using %s instead as asked", path.name, Path(backbone_path).name)
        tensors = {k: v for k, v in tensors.items() if not k.startswith("backbone.")}
        tensors.update({f"backbone.{k}": v for k, v in backbone.state_dict().items()})
    elif not has_backbone:
        raise WeightFormatError(
            f"{path.name} holds only the projection MLPs (no face backbone). Choose the arcface_torch backbone "
            f"it was trained with ({_describe_backbone(config.backbone)}): put its .pt in models/dreamidentity and "
            "pick it as backbone_name on DreamID_LoadIDEncoder (command line: --backbone FILE).")
    encoder.load_state_dict(tensors, strict=True)
    encoder.provenance = provenance  # type: ignore[attr-defined]
    encoder.source_path = str(path)  # type: ignore[attr-defined]
    return encoder.to(device=device, dtype=dtype).eval()


def _describe_backbone(cfg: BackboneConfig) -> str:
    cls = ", CLS token" if cfg.cls_token else ""
    return f"ViT width {cfg.width}, depth {cfg.depth}, patch {cfg.patch_size}, {cfg.image_size} px{cls}"


# -- arcface_torch checkpoints ---------------------------------------------------------------

def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A plain state dict from ``.safetensors`` or, with ``weights_only=True``, a ``.pt``/``.pth``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        if _sniff_pickle(path):
            raise WeightFormatError(f"{path.name} is a pickle renamed .safetensors; refusing to unpickle it.")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightFormatError(f"{path.name} is not a readable safetensors file ({exc}).") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses arbitrary objects with an UnpicklingError
        raise WeightFormatError(
            f"{path.name} could not be read with torch.load(weights_only=True) ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Only plain state dicts are accepted, as "
            "arcface_torch publishes them (model.pt); whole pickled models are refused.") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightFormatError(f"{path.name} does not hold a state dict of tensors (got {type(obj).__name__}).")
    return dict(obj)


_BACKBONE_KEY = "patch_embed.proj.weight"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def _names_in_safetensors_header(path: Path) -> tuple[set[str], dict[str, str]] | None:
    """Tensor names and metadata from a safetensors header (reads only the header), or None."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= min(_MAX_HEADER, path.stat().st_size - 8):
                return None
            header = json.loads(fh.read(n))
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    meta = header.pop("__metadata__", None) or {}
    return set(header), meta if isinstance(meta, dict) else {}


def _names_in_torch_zip(path: Path) -> bytes | None:
    """The pickled index (``data.pkl``, keys only; tensor data are separate entries) of a torch zip file."""
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pkl or zf.getinfo(pkl[0]).file_size > _MAX_HEADER:
                return None
            return zf.read(pkl[0])
    except (OSError, zipfile.BadZipFile):
        return None


def is_backbone_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like an arcface_torch ViT state dict, from its header alone (nothing is
    unpickled or loaded): a safetensors file with ``patch_embed.proj.weight`` (any ``module.`` /
    ``backbone.`` prefix) and no DreamIdentity config; a torch zip ``.pt`` whose key index names it.
    Legacy (non-zip) ``.pt`` files cannot be read without unpickling and count as candidates."""
    path = Path(path)
    if path.suffix == ".safetensors":
        found = _names_in_safetensors_header(path)
        if found is None:
            return False
        names, meta = found
        return META_CONFIG not in meta and any(n == _BACKBONE_KEY or n.endswith("." + _BACKBONE_KEY) for n in names)
    if path.suffix in (".pt", ".pth"):
        if not zipfile.is_zipfile(path):
            return _sniff_pickle(path) is not None
        index = _names_in_torch_zip(path)
        return index is not None and _BACKBONE_KEY.encode() in index
    return False


def backbone_config_from_state_dict(sd: dict[str, torch.Tensor], image_size: int = 112,
                                    source: str = "checkpoint") -> BackboneConfig:
    """Shape an arcface_torch checkpoint's config from its tensors (it carries no config)."""
    try:
        width, _, patch, _ = sd["patch_embed.proj.weight"].shape
        pos = sd["pos_embed"].shape[1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        num_features = sd["feature.2.weight"].shape[0]
        hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as exc:
        raise WeightFormatError(
            f"{source} is not an arcface_torch ViT state dict (missing {exc}). Expected keys such as "
            "patch_embed.proj.weight, pos_embed, blocks.0.attn.qkv.weight, feature.0.weight.") from exc
    num_heads = 8  # every published arcface_torch ViT uses 8 heads; heads carry no parameters of their own
    cfg = BackboneConfig(image_size=image_size, patch_size=patch, width=width, depth=depth, num_heads=num_heads,
                         mlp_ratio=hidden / width, num_features=num_features,
                         qkv_bias="blocks.0.attn.qkv.bias" in sd, cls_token="cls_token" in sd)
    if pos != cfg.num_patches + int(cfg.cls_token):
        raise WeightFormatError(f"{source}: pos_embed has {pos} positions but {image_size} px / patch {patch} "
                                f"gives {cfg.num_patches}; pass the right image_size.")
    return cfg


def load_arcface_backbone(path: str | os.PathLike[str], config: BackboneConfig | None = None) -> FaceViT:
    """Load an insightface arcface_torch ViT checkpoint (``module.`` prefixes from DDP are removed)."""
    path = Path(path)
    sd = read_state_dict(path)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if all(k.startswith("backbone.") for k in sd):
        sd = {k.removeprefix("backbone."): v for k, v in sd.items()}
    config = config or backbone_config_from_state_dict(sd, source=path.name)
    with torch.device("meta"):
        expected = FaceViT(config).state_dict()
    _check_tensors(sd, expected, path.name, None,
                   hint=f"Expected an arcface_torch ViT with {_describe_backbone(config)}: is this the backbone "
                        "the encoder was trained with?")
    model = FaceViT(config)
    model.load_state_dict(sd, strict=True)
    return model.eval()
