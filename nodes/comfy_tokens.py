"""ComfyUI's tokenizers fed to ``dreamid_core.tokens``: a prompt with identities in it, tokenized like
``embedding:NAME`` (the core does the splicing; this file only reads ComfyUI's tokenizer and parser).

:func:`tokenize_with_identities` is the one entry point (InjectIDTokens, identity learning and
per-stage encoding all use it): ``identities`` maps a trigger word to its S* parts
``{"clip_l": [k, D], ...}``; the tensors are used as given (no copy), so gradients flow into them
when the caller encodes under ``torch.inference_mode(False)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from comfy import sd1_clip

from ..dreamid_core.errors import IncompatibleEncoderError
from ..dreamid_core.tokens import ChunkLayout, tokenize_prompt


@dataclass
class IdentityPrompt:
    """What :func:`tokenize_with_identities` found: per tokenizer key ("l", "h", "g") the flat context
    index of every identity row (``positions[key][trigger]``), and how often each trigger occurred."""

    positions: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def text_encoder(clip, key: str):
    """ComfyUI's tokenizer and text model for tokenizer key ``key`` ("l", "h", "g")."""
    tokenizer = getattr(clip.tokenizer, f"clip_{key}", None)
    model = getattr(clip.cond_stage_model, f"clip_{key}", None)
    if tokenizer is None or model is None:
        raise IncompatibleEncoderError(
            f"this CLIP ({type(clip.cond_stage_model).__name__}) has no clip_{key} text encoder; DreamIdentity "
            "supports SD1.x (clip_l), SD2.x (clip_h) and SDXL (clip_l + clip_g) CLIP models.")
    return tokenizer, model


def embedding_width(clip, key: str) -> int:
    _, model = text_encoder(clip, key)
    return int(model.transformer.get_input_embeddings().weight.shape[1])


def tokenizer_keys(clip) -> list[str]:
    """The CLIP's tokenizer keys in ComfyUI's order (SD1 ["l"], SD2 ["h"], SDXL ["g", "l"])."""
    return list(clip.tokenize("").keys())


#: a one-token trigger whose BPE id is below this is a frequent word in CLIP's training text ("man" is 786,
#: "person" 2533; rare triggers such as "sks" 48136 or "ohwx" 47993 are far above)
COMMON_TOKEN_LIMIT = 15000


def is_common_word(clip, trigger: str) -> bool:
    """True when ``trigger`` is one frequent whole-word token of the CLIP BPE (an ordinary word)."""
    tok, _ = text_encoder(clip, tokenizer_keys(clip)[0])
    ids = [t for chunk in tok.tokenize_with_weights(trigger, False, disable_weights=True) for t, _ in chunk
           if t not in (tok.start_token, tok.end_token, tok.pad_token)]
    return len(ids) == 1 and trigger.isalpha() and int(ids[0]) < COMMON_TOKEN_LIMIT


def _layout(tok, options: Mapping) -> ChunkLayout:
    key = getattr(tok, "embedding_key", "")
    return ChunkLayout(
        start_token=tok.start_token, end_token=tok.end_token, pad_token=tok.pad_token,
        max_length=tok.max_length, max_word_length=getattr(tok, "max_word_length", 8),
        pad_to_max_length=tok.pad_to_max_length,
        min_length=options.get(f"{key}_min_length", getattr(tok, "min_length", None)),
        min_padding=options.get(f"{key}_min_padding", getattr(tok, "min_padding", None)),
        pad_left=bool(getattr(tok, "pad_left", False)))


def _segments(tok, text: str) -> list[tuple[str, float]]:
    """ComfyUI's own prompt-weight parsing, as its tokenizer does it before looking at words."""
    if getattr(tok, "disable_weights", False):
        return [(text, 1.0)]
    return [(sd1_clip.unescape_important(s), w) for s, w in sd1_clip.token_weights(sd1_clip.escape_important(text), 1.0)]


def _piece_tokenizer(tok):
    """A text piece -> its word groups, by ComfyUI's tokenizer itself (so ``embedding:other`` in the
    piece is found as ComfyUI finds it); groups are read back from the word ids it assigns."""

    def tokenize_piece(piece: str) -> list[list]:
        groups: list[list] = []
        last = None
        for chunk in tok.tokenize_with_weights(piece, True, disable_weights=True):
            for token, _weight, word in chunk:
                if word == 0:
                    continue  # start, end, padding
                if word != last:
                    groups.append([])
                    last = word
                groups[-1].append(token)
        return groups

    return tokenize_piece


def tokenize_with_identities(clip, text: str, identities: Mapping[str, Mapping[str, torch.Tensor]], *,
                             require: bool = True) -> tuple[dict, IdentityPrompt]:
    """``clip.tokenize(text)`` with every trigger of ``identities`` replaced by its k vectors.

    ``identities``: trigger -> ``{"clip_l": [k, D], ...}`` (k = 0 switches the identity off: the trigger
    is dropped from the text). Raises when a trigger is missing from the text (``require``), or when an
    identity has no part, or the wrong width, for one of the CLIP's text encoders."""
    options = dict(getattr(clip, "tokenizer_options", {}) or {})
    tokens: dict = {}
    info = IdentityPrompt()
    for key in tokenizer_keys(clip):
        tok, _ = text_encoder(clip, key)
        width = embedding_width(clip, key)
        rows = {}
        for trigger, parts in identities.items():
            part = f"clip_{key}"
            if part not in parts:
                raise IncompatibleEncoderError(
                    f"the identity for {trigger!r} was made for {sorted(parts)}, but this CLIP has {part}. Use an "
                    "identity made for this model family (SD1.x: clip_l, SD2.x: clip_h, SDXL: clip_l + clip_g).")
            vec = parts[part]
            if vec.ndim != 2 or vec.shape[-1] != width:
                raise IncompatibleEncoderError(
                    f"the identity for {trigger!r} has {part} vectors of shape {tuple(vec.shape)}, but this CLIP's "
                    f"{part} word embeddings are {width} wide. Use an identity made for this checkpoint's text "
                    "encoder (SD1.x 768, SD2.x 1024, SDXL 768 + 1280).")
            rows[trigger] = list(vec.unbind(0))
        out = tokenize_prompt(_segments(tok, text), rows, _piece_tokenizer(tok), _layout(tok, options),
                              require=require, prompt=text)
        tokens[key] = out.chunks
        info.positions[key] = out.positions
        info.counts = out.counts
    return tokens, info
