"""Where the evaluation's S* comes from: an identity source gives, for a test face crop, the k
pseudo-words of each text encoder (``parts(crop) -> {"clip_h": [k, D], ...}``), plus ``k`` and
``fixed`` (True when every face gets the same S*, as with one textual-inversion embedding).

- :class:`EncoderIdentity`: a DreamIdentity encoder (one forward per face);
- :class:`EmbeddingIdentity`: one textual-inversion file, read by :func:`dreamid_core.identities.embedding_io.read_embedding`
  (the reader beside the writer, shared with the nodes' LoadIdentity): this pack's ``.safetensors``
  (``emb_params``; ``clip_l`` + ``clip_g`` for SDXL), diffusers ``learned_embeds`` (``{"<token>": [D] or
  [k, D]}``, ``.safetensors`` or ``.bin``) and A1111 ``.pt`` (``string_to_param``). Pickled files are read
  with ``torch.load(weights_only=True)`` only.

- :class:`LearnedIdentitySource`: identities learned by ``python -m training.learn_identity`` (either layout;
  plain textual-inversion files load as ``words``), one file for every test face or a folder with one file
  per face (``<face file stem>.safetensors``). Per-stage identities carry ``num_stages`` / ``stage_kind``
  for :class:`training.learn_identity.sampling.IdentityGenerator`.

A new way to obtain identities is another class with the same three members, chosen in
:func:`training.evaluate.cli.identity_source` (one per face: :mod:`training.evaluate.compare`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dreamid_core import WeightFormatError
from dreamid_core.encoder.identity import parts_from_crops
from dreamid_core.identities.embedding_io import read_embedding
from dreamid_core.identities.embeds import fit_parts
from dreamid_core.identities.learned_identity import load_learned_identity

from ..common.prompt_encoding import PART_FOR_ENCODER


class EncoderIdentity:
    """S* of each test face from a DreamIdentity encoder."""

    fixed = False

    def __init__(self, encoder: Any, widths: dict[str, int], scale: float = 1.0) -> None:
        probe = {k: torch.zeros(1, w) for k, w in encoder.config.widths.items()}  # what it makes, checked once
        fit_parts(probe, widths, f"the encoder (target {encoder.config.target!r})", "the base model")
        self.encoder, self.scale, self.widths = encoder, scale, widths
        self.k = encoder.config.num_tokens

    def parts(self, crop: torch.Tensor) -> dict[str, torch.Tensor]:
        s_star = parts_from_crops(self.encoder, crop[None], scale=self.scale)  # the node's and CLI's path
        return fit_parts(s_star, self.widths, "the encoder's S*", "the base model")


class EmbeddingIdentity:
    """One textual-inversion embedding, used for every test face."""

    fixed = True

    def __init__(self, path: str | Path, family: str, widths: dict[str, int]) -> None:
        path = Path(path)
        keys = PART_FOR_ENCODER[family]
        tensors = read_embedding(path, single_key=keys[0] if len(keys) == 1 else None)
        parts = fit_parts(tensors, widths, path.name, "the base model")
        if len({t.shape[0] for t in parts.values()}) != 1:
            raise WeightFormatError(f"{path.name}: its tensors disagree on k: {[tuple(t.shape) for t in parts.values()]}")
        self._parts = parts
        self.k = next(iter(parts.values())).shape[0]

    def parts(self, crop: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._parts


class LearnedIdentitySource:
    """Learned identities (or TI files) as an evaluation identity source: one file for every face, or a
    folder with one file per test face."""

    def __init__(self, path: str | Path, widths: dict[str, int], faces: dict[str, torch.Tensor] | None = None) -> None:
        path = Path(path)
        single = next(iter(widths)) if len(widths) == 1 else None
        faces = faces or {}
        if path.is_file():
            files: dict[str, Path] = {}  # the one identity serves every face
            self.fixed = True
        elif path.is_dir():
            if not faces:
                raise ValueError(f"{path} is a folder of per-face identities; evaluate it with python -m "
                                 "training.evaluate_identities --method NAME=identity:FOLDER (or pass one file)")
            files = {name: path / f"{name}.safetensors" for name in faces}
            missing = [n for n, f in files.items() if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{path} has no identity for test face(s) {missing}; learn one per face, e.g. "
                                        f"python -m training.learn_identity --photos <faces>/{missing[0]}.png --out "
                                        f"{path}/{missing[0]}.safetensors")
            self.fixed = False
        else:
            raise FileNotFoundError(f"identity file or folder not found: {path}")
        loaded = {f: load_learned_identity(f, single_key=single) for f in ({path} if self.fixed else set(files.values()))}
        for f, ident in loaded.items():
            ident.tensors = fit_parts(ident.tensors, widths, f"identity {f.name}", "the base model")
        kinds = {(i.layout, i.num_tokens, i.config.num_stages if i.layout == "per_stage" else 1,
                  i.config.stage_kind if i.layout == "per_stage" else "-") for i in loaded.values()}
        if len(kinds) != 1:
            raise ValueError(f"the identities in {path} differ in layout / k / stages: {sorted(kinds)}; evaluate "
                             "each kind as its own --method")
        self.layout, self.k, self.num_stages, self.stage_kind = kinds.pop()
        self._faces = faces
        self._tensors = {name: loaded[f].tensors for name, f in files.items()}
        self._single = loaded[path].tensors if self.fixed else None
        seconds = [i.config.extra.get("seconds") for i in loaded.values()]
        self.learn_seconds = (sum(seconds) / len(seconds)) if all(isinstance(s, (int, float)) for s in seconds) else None
        self.description = (f"learned identity ({self.layout}, k={self.k}"
                            + (f", {self.num_stages} {self.stage_kind} stages" if self.layout == "per_stage" else "")
                            + (", the same for every face)" if self.fixed else ", one per test face)"))

    def parts(self, crop: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._single is not None:
            return self._single
        for name, face in self._faces.items():
            if face is crop or (face.shape == crop.shape and torch.equal(face, crop)):
                return self._tensors[name]
        raise KeyError("the crop is none of the test faces this identity source was built for")
