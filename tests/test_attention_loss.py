"""dreamid_core.learning.attention_loss: attention probabilities and the face-wise attention loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dreamid_core.learning.attention_loss import (
    attention_output,
    attention_probs,
    face_attention_loss,
    face_mass,
    resize_mask,
    token_distribution,
)

HW, T, HEADS = 16, 6, 2


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_probs_and_output_match_torch_attention():
    q, k, v = (torch.randn(2, n, 4 * 8, generator=_g(i)) for i, n in enumerate((10, 7, 7)))
    p = attention_probs(q, k, heads=4)
    assert p.shape == (2, 4, 10, 7) and torch.allclose(p.sum(-1), torch.ones(2, 4, 10))
    ref = F.scaled_dot_product_attention(*(t.reshape(2, -1, 4, 8).transpose(1, 2) for t in (q, k, v)))
    assert torch.allclose(attention_output(p, v, 4), ref.transpose(1, 2).reshape(2, 10, 32), atol=1e-5)


def test_resize_mask_to_layer_grids():
    m = torch.zeros(1, 9, 7)
    m[0, :, :4] = 1.0
    assert torch.equal(resize_mask(m, 63), m.reshape(1, 63))
    r = resize_mask(m, 20)  # ceil(9/2) x ceil(7/2) = 5 x 4
    assert r.shape == (1, 20) and float(r.reshape(5, 4)[2, 0]) == 1.0 and float(r.reshape(5, 4)[2, 3]) == 0.0
    with pytest.raises(ValueError, match="queries"):
        resize_mask(m, 17)


def _maps(logits):
    return torch.softmax(logits, dim=-1)  # [B, heads, HW, T] over tokens, like cross-attention


def test_face_mass_measures_attention_inside_the_mask():
    mask = torch.zeros(1, HW)
    mask[0, :4] = 1.0
    logits = torch.zeros(1, HEADS, HW, T)
    assert float(face_mass(_maps(logits), [2], mask)) == pytest.approx(4 / HW)  # uniform over the image
    logits[:, :, :4, 2] = 8.0  # the face attends to token 2, the rest of the image to token 0
    logits[:, :, 4:, 0] = 8.0
    assert float(face_mass(_maps(logits), [2], mask)) > 0.9
    assert torch.allclose(token_distribution(_maps(logits)).sum(1), torch.ones(1, T))


def test_loss_is_zero_when_maps_match_the_reference_and_sit_in_the_face():
    mask = torch.zeros(1, HW)
    mask[0, :4] = 1.0
    ref = torch.zeros(1, HEADS, HW, 5)
    ref[:, :, :4, 3] = 30.0  # "person" (ref position 3) is attended only in the face,
    ref[:, :, 4:, 0] = 30.0  # the start token everywhere else
    ref_maps = _maps(ref)
    maps = _maps(torch.cat([ref[..., :3], ref[..., 3:4], ref[..., 3:4], ref[..., 4:]], dim=-1))  # k=2 ids at 3, 4
    loss, parts = face_attention_loss(maps, ref_maps, mask, [3, 4], [3], [(0, 0)])
    assert float(loss) < 1e-6 and all(float(v) < 1e-6 for v in parts.values())


def _descend(class_weight):
    mask = torch.zeros(1, HW)
    mask[0, 4:8] = 1.0
    ref_maps = _maps(torch.randn(1, HEADS, HW, 5, generator=_g(1))).requires_grad_(True)
    logits = torch.randn(1, HEADS, HW, T, generator=_g(2)).requires_grad_(True)
    pairs = [(0, 0), (1, 1), (2, 2), (5, 4)]
    before = float(face_mass(_maps(logits.detach()), [3, 4], mask))
    opt = torch.optim.Adam([logits], lr=0.1)
    losses = []
    for _ in range(60):
        loss, _ = face_attention_loss(_maps(logits), ref_maps, mask, [3, 4], [3], pairs, class_weight=class_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert ref_maps.grad is None  # the reference is a target, never trained
    return losses, before, float(face_mass(_maps(logits.detach()), [3, 4], mask))


def test_descending_the_loss_lowers_it():
    losses, _, _ = _descend(class_weight=1.0)
    assert losses[-1] < 0.7 * losses[0]  # not to 0: the random reference "person" map is not in the face


def test_the_face_term_pulls_identity_attention_into_the_face():
    _, before, after = _descend(class_weight=0.0)
    assert after > before + 0.3


def test_shapes_are_checked():
    maps = _maps(torch.zeros(1, HEADS, HW, T))
    with pytest.raises(ValueError, match="mask"):
        face_attention_loss(maps, maps, torch.ones(1, 8), [3], [3], [])
    with pytest.raises(ValueError, match="differ"):
        face_attention_loss(maps, maps[:, :1], torch.ones(1, HW), [3], [3], [])
    with pytest.raises(ValueError, match="positions"):
        face_attention_loss(maps, maps, torch.ones(1, HW), [], [3], [])
