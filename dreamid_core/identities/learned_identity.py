"""A learned identity (both layouts) and its file format; also reads plain textual-inversion files.

API
- ``LAYOUTS = ("words", "per_stage")``; ``IDENTITY_FORMAT_VERSION``.
- ``IdentityConfig``: how the identity was made (layout, num_tokens k, num_stages S, stage_kind,
  target family, init "encoder" | "word:<w>" | "file:<name>", class_word, steps, lr, attn_weight,
  seed, resolution, base_model, base_model_hash, format_version). ``to_json()`` / ``from_json()``
  (unknown fields and newer versions refused).
- ``LearnedIdentity(config, tensors)``: tensors per text encoder key ("clip_l", "clip_h", "clip_g"):
  ``words`` -> ``[k, D]`` (S* exactly as the encoder gives it); ``per_stage`` -> ``[S, 2, k, D]``
  (index 0 feeds the cross-attention KEYS, 1 the VALUES), all in the text encoder's INPUT
  word-embedding space. Methods: ``to_embeds()`` (words -> ``IdentityEmbeds``), ``stage_vectors(stage,
  kv)`` -> ``{key: [k, D]}`` (kv "key"/"value" or 0/1; a words identity returns S* for every stage),
  ``LearnedIdentity.words(parts, config)``, ``LearnedIdentity.per_stage_from_words(parts, config)``
  (every stage's K and V = the given S*), ``num_tokens``, ``widths``.
- ``save_learned_identity(path, ident, overwrite=False) -> Path``: atomic. ``words`` -> a standard
  textual-inversion file (``emb_params`` or ``clip_l`` + ``clip_g``) so ``embedding:NAME`` works;
  ``per_stage`` -> ``{key: [S, 2, k, D]}``. Metadata ``dreamid_identity`` = the config as JSON.
- ``load_learned_identity(path, single_key=None) -> LearnedIdentity``: the pack's files are rebuilt
  from their metadata; plain TI files become a ``words`` identity: ``.safetensors`` with
  ``emb_params`` / ``clip_l`` + ``clip_g`` / ``clip_h`` / ``string_to_param.*``, diffusers
  ``learned_embeds`` ``{"<tok>": t}``; A1111 / diffusers ``.pt`` / ``.bin`` ONLY via
  ``torch.load(weights_only=True)`` (a pickle that needs more is refused). A single unnamed tensor goes
  to ``single_key`` when given, else to the encoder its width names (768 clip_l, 1024 clip_h,
  1280 clip_g), else it is an error asking for ``single_key``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, WeightFormatError
from ..fileio import atomic_save_safetensors, check_format_version, safetensors_target, unknown_fields
from .embedding_io import embedding_parts, embedding_tensors, read_embedding_file
from .embeds import IdentityEmbeds
from .families import FAMILY_PARTS, family_of

logger = logging.getLogger(__name__)

LAYOUTS = ("words", "per_stage")
#: how a per-stage identity picks its stage: by denoising time or by UNet block (dreamid_core.learning.stages)
STAGE_KINDS = ("time", "unet")
#: how the vectors' norms were learned: "vocabulary" = each vector kept at the median norm of the text encoder's
#: word embeddings, only its direction learned (Directional Textual Inversion); "free" = plain textual inversion
NORMS = ("vocabulary", "free")
IDENTITY_FORMAT_VERSION = 1
META_KEY = "dreamid_identity"
KV_INDEX = {"key": 0, "value": 1, 0: 0, 1: 1}


@dataclass
class IdentityConfig:
    """How a learned identity was made; written as JSON into its file."""

    layout: str = "words"
    num_tokens: int = 2
    num_stages: int = 5
    stage_kind: str = "time"
    target: str = "unknown"
    init: str = "word:person"
    class_word: str = "person"
    steps: int = 0
    lr: float = 5e-3
    attn_weight: float = 0.003
    seed: int = 0
    resolution: int = 512
    base_model: str | None = None
    base_model_hash: str | None = None
    norm: str = "free"  # files written before norms were chosen were learned free
    format_version: int = IDENTITY_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.stage_kind not in STAGE_KINDS:
            raise ConfigError(f"stage_kind must be one of {STAGE_KINDS}, got {self.stage_kind!r}")
        if not (isinstance(self.num_tokens, int) and self.num_tokens >= 1):
            raise ConfigError(f"num_tokens must be an integer >= 1, got {self.num_tokens!r}")
        if not (isinstance(self.num_stages, int) and self.num_stages >= 1):
            raise ConfigError(f"num_stages must be an integer >= 1, got {self.num_stages!r}")
        if self.norm not in NORMS:
            raise ConfigError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not (self.init == "encoder" or self.init.startswith(("word:", "file:"))):
            raise ConfigError(f"init must be 'encoder', 'word:<word>' or 'file:<name>', got {self.init!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str, source: str = "metadata") -> IdentityConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WeightFormatError(f"{source}: the identity config is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise WeightFormatError(f"{source}: the identity config is {type(data).__name__}, expected an object")
        check_format_version(data.get("format_version"), source, "identity", IDENTITY_FORMAT_VERSION)
        unknown = unknown_fields(cls, data)
        if unknown:
            raise WeightFormatError(f"{source}: unknown identity config fields {unknown}; written by a newer "
                                    "DreamIdentity? Update the pack to load it.")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise WeightFormatError(f"{source}: invalid identity config: {exc}") from exc


RESUME_KEY = "dreamid_resume"


@dataclass
class ResumeState:
    """What continuing a learning run needs besides the vectors (a snapshot's, see the module docstring).

    ``step``: steps done (the next one to run); ``optimizer``: Adam's moments per text encoder key
    (``{"clip_l": {"exp_avg": t, "exp_avg_sq": t}}``, the vectors' shapes) and ``optimizer_steps`` its step
    count per key; ``run``: the run's settings that the identity config does not hold (batch size,
    augmentation, photos digest, run id), compared when a run is resumed."""

    step: int
    optimizer: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    optimizer_steps: dict[str, float] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{RESUME_KEY}.{key}.{name}": t.detach().to("cpu", torch.float32).contiguous()
                for key, moments in self.optimizer.items() for name, t in moments.items()}

    def metadata(self) -> str:
        return json.dumps({"step": self.step, "optimizer_steps": self.optimizer_steps, "run": self.run},
                          sort_keys=True, default=str)

    @classmethod
    def read(cls, meta: str, raw: dict[str, torch.Tensor], source: str) -> ResumeState:
        try:
            data = json.loads(meta)
            step, steps, run = int(data["step"]), {k: float(v) for k, v in data["optimizer_steps"].items()}, data["run"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise WeightFormatError(f"{source}: its resume state is unreadable ({exc}); load it as an identity "
                                    "without resuming, or use another snapshot") from exc
        optimizer: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in raw.items():
            _, key, moment = name.split(".", 2)
            optimizer.setdefault(key, {})[moment] = t.to(torch.float32)
        return cls(step, optimizer, steps, run if isinstance(run, dict) else {})


@dataclass
class LearnedIdentity:
    """An identity: ``config`` plus tensors per text encoder (see the module docstring for shapes), and
    for a learning run's snapshot the :class:`ResumeState` that continues it."""

    config: IdentityConfig
    tensors: dict[str, torch.Tensor]
    resume: ResumeState | None = None

    def __post_init__(self) -> None:
        if not self.tensors:
            raise WeightFormatError("a learned identity needs at least one text encoder's tensors")
        c = self.config
        for key, t in self.tensors.items():
            want = 2 if c.layout == "words" else 4
            if t.ndim != want or t.shape[-2] != c.num_tokens or (
                    c.layout == "per_stage" and tuple(t.shape[:2]) != (c.num_stages, 2)):
                shape = "[k, D]" if c.layout == "words" else "[S, 2, k, D]"
                raise WeightFormatError(
                    f"identity tensor {key} has shape {tuple(t.shape)}; a {c.layout} identity with k={c.num_tokens}, "
                    f"S={c.num_stages} needs {shape}")
            if not torch.isfinite(t).all():
                raise WeightFormatError(f"identity tensor {key} holds NaN or infinity; re-learn the identity")

    @property
    def layout(self) -> str:
        return self.config.layout

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def widths(self) -> dict[str, int]:
        return {k: int(v.shape[-1]) for k, v in self.tensors.items()}

    @classmethod
    def words(cls, parts: dict[str, torch.Tensor], config: IdentityConfig | None = None) -> LearnedIdentity:
        parts = {k: v.detach().to("cpu", torch.float32).clone() for k, v in parts.items()}
        k = next(iter(parts.values())).shape[0]
        config = dataclasses.replace(config or IdentityConfig(), layout="words", num_tokens=k)
        return cls(config, parts)

    @classmethod
    def per_stage_from_words(cls, parts: dict[str, torch.Tensor],
                             config: IdentityConfig | None = None) -> LearnedIdentity:
        """Every stage's key and value set = the given S* (``{key: [k, D]}``)."""
        config = dataclasses.replace(config or IdentityConfig(), layout="per_stage")
        config.num_tokens = next(iter(parts.values())).shape[0]
        tensors = {k: v.detach().to("cpu", torch.float32)[None, None].expand(config.num_stages, 2, -1, -1).clone()
                   for k, v in parts.items()}
        return cls(config, tensors)

    def to_embeds(self) -> IdentityEmbeds:
        """A ``words`` identity as DREAMID_EMBEDS (InjectIDTokens, SaveIDEmbedding take it unchanged)."""
        if self.layout != "words":
            raise ValueError("a per_stage identity has different vectors per stage and for keys and values; it is "
                             "not one S*. Apply it with DreamID_ApplyPerStageIdentity, or learn with layout 'words'.")
        info = {"target": self.config.target, "learned": True, "init": self.config.init, "steps": self.config.steps}
        return IdentityEmbeds(parts={k: v.clone() for k, v in self.tensors.items()}, info=info)

    def stage_vectors(self, stage: int, kv: str | int) -> dict[str, torch.Tensor]:
        """``{key: [k, D]}`` for ``stage`` and ``kv`` ("key"/0 or "value"/1). Tensors are not copied."""
        if kv not in KV_INDEX:
            raise ValueError(f"kv must be 'key', 'value', 0 or 1, got {kv!r}")
        if self.layout == "words":
            return dict(self.tensors)
        if not 0 <= stage < self.config.num_stages:
            raise ValueError(f"stage {stage} out of range 0..{self.config.num_stages - 1}")
        return {k: v[stage, KV_INDEX[kv]] for k, v in self.tensors.items()}


def save_learned_identity(path: str | os.PathLike[str], ident: LearnedIdentity, *, overwrite: bool = False,
                          label: str | None = None) -> Path:
    """Write ``ident`` atomically and byte-reproducibly as ``.safetensors`` (see the module docstring for the
    keys): THE writer of the pack's identity and textual-inversion files. ``label`` names the file in a refusal
    (e.g. relative to its models folder)."""
    path = safetensors_target(path, overwrite=overwrite, label=label)
    if ident.layout == "words":
        tensors = embedding_tensors(ident.tensors)
    else:
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in ident.tensors.items()}
    meta = {"format": "pt", META_KEY: ident.config.to_json()}
    if ident.resume is not None:
        tensors.update(ident.resume.tensors())
        meta[RESUME_KEY] = ident.resume.metadata()
    atomic_save_safetensors(tensors, path, meta)
    logger.info("wrote %s identity %s (%s)", ident.layout, path,
                ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()))
    return path


def write_embedding(path: str | os.PathLike[str], parts: dict[str, torch.Tensor], *, overwrite: bool = False,
                    metadata: dict[str, Any] | None = None, label: str | None = None) -> Path:
    """S* (``{key: [k, D]}``, e.g. an encoder's) as a standard textual-inversion file, through the one writer
    (:func:`save_learned_identity`): a ``words`` identity whose config records where it came from
    (``metadata``, e.g. the encoder's report, goes to ``extra``)."""
    info = dict(metadata or {})
    source = info.get("source")
    config = IdentityConfig(layout="words", num_tokens=next(iter(parts.values())).shape[0],
                            target=str(info.get("target") or family_of(parts)),
                            init="encoder" if "scale" in info or not source else f"file:{source}",
                            steps=int(info.get("steps") or 0), extra=info)
    return save_learned_identity(path, LearnedIdentity(config, {k: v.detach().to("cpu", torch.float32).clone()
                                                               for k, v in parts.items()}),
                                 overwrite=overwrite, label=label)


def load_learned_identity(path: str | os.PathLike[str], *, single_key: str | None = None,
                          label: str | None = None) -> LearnedIdentity:
    """Read a pack identity file or a plain textual-inversion file (see the module docstring). Messages name
    the file as ``label`` when given (the nodes pass its name relative to its models folder)."""
    path = Path(path)
    source = label or str(path)
    raw, meta = read_embedding_file(path, label=label)
    resume_raw = {k: raw.pop(k) for k in [k for k in raw if k.startswith(RESUME_KEY + ".")]}
    if META_KEY in meta:
        config = IdentityConfig.from_json(meta[META_KEY], source=source)
        resume = ResumeState.read(meta[RESUME_KEY], resume_raw, source) if RESUME_KEY in meta else None
        keys = list(FAMILY_PARTS.get(config.target, ()))
        if single_key is None and len(keys) == 1:
            single_key = keys[0]  # the file says which family it was learned on: its one tensor is that encoder's
        tensors = embedding_parts(raw, single_key=single_key, source=source) if config.layout == "words" else {
            k: v.to(torch.float32) for k, v in raw.items()}
        try:
            return LearnedIdentity(config, tensors, resume)
        except WeightFormatError as exc:
            raise WeightFormatError(f"{source}: {exc}") from exc
    parts = embedding_parts(raw, single_key=single_key, source=source)
    for key, t in parts.items():
        if not torch.isfinite(t).all() or not math.isfinite(float(t.abs().max())):
            raise WeightFormatError(f"{source}: embedding {key} holds NaN or infinity")
    target = family_of(parts)
    try:
        info = json.loads(meta.get("dreamid", "{}"))
        target = info.get("target", target) if isinstance(info, dict) else target
    except json.JSONDecodeError:
        pass
    config = IdentityConfig(layout="words", num_tokens=next(iter(parts.values())).shape[0], target=str(target),
                            init=f"file:{path.name}")
    return LearnedIdentity(config, parts)
