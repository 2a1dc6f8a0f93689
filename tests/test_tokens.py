"""dreamid_core.identities.tokens without ComfyUI: word groups from weighted text, and ComfyUI's chunk layout.

The equality with ComfyUI's own ``embedding:NAME`` path is tested against a real ComfyUI in
test_inject_contract.py; these tests pin the layout rules themselves on a toy word tokenizer."""

from __future__ import annotations

import re

import pytest
import torch

from dreamid_core import ChunkLayout, TriggerNotFoundError, chunk_groups, prompt_groups, tokenize_prompt

START, END, PAD = 49406, 49407, 0
LAYOUT = ChunkLayout(start_token=START, end_token=END, pad_token=PAD)
VOCAB: dict[str, int] = {}


def toy_piece(piece: str) -> list[list[int]]:
    """One group per piece, like ComfyUI's tokenizer on a piece without embeddings: words and
    punctuation runs become ids (stable per session)."""
    ids = [VOCAB.setdefault(w.lower(), 1000 + len(VOCAB)) for w in re.findall(r"\w+|[^\w\s]+", piece)]
    return [ids] if ids else []


def contents(chunk):
    return [t for t, *_ in chunk if not (isinstance(t, int) and t in (START, END, PAD))]


def test_trigger_becomes_its_own_group_with_the_segment_weight():
    vec = torch.randn(2, 4)
    groups, slots, counts = prompt_groups([("a photo of ", 1.0), ("S*,", 1.3), (" smiling", 1.0)],
                                          {"S*": list(vec)}, toy_piece)
    assert counts == {"S*": 1} and slots == [(1, "S*")]
    assert [len(g) for g in groups] == [3, 2, 1, 1]  # "a photo of" | S* | "," | "smiling"
    assert all(w == 1.3 for _, w in groups[1]) and groups[2] == [(VOCAB[","], 1.3)]
    assert torch.equal(torch.stack([t for t, _ in groups[1]]), vec)


def test_vectors_are_used_as_given_so_gradients_flow():
    vec = torch.randn(2, 4, requires_grad=True)
    out = tokenize_prompt([("a photo of S*", 1.0)], {"S*": list(vec.unbind(0))}, toy_piece, LAYOUT)
    rows = [t for t, _ in out.chunks[0] if isinstance(t, torch.Tensor)]
    torch.stack(rows).sum().backward()
    assert torch.equal(vec.grad, torch.ones(2, 4))
    assert out.positions["S*"] == [4, 5]  # start, a, photo, of, S*[0], S*[1]


def test_small_group_that_does_not_fit_moves_whole_to_the_next_chunk():
    groups = [[(i, 1.0) for i in range(100, 174)], [("v0", 1.0), ("v1", 1.0)], [(500, 1.0)]]  # 74 + 2 + 1
    chunks, where = chunk_groups(groups, LAYOUT)
    assert len(chunks) == 2 and all(len(c) == 77 for c in chunks)
    assert chunks[0][75][0] == END and chunks[0][76][0] == PAD  # closed after 74 words, padded
    assert contents(chunks[1]) == ["v0", "v1", 500]
    assert where[1] == [77 + 1, 77 + 2] and where[2] == [77 + 3]


def test_large_group_is_split_at_the_boundary():
    groups = [[(i, 1.0) for i in range(100, 170)], [(f"v{j}", 1.0) for j in range(9)]]  # k = 9 >= 8: "large"
    chunks, where = chunk_groups(groups, LAYOUT)
    assert contents(chunks[0])[-5:] == ["v0", "v1", "v2", "v3", "v4"] and chunks[0][76][0] == END
    assert contents(chunks[1]) == ["v5", "v6", "v7", "v8"]
    assert where[1] == [71, 72, 73, 74, 75, 78, 79, 80, 81]


def test_word_ids_padding_options_and_no_start_token():
    chunks, _ = chunk_groups([[(7, 1.0)], [(8, 1.0)]], LAYOUT)
    assert [w for *_, w in chunks[0][:4]] == [0, 1, 2, 0]
    left = ChunkLayout(start_token=None, end_token=END, pad_token=PAD, max_length=6, pad_left=True)
    assert [t for t, *_ in chunk_groups([[(7, 1.0)]], left)[0][0]] == [PAD, PAD, PAD, PAD, 7, END]
    short = ChunkLayout(start_token=START, end_token=END, pad_token=PAD, pad_to_max_length=False, min_length=5)
    assert len(chunk_groups([[(7, 1.0)]], short)[0][0]) == 5
    extra = ChunkLayout(start_token=START, end_token=END, pad_token=PAD, pad_to_max_length=False, min_padding=2)
    assert [t for t, *_ in chunk_groups([[(7, 1.0)]], extra)[0][0]] == [START, 7, END, PAD, PAD]


def test_strength_zero_deletes_the_trigger_and_joins_the_text():
    out = tokenize_prompt([("a photo of S* smiling", 1.0)], {"S*": []}, toy_piece, LAYOUT)
    plain = tokenize_prompt([("a photo of  smiling", 1.0)], {}, toy_piece, LAYOUT)
    assert out.chunks == plain.chunks and out.counts == {"S*": 1} and out.positions == {"S*": []}


def test_several_identities_and_occurrences():
    a, b = torch.zeros(2, 3), torch.ones(1, 3)
    out = tokenize_prompt([("S1* meets S2*, then (S1*'s) hat", 1.0)], {"S1*": list(a), "S2*": list(b)},
                          toy_piece, LAYOUT)
    assert out.counts == {"S1*": 2, "S2*": 1}
    assert out.positions["S1*"] == [1, 2, 8, 9] and out.positions["S2*"] == [4]
    with pytest.raises(TriggerNotFoundError, match="share a trigger"):
        tokenize_prompt([("S* s*", 1.0)], {"S*": list(a), "s*": list(b)}, toy_piece, LAYOUT)


def test_missing_trigger_names_the_prompt_and_the_fix():
    with pytest.raises(TriggerNotFoundError, match=r"'a photo of a man' does not contain the trigger word 'S\*'.*S\*,"):
        tokenize_prompt([("a photo of a man", 1.0)], {"S*": [torch.zeros(3)]}, toy_piece, LAYOUT)
    out = tokenize_prompt([("a man", 1.0)], {"S*": [torch.zeros(3)]}, toy_piece, LAYOUT, require=False)
    assert out.counts == {"S*": 0}
