"""The two scores of the paper's evaluation and data filter, from local model files only.

- :class:`IdentityScorer`: identity cosine between aligned 112x112 faces, with either an
  insightface arcface_torch ViT checkpoint (``.pt`` read with ``weights_only=True``, or
  ``.safetensors``; loaded by :func:`dreamid_core.load_arcface_backbone`) or an insightface
  recognition ONNX model (``glintr100.onnx`` from antelopev2, ``w600k_r50.onnx`` from buffalo_l)
  run by onnxruntime. Embeddings are L2-normalised; a face with itself scores 1.
- :class:`ClipScorer`: raw cosine between CLIP text and image embeddings (no ×100, no clamp at 0),
  the text-alignment number of the literature (~0.2-0.3 with OpenAI CLIP ViT-B/32), from a
  transformers ``CLIPModel`` folder (``config.json``, weights, tokenizer and preprocessor files).

Both load on first use, so building them costs nothing until a score is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dreamid_core import MissingDependencyError, ModelFilesError, WeightFormatError, load_arcface_backbone
from dreamid_core.faces.runtime import check_onnxruntime, provider_options, select_providers

logger = logging.getLogger(__name__)

_FACE_EXPECTED = ("an insightface arcface_torch ViT checkpoint (.pt/.pth state dict, or .safetensors) or an "
                  "insightface recognition model (.onnx, e.g. glintr100.onnx from antelopev2 or w600k_r50.onnx "
                  "from buffalo_l)")


def _as_batch(crops: torch.Tensor, size: int = 112) -> torch.Tensor:
    if crops.ndim == 3:
        crops = crops[None]
    if crops.ndim != 4 or crops.shape[1:] != (3, size, size):
        raise ValueError(f"identity scoring expects aligned faces [N, 3, {size}, {size}] in 0..1 (as "
                         f"FacePipeline gives), got {tuple(crops.shape)}")
    return crops.float()


class _OnnxRecognizer:
    """insightface recognition ONNX: RGB NCHW, (x*255 - mean) / std, as insightface's ArcFaceONNX does."""

    def __init__(self, path: Path, provider: str, device: object = None) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise MissingDependencyError(f"{path.name} is an ONNX model and needs onnxruntime ({exc}): pip install "
                                         "onnxruntime (or onnxruntime-gpu alone), or give an arcface_torch .pt") from exc
        check_onnxruntime()
        providers, note = select_providers(provider, onnxruntime.get_available_providers())
        if note:
            logger.warning(note)
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=providers,  # on the scorer's GPU
                                                        provider_options=provider_options(providers, device))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise WeightFormatError(f"{path} could not be opened by onnxruntime ({exc}); expected "
                                    f"{_FACE_EXPECTED}. Download it again if it is truncated.") from exc
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.size = inp.shape[2] if isinstance(inp.shape[2], int) else 112
        self.mean, self.std = self._normalisation(path)

    @staticmethod
    def _normalisation(path: Path) -> tuple[float, float]:
        """mxnet-converted models normalise inside the graph (Sub and Mul first); the others take
        (x - 127.5) / 127.5 — insightface's rule."""
        try:
            import onnx
        except ImportError:
            return 127.5, 127.5
        nodes = onnx.load(str(path), load_external_data=False).graph.node[:8]
        sub = any(n.name.startswith(("Sub", "_minus")) for n in nodes)
        mul = any(n.name.startswith(("Mul", "_mul")) for n in nodes)
        return (0.0, 1.0) if sub and mul else (127.5, 127.5)

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        if crops.shape[-1] != self.size:
            crops = F.interpolate(crops, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = ((crops.cpu().numpy() * 255.0 - self.mean) / self.std).astype(np.float32)  # [N, 3, S, S] RGB
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0]).float()


class IdentityScorer:
    """Identity cosine between aligned faces (``[N, 3, 112, 112]`` float 0..1, RGB)."""

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu", provider: str = "auto",
                 batch_size: int = 64) -> None:
        self.path = Path(path).expanduser()
        self.device = torch.device(device)
        self.provider = provider
        self.batch_size = batch_size
        self._model: Any = None

    def load(self) -> IdentityScorer:
        if self._model is not None:
            return self
        path = self.path
        if not path.is_file():
            raise ModelFilesError(f"face recognition model not found: {path}. Expected {_FACE_EXPECTED}; "
                                  "nothing is downloaded, give a local file with --face-model.")
        if path.suffix == ".onnx":
            self._model = _OnnxRecognizer(path, self.provider, self.device)
        elif path.suffix in (".pt", ".pth", ".safetensors"):
            try:
                backbone = load_arcface_backbone(path)
            except WeightFormatError as exc:
                raise WeightFormatError(f"{exc} Only arcface_torch ViT checkpoints load here; for a ResNet "
                                        "(iresnet100, r50) use insightface's ONNX export instead "
                                        "(glintr100.onnx / w600k_r50.onnx).") from exc
            self._model = backbone.to(self.device).eval()
        else:
            raise ModelFilesError(f"{path.name}: unsupported face model type {path.suffix!r}; expected {_FACE_EXPECTED}.")
        logger.info("identity scorer: %s", path)
        return self

    @torch.inference_mode()
    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        """Aligned faces -> L2-normalised identity embeddings ``[N, D]`` (on the CPU)."""
        self.load()
        crops = _as_batch(crops)
        out = []
        for chunk in crops.split(self.batch_size):
            if isinstance(self._model, _OnnxRecognizer):
                feats = self._model(chunk)
            else:
                feats = self._model(chunk.to(self.device)).identity.float().cpu()
            out.append(F.normalize(feats, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 0)

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine of the identities of faces ``a`` and ``b`` (``[N, 3, 112, 112]`` each, or one of them
        ``[3, 112, 112]``/``N == 1`` to compare against all): ``[N]`` in -1..1."""
        ea, eb = self.embed(a), self.embed(b)
        return cosine(ea, eb)


def cosine(ea: torch.Tensor, eb: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of two embedding batches (broadcasting a batch of one)."""
    if ea.shape[0] != eb.shape[0] and 1 not in (ea.shape[0], eb.shape[0]):
        raise ValueError(f"cannot compare {ea.shape[0]} faces with {eb.shape[0]}; give equal counts or one face")
    return (F.normalize(ea, dim=-1) * F.normalize(eb, dim=-1)).sum(-1)


def _pooled(out: Any) -> torch.Tensor:
    """transformers 4 returns a tensor from get_*_features, transformers 5 an output with pooler_output."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """Raw CLIP cosine between texts and images, from a local transformers ``CLIPModel`` folder."""

    def __init__(self, folder: str | Path, *, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        self.folder = Path(folder).expanduser()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._model: Any = None
        self._processor: Any = None

    def load(self) -> ClipScorer:
        if self._model is not None:
            return self
        folder = self.folder
        expected = ("a transformers CLIPModel folder (config.json, model.safetensors, tokenizer files and "
                    "preprocessor_config.json), e.g. a local copy of openai/clip-vit-base-patch32 — the model "
                    "the literature's text-alignment numbers use")
        if not (folder / "config.json").is_file():
            raise ModelFilesError(f"CLIP model not found at {folder} (no config.json). Expected {expected}; "
                                  "nothing is downloaded, give a local folder with --clip-model.")
        try:
            from transformers import CLIPModel, CLIPProcessor
        except ImportError as exc:
            raise MissingDependencyError(f"CLIP scores need transformers ({exc}): pip install -e '.[train]'") from exc
        try:
            self._model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(self.device).eval()
            self._processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelFilesError(f"{folder} could not be loaded as a CLIP model ({exc}). Expected {expected}.") from exc
        logger.info("CLIP scorer: %s", folder)
        return self

    @torch.inference_mode()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        self.load()
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self._processor(text=list(texts[i:i + self.batch_size]), return_tensors="pt", padding=True,
                                    truncation=True)
            feats = _pooled(self._model.get_text_features(input_ids=batch["input_ids"].to(self.device),
                                                          attention_mask=batch["attention_mask"].to(self.device)))
            out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def image_embeds(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images (any size; the processor resizes and centre-crops) -> normalised embeddings."""
        self.load()
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = self._processor(images=[im.convert("RGB") for im in images[i:i + self.batch_size]],
                                    return_tensors="pt")
            feats = _pooled(self._model.get_image_features(pixel_values=batch["pixel_values"].to(self.device)))
            out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out)

    def score(self, images: Sequence[Any], texts: Sequence[str]) -> torch.Tensor:
        """Cosine of image i with text i: ``[N]``. One text may be given for all images."""
        if len(texts) not in (1, len(images)):
            raise ValueError(f"ClipScorer.score: {len(images)} images but {len(texts)} texts; give one text per "
                             "image, or one for all")
        if not images:
            return torch.zeros(0)
        return cosine(self.image_embeds(images), self.text_embeds(texts))
