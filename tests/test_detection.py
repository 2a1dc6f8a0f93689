"""Detection records and non-maximum suppression."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamid_core.detection import Detection, nms


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
