"""Real portraits for the face tests: ``tests/test_images`` of the face_recognition sdist on PyPI
(Obama in five photos, two of them with part of the face cut off, one as a 32-bit RGBA PNG; Biden in one).

The photos are read straight from the sdist's tarball (nothing is unpacked or committed). It is looked
for at ``$DREAMID_FACE_RECOGNITION_SDIST``, then ``.ci-cache/photos/`` (where ``.ci/run`` downloads it);
without it the tests that need it skip, saying how to get it, or fail under ``DREAMID_REQUIRE_PHOTOS=1``
(set by ``.ci/run`` once it has the file: a CI run that silently skipped them would prove nothing).
"""

from __future__ import annotations

import io
import os
import tarfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

SDIST = "face_recognition-1.2.3.tar.gz"
ENV = "DREAMID_FACE_RECOGNITION_SDIST"
REQUIRE_ENV = "DREAMID_REQUIRE_PHOTOS"
GET = (f"pip download --no-deps --no-binary :all: face_recognition==1.2.3 -d .ci-cache/photos "
       f"(or set {ENV} to the {SDIST} file)")
#: photo -> how many faces MTCNN finds with confidence > 0.9 (the partial faces: one whole face each)
PORTRAITS = {"obama": 1, "obama2": 1, "obama3": 1, "biden": 1, "32bit": 1, "obama_partial_face": 1,
             "obama_partial_face2": 1}


def sdist_path() -> Path | None:
    env = os.environ.get(ENV)
    path = Path(env) if env else Path(__file__).resolve().parents[1] / ".ci-cache" / "photos" / SDIST
    return path if path.is_file() else None


@lru_cache(maxsize=1)
def portraits() -> dict[str, np.ndarray]:
    """name -> RGB uint8 photo, read with the pack's own loader (the RGBA one composited over grey)."""
    from PIL import Image

    from dreamid_core.faces.images import to_rgb_uint8

    path = sdist_path()
    if path is None:
        reason = f"the face_recognition sdist's photos are not here: {GET}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason} ({REQUIRE_ENV}=1: .ci/run downloaded them)", pytrace=False)
        pytest.skip(reason)
    photos = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            name = Path(member.name)
            if name.parent.name == "test_images" and name.stem in PORTRAITS:
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                    photos[name.stem] = to_rgb_uint8(im, where=str(name))
    missing = sorted(set(PORTRAITS) - set(photos))
    assert not missing, f"{path} lacks {missing}"
    return photos
