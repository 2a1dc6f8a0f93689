"""ComfyUI's tokenizers fed to ``dreamid_core.identities.tokens``: a prompt with identities in it, tokenized like
``embedding:NAME`` (the core does the splicing; this file only reads ComfyUI's tokenizer and parser).

:func:`tokenize_with_identities` is the one entry point (InjectIDTokens, identity learning and
per-stage encoding all use it): ``identities`` maps a trigger word to its S* parts
``{"clip_l": [k, D], ...}``; the tensors are used as given (no copy), so gradients flow into them
when the caller encodes under ``torch.inference_mode(False)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from comfy import sd1_clip

from ...dreamid_core.errors import IncompatibleEncoderError
from ...dreamid_core.identities.embeds import fit_parts
from ...dreamid_core.identities.families import SUPPORTED, check_word_identities, family_of
from ...dreamid_core.identities.tokens import ChunkLayout, TokenizePiece, tokenize_prompt

if TYPE_CHECKING:
    from comfy.sd import CLIP


@dataclass
class IdentityPrompt:
    """What :func:`tokenize_with_identities` found: per tokenizer key ("l", "h", "g") the flat context
    index of every identity row (``positions[key][trigger]``), and how often each trigger occurred."""

    positions: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def text_encoder(clip: CLIP, key: str) -> tuple[sd1_clip.SDTokenizer, sd1_clip.SDClipModel]:
    """ComfyUI's tokenizer and text model for the token-dict key ``key`` ("l", "h", "g", "t5xxl"): the
    tokenizer objects are attributes ``clip_<key>`` (CLIP towers) or ``<key>`` (T5) of ``clip.tokenizer``, the
    models the same of ``clip.cond_stage_model``."""
    for name in (f"clip_{key}", key):
        tokenizer = getattr(clip.tokenizer, name, None)
        model = getattr(clip.cond_stage_model, name, None)
        if tokenizer is not None and model is not None:
            return tokenizer, model
    raise IncompatibleEncoderError(
        f"this CLIP ({type(clip.cond_stage_model).__name__}) has no loaded text encoder for its {key!r} tokens; "
        f"word identities work on {SUPPORTED}.")


def part_key(clip: CLIP, key: str) -> str:
    """The identity part (ComfyUI's ``embedding_key``) of token-dict key ``key``: "clip_l", …, "t5xxl"."""
    tok, _ = text_encoder(clip, key)
    return str(getattr(tok, "embedding_key", f"clip_{key}"))


def embedding_width(clip: CLIP, key: str) -> int:
    _, model = text_encoder(clip, key)
    return int(model.transformer.get_input_embeddings().weight.shape[1])


def tokenizer_keys(clip: CLIP) -> list[str]:
    """The CLIP's token-dict keys in ComfyUI's order (SD1 ["l"], SD2 ["h"], SDXL ["g", "l"], FLUX ["l", "t5xxl"]);
    refused (naming the family and what works) when one of its text encoders cannot take a word identity."""
    keys = list(clip.tokenize("").keys())
    check_word_identities([part_key(clip, k) for k in keys], f"this CLIP ({type(clip.cond_stage_model).__name__})")
    return keys


def part_widths(clip: CLIP) -> dict[str, int]:
    """``{part key: word-embedding width}`` of every text encoder of the CLIP."""
    return {part_key(clip, k): embedding_width(clip, k) for k in tokenizer_keys(clip)}


#: a one-token trigger whose BPE id is below this is a frequent word in CLIP's training text ("man" is 786,
#: "person" 2533; rare triggers such as "sks" 48136 or "ohwx" 47993 are far above)
COMMON_TOKEN_LIMIT = 15000


def is_common_word(clip: CLIP, trigger: str) -> bool:
    """True when ``trigger`` is one frequent whole-word token of the CLIP BPE (an ordinary word)."""
    tok, _ = text_encoder(clip, tokenizer_keys(clip)[0])
    if "CLIP" not in type(tok.tokenizer).__name__:
        return False  # the frequency rule below reads CLIP's BPE ids
    ids = [t for chunk in tok.tokenize_with_weights(trigger, False, disable_weights=True) for t, _ in chunk
           if t not in (tok.start_token, tok.end_token, tok.pad_token)]
    return len(ids) == 1 and trigger.isalpha() and int(ids[0]) < COMMON_TOKEN_LIMIT


def _layout(tok: sd1_clip.SDTokenizer, options: Mapping[str, Any]) -> ChunkLayout:
    key = getattr(tok, "embedding_key", "")
    return ChunkLayout(
        start_token=tok.start_token, end_token=tok.end_token, pad_token=tok.pad_token,
        max_length=tok.max_length, max_word_length=getattr(tok, "max_word_length", 8),
        pad_to_max_length=tok.pad_to_max_length,
        min_length=options.get(f"{key}_min_length", getattr(tok, "min_length", None)),
        min_padding=options.get(f"{key}_min_padding", getattr(tok, "min_padding", None)),
        pad_left=bool(getattr(tok, "pad_left", False)))


def _segments(tok: sd1_clip.SDTokenizer, text: str) -> list[tuple[str, float]]:
    """ComfyUI's own prompt-weight parsing, as its tokenizer does it before looking at words."""
    if getattr(tok, "disable_weights", False):
        return [(text, 1.0)]
    return [(sd1_clip.unescape_important(s), w) for s, w in sd1_clip.token_weights(sd1_clip.escape_important(text), 1.0)]


def _piece_tokenizer(tok: sd1_clip.SDTokenizer) -> TokenizePiece:
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


def tokenize_with_identities(clip: CLIP, text: str, identities: Mapping[str, Mapping[str, torch.Tensor]], *,
                             require: bool = True) -> tuple[dict[str, list[list[tuple]]], IdentityPrompt]:
    """``clip.tokenize(text)`` with every trigger of ``identities`` replaced by its k vectors.

    ``identities``: trigger -> ``{"clip_l": [k, D], ...}`` (k = 0 switches the identity off: the trigger
    is dropped from the text). Raises when a trigger is missing from the text (``require``), or when an
    identity has no part, or the wrong width, for one of the CLIP's text encoders."""
    options = dict(getattr(clip, "tokenizer_options", {}) or {})
    tokens: dict = {}
    info = IdentityPrompt()
    widths = part_widths(clip)
    where = f"this CLIP ({type(clip.cond_stage_model).__name__}, {family_of(widths)})"
    fitted = {trigger: fit_parts(parts, widths, f"the identity for {trigger!r}", where)
              for trigger, parts in identities.items()}
    for key in tokenizer_keys(clip):
        tok, _ = text_encoder(clip, key)
        part = part_key(clip, key)
        rows = {}
        for trigger, parts in fitted.items():
            vec = parts[part]
            if vec.ndim != 2:
                raise IncompatibleEncoderError(f"the identity for {trigger!r} has {part} vectors of shape "
                                               f"{tuple(vec.shape)}; an identity to splice is [k, width]")
            rows[trigger] = list(vec.unbind(0))
        out = tokenize_prompt(_segments(tok, text), rows, _piece_tokenizer(tok), _layout(tok, options),
                              require=require, prompt=text)
        tokens[key] = out.chunks
        info.positions[key] = out.positions
        info.counts = out.counts
    return tokens, info
