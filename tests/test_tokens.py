"""Token splicing on ComfyUI's chunk layout (start, <=75 content, end, pad...) without ComfyUI."""

from __future__ import annotations

import pytest
import torch

from dreamid_core import (
    TriggerNotFoundError,
    find_occurrences,
    splice_chunks,
    splice_ids,
    trigger_ids_from_chunks,
)

START, END, PAD = 49406, 49407, 0
TRIGGER = [338, 265]  # "S*" in the CLIP BPE
LEN = 77


def chunk(content, pad=PAD):
    """One ComfyUI chunk: (token, weight, word_id) items."""
    items = [(START, 1.0, 0)] + list(content) + [(END, 1.0, 0)]
    return items + [(pad, 1.0, 0)] * (LEN - len(items))


def words(ids, weight=1.0, word=1):
    return [(i, weight, word) for i in ids]


def embed_chunks(chunks, table):
    """What the text encoder sees: ids looked up in ``table``, vectors used as they are."""
    rows = [[table[t] if isinstance(t, int) else t for t, *_ in c] for c in chunks]
    return torch.stack([torch.stack(r) for r in rows])


@pytest.fixture
def table():
    return torch.randn(49408, 8, generator=torch.Generator().manual_seed(0))


def test_own_embeddings_reproduce_the_plain_prompt(table):
    prompt = [chunk(words([320, 1125, 539]) + words(TRIGGER, 1.2, 2) + words([601, 320, 4895], 1.0, 3))]
    spliced, n = splice_chunks(prompt, TRIGGER, table[TRIGGER], start_token=START, end_token=END, pad_token=PAD)
    assert n == 1 and all(len(c) == LEN for c in spliced)
    assert torch.equal(embed_chunks(spliced, table), embed_chunks(prompt, table))
    assert [it[1] for it in spliced[0]] == [it[1] for it in prompt[0]]  # weights kept, (S*:1.2) included


def test_weight_of_the_trigger_is_kept_for_every_vector(table):
    prompt = [chunk(words([320]) + words(TRIGGER, 1.3, 2))]
    vecs = torch.randn(3, 8)
    spliced, _ = splice_chunks(prompt, TRIGGER, vecs, start_token=START, end_token=END, pad_token=PAD)
    inserted = [it for it in spliced[0] if isinstance(it[0], torch.Tensor)]
    assert len(inserted) == 3 and all(it[1] == 1.3 and it[2] == 2 for it in inserted)
    assert torch.equal(torch.stack([it[0] for it in inserted]), vecs)


def test_several_occurrences(table):
    prompt = [chunk(words(TRIGGER) + words([537]) + words(TRIGGER) + words([1125]) + words(TRIGGER))]
    vecs = torch.randn(2, 8)
    spliced, n = splice_chunks(prompt, TRIGGER, vecs, start_token=START, end_token=END, pad_token=PAD)
    assert n == 3
    kinds = [isinstance(it[0], torch.Tensor) for it in spliced[0][1:9]]
    assert kinds == [True, True, False, True, True, False, True, True]


def test_long_prompt_over_77_tokens_and_trigger_straddling_the_chunk_boundary(table):
    filler = list(range(1000, 1074))  # 74 tokens, then the trigger's first token ends chunk 0
    c0 = chunk(words(filler + [TRIGGER[0]]))
    c1 = chunk(words([TRIGGER[1]] + [400, 401]))
    vecs = torch.randn(2, 8)
    spliced, n = splice_chunks([c0, c1], TRIGGER, vecs, start_token=START, end_token=END, pad_token=PAD)
    assert n == 1 and len(spliced) == 2 and all(len(c) == LEN for c in spliced)
    # the occurrence moved whole into the later chunk, the S* group is not split
    assert [t for t, *_ in spliced[0][1:75]] == filler and spliced[0][75][0] == END
    assert torch.equal(spliced[1][1][0], vecs[0]) and torch.equal(spliced[1][2][0], vecs[1])
    assert [t for t, *_ in spliced[1][3:6]] == [400, 401, END]


def test_growing_past_75_spills_into_a_new_chunk(table):
    c0 = chunk(words(list(range(1000, 1073)) + TRIGGER))  # 75 content items, full chunk
    vecs = torch.randn(4, 8)  # k = 4 > 2 trigger tokens
    spliced, _ = splice_chunks([c0], TRIGGER, vecs, start_token=START, end_token=END, pad_token=PAD)
    assert len(spliced) == 2 and all(len(c) == LEN for c in spliced)
    assert sum(isinstance(t, torch.Tensor) for t, *_ in spliced[1]) == 4  # the group stays together
    assert spliced[0][74][0] == END and spliced[1][0][0] == START


def test_fewer_vectors_shrink_and_pad(table):
    spliced, _ = splice_chunks([chunk(words([320]) + words(TRIGGER))], TRIGGER, torch.randn(1, 8),
                               start_token=START, end_token=END, pad_token=PAD)
    assert len(spliced[0]) == LEN and spliced[0][3][0] == END and spliced[0][4][0] == PAD


def test_absent_trigger_raises_with_the_fix():
    with pytest.raises(TriggerNotFoundError, match="a photo of a man.*does not contain the trigger.*S\\* as a chef"):
        splice_chunks([chunk(words([320, 1125]))], TRIGGER, torch.randn(2, 8), start_token=START, end_token=END,
                      pad_token=PAD, prompt="a photo of a man")


def test_pad_equal_to_end_token_sd1_layout(table):
    prompt = [chunk(words([320]) + words(TRIGGER), pad=END)]
    spliced, _ = splice_chunks(prompt, TRIGGER, table[TRIGGER], start_token=START, end_token=END, pad_token=END)
    assert torch.equal(embed_chunks(spliced, table), embed_chunks(prompt, table))


def test_two_tuple_items_without_word_ids(table):
    prompt = [[it[:2] for it in chunk(words([320]) + words(TRIGGER))]]
    spliced, _ = splice_chunks(prompt, TRIGGER, table[TRIGGER], start_token=START, end_token=END, pad_token=PAD)
    assert all(len(it) == 2 for it in spliced[0])


def test_trigger_ids_from_its_own_tokenization():
    assert trigger_ids_from_chunks([chunk(words(TRIGGER))], START, END) == TRIGGER
    with pytest.raises(TriggerNotFoundError, match="gives no tokens"):
        trigger_ids_from_chunks([chunk([])], START, END, trigger="  ")


def test_flat_splicing_for_training():
    ids = [320, 338, 265, 537, 338, 265]
    assert find_occurrences(ids, TRIGGER) == [1, 4]
    new, pos = splice_ids(ids, TRIGGER, 3, placeholder=-1)
    assert new == [320, -1, -1, -1, 537, -1, -1, -1] and pos == [1, 2, 3, 5, 6, 7]
    assert splice_ids([1, 2], TRIGGER, 2) == ([1, 2], [])
