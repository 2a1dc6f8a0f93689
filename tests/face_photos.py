"""Real face photos standing in for a diffusion model (tiny test models draw noise, not faces).

The photos are the samples in the insightface wheel: ``t1.jpg`` (six people) and
``Tom_Hanks_54745.png`` (one aligned face); a region of ``t1.jpg`` below the faces serves as a
picture without a face. A "person" here is one of those seven faces; :class:`PhotoGenerator` returns a
crop around that person's face, varied deterministically by the prompt and the seed (position jitter,
colour treatment per style word, sometimes another person's face or none), so detection, alignment, identity and CLIP scores
and the top-fraction selection all run on real faces.
"""

from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

import pytest
from PIL import Image, ImageFilter, ImageOps

_spec = importlib.util.find_spec("insightface")
IMAGES = Path(_spec.origin).parent / "data" / "images" if _spec and _spec.origin else None
HAVE_PHOTOS = IMAGES is not None and (IMAGES / "t1.jpg").is_file() and importlib.util.find_spec("facenet_pytorch")
needs_photos = pytest.mark.skipif(not HAVE_PHOTOS, reason="needs insightface (sample photos) and facenet-pytorch "
                                                          "(MTCNN weights)")

#: face boxes (x1, y1, x2, y2) of the six people in t1.jpg, as the MTCNN finds them
T1_FACES = ((49, 259, 170, 398), (269, 148, 369, 265), (464, 268, 570, 407), (747, 348, 842, 474),
            (907, 60, 1012, 199), (1133, 274, 1227, 398))
PEOPLE = tuple(f"t1-{i}" for i in range(6)) + ("tom",)


def _h(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:4], "little")


@lru_cache(maxsize=4)
def _photo(name: str) -> Image.Image:
    with Image.open(IMAGES / name) as im:
        return im.convert("RGB")


def face_photo(person: str, *, size: int = 224, margin: float = 2.2, jitter: int = 0) -> Image.Image:
    """A ``size`` px square crop around ``person``'s face; the face box is about ``size / margin`` px."""
    if person == "none":  # t1.jpg below the faces: clothes, no face
        return _photo("t1.jpg").crop((0, 560, 320, 880)).resize((size, size))
    if person == "tom":
        tom = _photo("Tom_Hanks_54745.png")  # 112 px, face ~85 px: pad to the margin asked for
        side = round(112 * margin / 1.3)
        canvas = Image.new("RGB", (side, side), (128, 128, 128))
        canvas.paste(tom, ((side - 112) // 2 + jitter // 4, (side - 112) // 2))
        return canvas.resize((size, size), Image.BICUBIC)
    x1, y1, x2, y2 = T1_FACES[int(person.split("-")[1])]
    cx, cy = (x1 + x2) / 2 + jitter, (y1 + y2) / 2
    half = max(x2 - x1, y2 - y1) * margin / 2
    t1 = _photo("t1.jpg")
    return t1.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half))).resize(
        (size, size), Image.BICUBIC)


_STYLES = {"pencil": lambda im: ImageOps.grayscale(im).convert("RGB"),
           "watercolor": lambda im: im.filter(ImageFilter.GaussianBlur(1.5)),
           "oil painting": lambda im: ImageOps.posterize(im, 3),
           "fauvism": lambda im: ImageOps.autocontrast(ImageOps.posterize(im, 2)),
           "hat": lambda im: ImageOps.mirror(im)}


class PhotoGenerator:
    """``generator(prompt, seed) -> PIL image`` from real photos.

    ``people``: name -> person (one of :data:`PEOPLE`, or "none" for a faceless picture).
    ``small``: names whose SOURCE faces come out small (~25 px; the others ~55 px). Edits (prompts other than
    "<name> face, looking at the camera") show the named person 3 times in 4, another person
    1 time in 8 and no face 1 time in 8 (decided by a hash of the prompt and seed).
    ``fail_after``: raise RuntimeError on call number ``fail_after + 1`` (a crash mid-step).
    """

    def __init__(self, people: dict[str, str], *, small: tuple[str, ...] = (), size: int = 128,
                 fail_after: int | None = None) -> None:
        self.people, self.small, self.size, self.fail_after = people, small, size, fail_after
        self.calls: list[tuple[str, int]] = []

    def _person(self, prompt: str) -> str:
        for name, person in self.people.items():
            if name in prompt:
                return person
        raise KeyError(f"no known name in prompt {prompt!r}")

    def __call__(self, prompt: str, seed: int) -> Image.Image:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError(f"simulated crash after {self.fail_after} images")
        self.calls.append((prompt, seed))
        person = self._person(prompt)
        jitter = _h(seed) % 9 - 4
        if prompt.endswith("face, looking at the camera") and not any(s in prompt for s in _STYLES):
            small = any(n in prompt for n in self.small)
            return face_photo(person, size=self.size, margin=4.5 if small else 2.0, jitter=jitter)
        roll = _h(prompt, seed) % 8
        if person != "none" and roll == 0:
            person = "none"
        elif person != "none" and roll == 1:
            person = PEOPLE[(PEOPLE.index(person) + 1 + _h(seed) % 5) % len(PEOPLE)]
        image = face_photo(person, size=self.size, margin=2.0 + (_h(seed, prompt) % 5) / 10, jitter=jitter)
        for word, treat in _STYLES.items():
            if word in prompt:
                image = treat(image)
        return image
