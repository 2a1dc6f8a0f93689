"""S* into a transformers CLIP text encoder, at the word-embedding input (works with transformers 5).

transformers 5 removed ``inputs_embeds`` from ``CLIPTextModel``; a forward hook on
``get_input_embeddings()`` that returns the embedding output with the S* rows written in works
in training and in diffusers pipelines, and carries gradients to the encoder's MLPs.

Prompts are tokenized by the same function as the ComfyUI node (:func:`dreamid_core.tokenize_prompt`):
the trigger is found in the TEXT (``S*,`` and ``(S*)`` included), the text around it is tokenized piece by
piece and each occurrence gets k slots, so k need not equal the trigger's token count.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dreamid_core import ChunkLayout, TriggerNotFoundError, check_trigger, tokenize_prompt
from dreamid_core.identities.families import FAMILY_PARTS

#: the S* part key of each text encoder of a family, in the pipelines' order (the family table)
PART_FOR_ENCODER = FAMILY_PARTS


@dataclass
class TokenizedPrompts:
    input_ids: torch.Tensor  # [B, L] long, with a placeholder id at S* positions
    positions: list[list[int]]  # per prompt: positions of S* rows (occurrence-major, k per occurrence)


def _piece_tokenizer(tokenizer):
    def tokenize_piece(piece: str) -> list[list[int]]:
        ids = tokenizer(piece, add_special_tokens=False).input_ids
        return [list(ids)] if ids else []
    return tokenize_piece


def tokenize_with_trigger(tokenizer, prompts: Sequence[str], trigger: str, k: int | None,
                          *, require_trigger: bool = True) -> TokenizedPrompts:
    """Tokenize ``prompts`` to the tokenizer's max length with each trigger replaced by k slots.

    ``k`` None: plain tokenization (the trigger stays as text, no positions). A prompt longer than one
    chunk is cut at the end like the tokenizer cuts it; a trigger past the cut is an error."""
    max_len = tokenizer.model_max_length
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    trigger = check_trigger(trigger)
    placeholder = tokenizer(trigger, add_special_tokens=False).input_ids[0]
    # one unpadded chunk of unlimited length, then cut to max_len like the tokenizer's truncation
    layout = ChunkLayout(start_token=bos, end_token=None, pad_token=pad, max_length=10**9, pad_to_max_length=False)
    rows, positions = [], []
    for prompt in prompts:
        if k is None:
            ids, pos = [bos] + tokenizer(prompt, add_special_tokens=False).input_ids, []
        else:
            out = tokenize_prompt([(prompt, 1.0)], {trigger: [placeholder] * k}, _piece_tokenizer(tokenizer), layout,
                                  require=require_trigger, prompt=prompt)
            ids, pos = [int(t) for t, _ in out.chunks[0]], out.positions[trigger]
        ids = ids[: max_len - 1] + [eos]
        kept = [p for p in pos if p < max_len - 1]
        if k and len(kept) != len(pos):
            raise TriggerNotFoundError(
                f"prompt {prompt!r} is too long: an occurrence of {trigger!r} falls past token {max_len - 2}, where "
                "the text encoder cuts the prompt; shorten it or move the trigger forward")
        rows.append(ids + [pad] * (max_len - len(ids)))
        positions.append(kept)
    return TokenizedPrompts(torch.tensor(rows, dtype=torch.long), positions)


@contextmanager
def injected(text_encoder, positions: list[list[int]], vectors: torch.Tensor | None) -> Iterator[None]:
    """While active, the encoder's word embeddings at ``positions[b]`` are ``vectors[b]`` ``[k, D]``
    (repeated for every occurrence). ``vectors`` None: no change."""
    if vectors is None:
        yield
        return
    embedding = text_encoder.get_input_embeddings()

    def hook(module, inputs, output):  # output [B, L, D]
        if output.shape[0] != len(positions):
            raise ValueError(f"batch of {output.shape[0]} prompts but S* positions for {len(positions)}")
        out = output.clone()
        for b, pos in enumerate(positions):
            if pos:
                k = vectors.shape[1]
                rows = vectors[b].to(out.dtype).repeat(len(pos) // k, 1)  # [len(pos), D]
                out[b, pos] = rows
        return out

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode_prompts(family: str, text_encoders: Sequence, tokenizers: Sequence, prompts: Sequence[str],
                   parts: dict[str, torch.Tensor] | None, trigger: str = "S*", k: int = 2,
                   require_trigger: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings the way diffusers' pipelines make them, with S* injected.

    SD1/SD2: last hidden state (final LayerNorm applied). SDXL: penultimate hidden states of
    both encoders concatenated (768 + 1280), pooled text_embeds from the second.
    ``parts``: ``{"clip_l": [B, k, 768], ...}`` as :meth:`IDEncoder.split` gives; None for plain text.
    Returns ``(prompt_embeds [B, 77, C], pooled [B, 1280] or None)``.
    """
    keys = PART_FOR_ENCODER[family]
    outs, pooled = [], None
    for key, encoder, tokenizer in zip(keys, text_encoders, tokenizers, strict=True):
        plain = parts is None
        tok = tokenize_with_trigger(tokenizer, prompts, trigger, None if plain else k,
                                    require_trigger=require_trigger and not plain)
        ids = tok.input_ids.to(encoder.device)
        vectors = parts[key] if parts is not None else None
        with injected(encoder, tok.positions, vectors):
            if family == "sdxl":
                out = encoder(ids, output_hidden_states=True)
                outs.append(out.hidden_states[-2])
                if key == "clip_g":
                    pooled = out[0]  # CLIPTextModelWithProjection: text_embeds [B, 1280]
            else:
                outs.append(encoder(ids)[0])
    return torch.cat(outs, dim=-1), pooled
