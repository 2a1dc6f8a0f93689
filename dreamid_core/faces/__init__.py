"""Faces: detection (the built-in MTCNN, insightface), alignment to the ArcFace template, and the pipeline
that makes one aligned crop per photo; also photo decoding and resizing, the soft face masks and
augmentation windows of learning, and onnxruntime housekeeping for the insightface detectors.

- :mod:`.pipeline`: :class:`FacePipeline` (photo -> detected faces, with retries -> chosen face -> crop);
- :mod:`.detection` (the detector interface), :mod:`.detectors` (choose one by name), :mod:`.mtcnn` +
  :mod:`.mtcnn_sampling` (built in), :mod:`.insightface_detector` + :mod:`.runtime` (optional);
- :mod:`.align`, :mod:`.keypoints` (head keypoints for the scene switch), :mod:`.images`, :mod:`.face_mask`.
"""
