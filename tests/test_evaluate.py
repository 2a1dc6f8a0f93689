"""The evaluation protocol: tiny diffusion model end to end (encoder and textual-inversion modes), and
the metrics' bookkeeping on real faces (a generator that returns photos)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from face_photos import HAVE_PHOTOS, face_photo, needs_photos
from PIL import Image
from tiny_diffusers import (
    TINY_TEXT_WIDTH,
    make_tiny_arcface,
    make_tiny_clip_model,
    make_tiny_sd,
    tiny_backbone_config,
)

from dreamid_core import (
    EncoderConfig,
    FacePipeline,
    IDEncoder,
    IncompatibleEncoderError,
    make_detector,
    save_encoder,
)
from dreamid_core.identities.learned_identity import write_embedding
from training.common.scorers import ClipScorer, IdentityScorer
from training.evaluate import cli as ev

PROMPTS = "a photo of S*\n# a comment\nS* as a chef, looking at the camera\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    torch.manual_seed(0)
    cfg = EncoderConfig(backbone=tiny_backbone_config(), target="sd2", token_widths=(("clip_h", TINY_TEXT_WIDTH),),
                        num_tokens=2, tap_layers=(1, 2, 3, 4), hidden_dim=32)
    return {"base": make_tiny_sd(root / "sd", "sd2"), "encoder": save_encoder(IDEncoder(cfg), root / "enc.safetensors"),
            "arcface": make_tiny_arcface(root / "arcface.pt"), "clip": make_tiny_clip_model(root / "clip"),
            "root": root}


@pytest.fixture(scope="module")
def faces_dir(tmp_path_factory):
    if not HAVE_PHOTOS:
        pytest.skip("needs the insightface sample photos and facenet-pytorch")
    folder = tmp_path_factory.mktemp("faces")
    face_photo("tom", size=160).save(folder / "tom.png")
    face_photo("t1-2", size=160).save(folder / "ann.jpg")
    face_photo("none", size=160).save(folder / "zz_no_face.png")
    return folder


def _cli(models, faces_dir, out, prompts, *extra):
    return ["--base-model", str(models["base"]), "--faces", str(faces_dir), "--prompts", str(prompts), "--out",
            str(out), "--face-model", str(models["arcface"]), "--clip-model", str(models["clip"]),
            "--images-per-prompt", "2", "--steps", "2", "--device", "cpu", "--no-detect-retry", *extra]


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@needs_photos
def test_encoder_evaluation_writes_table_csv_and_grid(tmp_path, models, faces_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "eval"
    assert ev.main(_cli(models, faces_dir, out, prompts, "--encoder", str(models["encoder"]))) == 0
    md = (out / "summary.md").read_text()
    assert "| prompt | images | text-alignment (CLIP) | face similarity | no-face rate |" in md
    assert "| **overall** | 8 |" in md and "DreamIdentity encoder" in md and "zz_no_face.png" in md
    rows = _read_csv(out / "summary.csv")
    assert [r["prompt"] for r in rows] == ["a photo of S*", "S* as a chef, looking at the camera", "overall"]
    for r in rows:
        assert -1.0 <= float(r["text_alignment"]) <= 1.0 and r["text_alignment"] != ""
        assert 0.0 <= float(r["no_face_rate"]) <= 1.0
        if r["face_similarity"]:
            assert -1.0 <= float(r["face_similarity"]) <= 1.0
        else:  # tiny models draw 32 px noise: no face, reported as a rate, never as similarity 0
            assert float(r["no_face_rate"]) == 1.0
    images = _read_csv(out / "images.csv")
    assert len(images) == 2 * 2 * 2 and {r["face"] for r in images} == {"tom", "ann"}
    assert len({r["seed"] for r in images}) == 8 and all((out / r["image"]).is_file() for r in images)
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (3 * 130 + 2, 4 * (128 + 14 + 2) + 2)  # face + 2 images, 2 faces x 2 prompts
    # the same command again resumes (nothing left to draw); another encoder file at the same path does not
    copy = tmp_path / "enc.safetensors"
    copy.write_bytes(models["encoder"].read_bytes())
    out2 = tmp_path / "eval2"
    assert ev.main(_cli(models, faces_dir, out2, prompts, "--encoder", str(copy))) == 0
    assert ev.main(_cli(models, faces_dir, out2, prompts, "--encoder", str(copy))) == 0
    torch.manual_seed(1)
    save_encoder(IDEncoder(ev.load_encoder(copy).config), copy)  # re-exported to the same path
    assert ev.main(_cli(models, faces_dir, out2, prompts, "--encoder", str(copy))) == 2  # refused: exit 2


@needs_photos
def test_textual_inversion_baseline_on_the_same_protocol(tmp_path, models, faces_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    emb = write_embedding(tmp_path / "ti.safetensors", {"clip_h": torch.randn(3, TINY_TEXT_WIDTH)})
    out = tmp_path / "eval"
    assert ev.main(_cli(models, faces_dir, out, prompts, "--embedding", str(emb))) == 0
    assert "textual-inversion embedding (the same for every face)" in (out / "summary.md").read_text()
    assert [r["prompt"] for r in _read_csv(out / "summary.csv")][-1] == "overall"
    assert (out / "grid.png").is_file()
    wrong = write_embedding(tmp_path / "wide.safetensors", {"clip_h": torch.randn(2, 64)})
    with pytest.raises(IncompatibleEncoderError,
                       match=r"clip_h vectors have shape \(2, 64\).*clip_h word embeddings are 32 wide"):
        ev.EmbeddingIdentity(wrong, "sd2", {"clip_h": TINY_TEXT_WIDTH})
    sdxl = write_embedding(tmp_path / "xl.safetensors", {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 48)})
    assert set(ev.EmbeddingIdentity(sdxl, "sdxl", {"clip_l": 32, "clip_g": 48}).parts(None)) == {"clip_l", "clip_g"}


class _PhotoBatch:
    """Returns the test face's own photo (prompt 0) or a faceless picture (prompt 1); records calls."""

    def __init__(self, photo):
        self.photo, self.calls = photo, []

    def batch(self, prompts, seeds, parts=None, k=2):
        self.calls.append((list(prompts), list(seeds), {key: tuple(v.shape) for key, v in parts.items()}, k))
        person = "none" if "chef" in prompts[0] else None
        return [face_photo("none", size=160) if person else self.photo.copy() for _ in prompts]


class _SpyClip(ClipScorer):
    def __init__(self, folder):
        super().__init__(folder)
        self.texts = []

    def score(self, images, texts):
        self.texts.extend(texts)
        return super().score(images, texts)


@needs_photos
def test_metrics_on_real_faces_and_no_face_rate(tmp_path, models, faces_dir):
    pipeline = FacePipeline(make_detector("mtcnn"), retry=False)
    faces, skipped = ev.load_test_faces(faces_dir, pipeline)
    assert list(faces) == ["ann", "tom"] and skipped == ["zz_no_face.png"]
    faces = {"tom": faces["tom"]}
    gen = _PhotoBatch(face_photo("tom", size=160))
    clip = _SpyClip(models["clip"])
    identity_source = ev.EncoderIdentity(ev.load_encoder(models["encoder"]), {"clip_h": TINY_TEXT_WIDTH})
    cfg = ev.EvalConfig(out=tmp_path, images_per_prompt=3)
    result = ev.evaluate(cfg, faces=faces, prompts=ev.load_prompts(_write(tmp_path, PROMPTS)),
                         identity_source=identity_source, generator=gen, pipeline=pipeline,
                         identity=IdentityScorer(models["arcface"]), clip=clip)
    photo_row, chef_row, overall = result["rows"]
    assert abs(photo_row.face_similarity - 1.0) < 1e-4 and photo_row.no_face_rate == 0.0  # same photo back
    assert chef_row.face_similarity is None and chef_row.no_face_rate == 1.0
    # faceless images do not pull the mean down: overall similarity is over the 3 faces found
    assert abs(overall.face_similarity - 1.0) < 1e-4 and overall.no_face_rate == pytest.approx(0.5)
    assert clip.texts == ["a photo of a person", "a person as a chef, looking at the camera"]
    (prompts0, seeds0, shapes0, k0), _ = gen.calls
    assert prompts0 == ["a photo of S*"] * 3 and len(set(seeds0)) == 3 and shapes0 == {"clip_h": (3, 2, 32)}
    assert k0 == 2


def _write(folder, text):
    path = folder / "prompts.txt"
    path.write_text(text)
    return path


def test_prompts_must_contain_the_trigger(tmp_path):
    with pytest.raises(ValueError, match=r"line 2 \('a red car'\) does not contain the trigger 'S\*'"):
        ev.load_prompts(_write(tmp_path, "a photo of S*\na red car\n"))
    assert ev.load_prompts(ev.EXAMPLE_PROMPTS)


def test_encoder_for_another_base_model_is_refused(models):
    encoder = ev.load_encoder(models["encoder"])
    with pytest.raises(IncompatibleEncoderError,
                       match=r"encoder \(target 'sd2'\).*shape \(1, 32\).*clip_h word embeddings are 1024 wide"):
        ev.EncoderIdentity(encoder, {"clip_h": 1024})
    parts = ev.EncoderIdentity(encoder, {"clip_h": 32}).parts(torch.rand(3, 112, 112))
    assert parts["clip_h"].shape == (2, 32) and np.isfinite(parts["clip_h"].numpy()).all()


# -- resumable, shardable, every row in the grid (issue 8 item 10) -------------------------------------------

class _CountingBatch(_PhotoBatch):
    """_PhotoBatch that can die (like a kill) at its ``die_at``-th call."""

    def __init__(self, photo, die_at=None):
        super().__init__(photo)
        self.die_at = die_at

    def batch(self, prompts, seeds, parts=None, k=2):
        if self.die_at is not None and len(self.calls) == self.die_at:
            raise KeyboardInterrupt("killed")
        return super().batch(prompts, seeds, parts=parts, k=k)


def _protocol(models, faces_dir):
    pipeline = FacePipeline(make_detector("mtcnn"), retry=False)
    faces, _ = ev.load_test_faces(faces_dir, pipeline)
    source = ev.EncoderIdentity(ev.load_encoder(models["encoder"]), {"clip_h": TINY_TEXT_WIDTH})
    return dict(faces=faces, identity_source=source, pipeline=pipeline, identity=IdentityScorer(models["arcface"]),
                clip=ClipScorer(models["clip"]))


@needs_photos
def test_evaluation_resumes_and_shards_without_redoing_units(tmp_path, models, faces_dir):
    kw = _protocol(models, faces_dir)
    prompts = ev.load_prompts(_write(tmp_path, PROMPTS))
    photo = face_photo("tom", size=160)
    whole = ev.evaluate(ev.EvalConfig(out=tmp_path / "whole", images_per_prompt=2), prompts=prompts,
                        generator=_CountingBatch(photo), **kw)
    assert len(whole["results"]) == 2 * 2 * 2
    # killed after its first (face, prompt) unit, then rerun: only the other three are generated
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(ev.EvalConfig(out=out, images_per_prompt=2), prompts=prompts, generator=_CountingBatch(photo, 1),
                    **kw)
    again = _CountingBatch(photo)
    resumed = ev.evaluate(ev.EvalConfig(out=out, images_per_prompt=2), prompts=prompts, generator=again, **kw)
    assert len(again.calls) == 3 and resumed["results"] == whole["results"]
    assert _read_csv(out / "summary.csv") == _read_csv(tmp_path / "whole" / "summary.csv")
    # two shards: the first leaves the summary to the second; every unit is drawn once in all
    out = tmp_path / "sharded"
    gens = [_CountingBatch(photo), _CountingBatch(photo)]
    first = ev.evaluate(ev.EvalConfig(out=out, images_per_prompt=2, shard=0, num_shards=2), prompts=prompts,
                        generator=gens[0], **kw)
    assert first["rows"] is None and len(first["pending"]) == 4 - len(gens[0].calls) and not (out / "summary.md").exists()
    second = ev.evaluate(ev.EvalConfig(out=out, images_per_prompt=2, shard=1, num_shards=2), prompts=prompts,
                         generator=gens[1], **kw)
    assert len(gens[0].calls) + len(gens[1].calls) == 4 and second["results"] == whole["results"]
    assert (out / "summary.md").is_file()
    with pytest.raises(ValueError, match="other settings .*seed"):
        ev.evaluate(ev.EvalConfig(out=out, images_per_prompt=2, seed=1), prompts=prompts, generator=gens[1], **kw)


@needs_photos
def test_grid_pages_hold_every_row(tmp_path, models, faces_dir):
    kw = _protocol(models, faces_dir)
    prompts = ev.load_prompts(_write(tmp_path, PROMPTS))
    ev.evaluate(ev.EvalConfig(out=tmp_path / "eval", images_per_prompt=2, grid_rows=3), prompts=prompts,
                generator=_CountingBatch(face_photo("tom", size=160)), **kw)
    rows_of = {"grid.png": 3, "grid-002.png": 1}  # 2 faces x 2 prompts = 4 rows, 3 per page
    for name, rows in rows_of.items():
        with Image.open(tmp_path / "eval" / name) as page:
            assert page.size == (3 * 130 + 2, rows * (128 + 14 + 2) + 2), name
    assert "grid.png, grid-002.png" in (tmp_path / "eval" / "summary.md").read_text()


def test_embedding_formats_of_other_tools(tmp_path):
    from safetensors.torch import save_file

    from dreamid_core import WeightFormatError

    widths = {"clip_h": TINY_TEXT_WIDTH}
    vec = torch.randn(2, TINY_TEXT_WIDTH)
    save_file({"<tom>": vec[0].clone()}, str(tmp_path / "learned_embeds.safetensors"))  # diffusers, one vector
    torch.save({"<tom>": vec}, tmp_path / "learned_embeds.bin")  # diffusers .bin, two vectors
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": vec}, "name": "tom",
                "step": 3000, "sd_checkpoint": None, "sd_checkpoint_name": None}, tmp_path / "tom.pt")  # A1111
    one = ev.EmbeddingIdentity(tmp_path / "learned_embeds.safetensors", "sd2", widths)
    assert one.k == 1 and torch.equal(one.parts(None)["clip_h"], vec[:1])
    for name in ("learned_embeds.bin", "tom.pt"):
        source = ev.EmbeddingIdentity(tmp_path / name, "sd2", widths)
        assert source.k == 2 and torch.equal(source.parts(None)["clip_h"], vec), name

    class NotATensor:  # a pickle that would run code on load is refused, never executed
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"string_to_param": {"*": NotATensor()}}, tmp_path / "evil.pt")
    with pytest.raises(WeightFormatError, match="weights_only=True"):
        ev.EmbeddingIdentity(tmp_path / "evil.pt", "sd2", widths)
