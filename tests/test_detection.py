"""Detection records and non-maximum suppression."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamid_core.faces.detection import Detection, nms


def test_nms_union_and_min():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [2, 2, 6, 6]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    assert nms(boxes, scores, 0.5).tolist() == [3, 0, 2]  # box 1 overlaps box 0 by IoU 0.68
    assert nms(boxes, scores, 0.5, mode="min").tolist() == [3, 2]  # box 3 lies inside 0 and 1
    assert nms(boxes[:0], scores[:0], 0.5).numel() == 0
    with pytest.raises(ValueError, match="union' or 'min'"):
        nms(boxes, scores, 0.5, mode="max")


def test_detection_maps_back_to_the_original_photo():
    d = Detection(box=(10, 20, 30, 50), score=0.9, landmarks=np.array([[15, 30]] * 5, np.float32))
    back = d.transformed(2.0, (-5.0, -5.0))
    assert back.box == (15, 35, 55, 95) and back.landmarks[0].tolist() == [25, 55]
    assert d.area == 600 and d.short_side == 20


def _greedy(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Textbook greedy NMS, one box at a time (the oracle)."""
    order, keep = list(np.argsort(-scores, kind="stable")), []
    while order:
        i = order.pop(0)
        keep.append(i)
        rest = []
        for j in order:
            w = max(0.0, min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
            h = max(0.0, min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
            union = np.prod(boxes[i, 2:] - boxes[i, :2]) + np.prod(boxes[j, 2:] - boxes[j, :2]) - w * h
            if w * h / union <= threshold:
                rest.append(j)
        order = rest
    return keep


def test_nms_matches_greedy_across_blocks_and_groups():
    rng = np.random.default_rng(0)
    n = 1300  # more than two 512-row blocks of the overlap matrix
    xy = rng.uniform(0, 200, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (n, 2))], axis=1)
    scores = rng.uniform(0, 1, n)
    groups = rng.integers(0, 3, n)
    got = nms(torch.tensor(boxes), torch.tensor(scores), 0.4).tolist()
    assert got == _greedy(boxes, scores, 0.4)
    grouped = nms(torch.tensor(boxes), torch.tensor(scores), 0.4, groups=torch.tensor(groups)).tolist()
    separate = [int(np.flatnonzero(groups == g)[i]) for g in range(3)
                for i in _greedy(boxes[groups == g], scores[groups == g], 0.4)]
    assert sorted(grouped) == sorted(separate) and len(grouped) > len(got)
    assert list(scores[grouped]) == sorted(scores[grouped], reverse=True)
