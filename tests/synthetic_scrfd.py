"""A tiny synthetic SCRFD face detector as ONNX, built with ``onnx.helper`` (nothing downloaded).

insightface's model router (``insightface.model_zoo.model_zoo.ModelRouter``) calls any ONNX file
with five or more outputs a face detector and wraps it in ``SCRFD``; nine outputs mean the
"bnkps" layout of ``scrfd_10g_bnkps.onnx`` (antelopev2) and ``det_10g.onnx`` (buffalo_l): strides
8, 16 and 32, two anchors per feature-map location, and five keypoints. This model has that
interface, and really looks at the image, so the whole detection path can be tested end to end.

What insightface feeds it (``SCRFD._detect_candidates`` / ``_prepare_input_blob``): the BGR photo
resized (aspect kept) into the top-left corner of a black ``det_size`` x ``det_size`` canvas,
``det_scale = new_height / photo_height``, then ``cv2.dnn.blobFromImage(..., swapRB=True)``: input
``"input.1"`` ``[1, 3, H, W]`` float32, channels **RGB**, values ``(pixel - 127.5) / 128``.

The nine outputs, in the order insightface reads them (``net_outs[idx]``, ``[idx + 3]``,
``[idx + 6]`` for stride index ``idx``), each 2-D ``[N_s, C]`` (3-D outputs would mean "batched")
with ``N_s = (H / s) * (W / s) * 2`` rows: feature-map location ``(i, j)`` row-major, and for each
location its two anchors next to each other (both anchors get identical values here). The anchor
centre of location ``(i, j)`` is input pixel ``(x, y) = (j * s, i * s)``:

* ``score_8`` ``[N_8, 1]``: ``sigmoid(GAIN * (brightness - THRESHOLD))`` where ``brightness`` is
  the RED channel mapped back to 0..1 and averaged over the 17 x 17 input pixels centred on the
  anchor centre (``AveragePool``, kernel 17, stride 8, pads 8, padding not counted). A bright
  square of about 16 x 16 input pixels centred on an anchor scores ~0.99 there and < 0.05 at
  every other anchor, so exactly one face comes out (after insightface's NMS merges the two
  identical anchors). Only red counts, so a pure red square is a face and a pure blue one is
  not: that is how the tests see whether the caller's RGB -> BGR conversion happened.
* ``score_16``, ``score_32`` ``[N_s, 1]``: ``sigmoid(-20)`` ~ 2e-9 everywhere (computed from the
  input, so their row count follows the input size, but never above any threshold).
* ``bbox_8``, ``bbox_16``, ``bbox_32`` ``[N_s, 4]``: distances from the anchor centre to the box's
  left, top, right and bottom edges **in stride units** (insightface multiplies by the stride):
  all ``BOX_DISTANCE`` (3), so the box is the anchor centre +- 3 * stride pixels (48 x 48 at s=8).
* ``kps_8``, ``kps_16``, ``kps_32`` ``[N_s, 10]``: five ``(dx, dy)`` keypoint offsets from the
  anchor centre, in stride units: :data:`KPS_OFFSETS`, the ArcFace 112 x 112 template shifted to
  its centre and scaled by 1/16 (so at stride 8 the face's landmarks are that template at half
  size). Order: eye on the image's left, eye on the right, nose, mouth left, mouth right.

:func:`expected_face` gives the box and landmarks the model encodes for an anchor, in input
pixels; divide by ``det_scale`` to get photo pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

STRIDES = (8, 16, 32)
NUM_ANCHORS = 2
GAIN = 20.0
THRESHOLD = 0.65
BOX_DISTANCE = 3.0  # stride units, each side
#: the ArcFace 112x112 template (dreamid_core.faces.align.ARCFACE_TEMPLATE_112) about (56, 66), / 16
_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                      [70.7299, 92.2041]], dtype=np.float32)
KPS_OFFSETS = (_TEMPLATE - np.array([56.0, 66.0], dtype=np.float32)) / 16.0  # [5, 2] stride units
INPUT_NAME = "input.1"
OUTPUT_NAMES = tuple(f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in STRIDES)


def build_scrfd_bnkps():
    """The synthetic detector as an ``onnx.ModelProto`` (opset 13, dynamic input height/width)."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name, values):
        return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)

    inits = [
        const("to_unit_scale", 128.0 / 255.0), const("to_unit_shift", 127.5 / 255.0),
        const("threshold", THRESHOLD), const("gain", GAIN), const("zero", 0.0), const("minus20", -20.0),
        const("box_row", np.full((1, 4), BOX_DISTANCE)), const("kps_row", KPS_OFFSETS.reshape(1, 10)),
        numpy_helper.from_array(np.array([0], np.int64), "c0"), numpy_helper.from_array(np.array([1], np.int64), "c1"),
        numpy_helper.from_array(np.array([-1, 1], np.int64), "col"),
    ]
    nodes = [
        # red channel back to 0..1: x * 128 / 255 + 127.5 / 255
        helper.make_node("Slice", [INPUT_NAME, "c0", "c1", "c1"], ["red"]),  # starts, ends, axes
        helper.make_node("Mul", ["red", "to_unit_scale"], ["red_scaled"]),
        helper.make_node("Add", ["red_scaled", "to_unit_shift"], ["bright"]),
        # stride 8: pooled brightness around each anchor centre -> score
        helper.make_node("AveragePool", ["bright"], ["pool_8"], kernel_shape=[17, 17], strides=[8, 8],
                         pads=[8, 8, 8, 8], count_include_pad=0),
        helper.make_node("Sub", ["pool_8", "threshold"], ["centred_8"]),
        helper.make_node("Mul", ["centred_8", "gain"], ["logit_8"]),
    ]
    for s in STRIDES[1:]:  # strides 16, 32: same grid size as a real head, logit -20 everywhere
        nodes += [
            helper.make_node("AveragePool", ["bright"], [f"pool_{s}"], kernel_shape=[s, s], strides=[s, s]),
            helper.make_node("Mul", [f"pool_{s}", "zero"], [f"nil_{s}"]),
            helper.make_node("Add", [f"nil_{s}", "minus20"], [f"logit_{s}"]),
        ]
    for s in STRIDES:
        nodes += [
            helper.make_node("Sigmoid", [f"logit_{s}"], [f"map_{s}"]),  # [1, 1, H/s, W/s]
            helper.make_node("Reshape", [f"map_{s}", "col"], [f"loc_{s}"]),  # [(H/s)*(W/s), 1] row-major
            helper.make_node("Concat", [f"loc_{s}"] * NUM_ANCHORS, [f"anchors_{s}"], axis=1),  # [L, 2]
            helper.make_node("Reshape", [f"anchors_{s}", "col"], [f"score_{s}"]),  # [L*2, 1], anchors adjacent
            helper.make_node("Mul", [f"score_{s}", "zero"], [f"zeros_{s}"]),  # [N, 1] of 0
            helper.make_node("Add", [f"zeros_{s}", "box_row"], [f"bbox_{s}"]),  # broadcast -> [N, 4]
            helper.make_node("Add", [f"zeros_{s}", "kps_row"], [f"kps_{s}"]),  # broadcast -> [N, 10]
        ]
    width = {"score": 1, "bbox": 4, "kps": 10}
    outputs = []
    for name in OUTPUT_NAMES:  # 2-D [rows, width]; insightface's static-shape rewrite fixes both dims
        kind, stride = name.split("_")
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n{stride}", width[kind]]))
    graph = helper.make_graph(
        nodes, "synthetic_scrfd_bnkps",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, 3, "height", "width"])],
        outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="dreamidentity-tests")
    model.ir_version = 8  # readable by any onnxruntime >= 1.10
    return model


def write_scrfd_bnkps(path: str | Path) -> Path:
    """Save the synthetic detector at ``path`` (parents created); returns the path."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_scrfd_bnkps()
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def expected_face(anchor_xy: tuple[float, float], stride: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Box ``[4]`` (x1, y1, x2, y2) and landmarks ``[5, 2]`` encoded for the anchor centred at
    ``anchor_xy`` (input pixels), as insightface decodes them (``distance2bbox``/``distance2kps``)."""
    c = np.asarray(anchor_xy, dtype=np.float64)
    d = BOX_DISTANCE * stride
    box = np.array([c[0] - d, c[1] - d, c[0] + d, c[1] + d])
    return box, c + KPS_OFFSETS.astype(np.float64) * stride
