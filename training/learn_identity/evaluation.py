"""Learned identities as an evaluation identity source (:mod:`training.evaluate.identity_sources`'s protocol:
``parts(crop)``, ``k``, ``fixed``), for ``python -m training.evaluate --identity`` and
``python -m training.evaluate_identities``: one file for every test face, or a folder with one file per
face (``<face file stem>.safetensors``). Either layout; plain textual-inversion files load as ``words``.
Per-stage identities carry ``num_stages`` / ``stage_kind`` for
:class:`training.learn_identity.sampling.IdentityGenerator`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dreamid_core.learned_identity import load_learned_identity

from .init import check_widths


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
            check_widths(ident.tensors, widths, f"identity {f.name}")
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
