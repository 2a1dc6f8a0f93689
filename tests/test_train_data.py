"""The training data: latents are finite and encoded once, the reconstruction folder skips bad photos and
aligns in resumable shards, the editing manifest keeps only kept and valid lines, and the sampler mixes
deterministically and resumes at any position."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from training_fixtures import (
    insightface_images,
    one_thread,  # noqa: F401  (a fixture)
    recon_photos,
)

from training.common.latents import LatentCache
from training.train.data import TrainingData, collate, load_edit_manifest, write_report
from training.train.prepare import load_base
from training.train.recon import prepare_recon
from training.train.sampler import MixSampler

pytest.importorskip("accelerate")


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")
REPO = Path(__file__).resolve().parents[1]


def test_latents_are_checked_for_finite_values_when_written_and_read(cfg, tmp_path, caplog):
    from safetensors.torch import save_file

    from training.common.latents import NonFiniteLatentError

    cache = LatentCache("disk", resolution=32, vae_id="v", folder=tmp_path / "lat")
    bad = torch.zeros(4, 4, 4)
    bad[0, 1, 2] = float("nan")
    with pytest.raises(NonFiniteLatentError, match="photo_17.png is not finite \\(1 NaN/inf"):
        cache._store("k1", bad, "data/photo_17.png")
    assert cache.load_disk("k1") is None  # nothing was cached
    path = cache._path("k2")
    path.parent.mkdir(parents=True)
    save_file({"latent": bad}, str(path))  # a damaged entry on disk
    with caplog.at_level("WARNING", logger="training.common.latents"):
        assert cache.load_disk("k2") is None
    assert "NaN/inf" in caplog.text


def test_recon_folder_skips_corrupt_and_faceless_photos(tmp_path):
    from dreamid_core import make_detector

    images = insightface_images()
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    Image.open(images / "Tom_Hanks_54745.png").save(photos / "tom.png")
    Image.open(images / "t1.jpg").crop((380, 180, 660, 500)).save(photos / "sub" / "group_crop.jpg")
    (photos / "corrupt.jpg").write_bytes((images / "t1.jpg").read_bytes()[:600])  # truncated JPEG
    Image.open(images / "mask_white.jpg").save(photos / "mask.jpg")
    (photos / "notes.txt").write_text("not a photo")
    cache = tmp_path / "cache"
    items, report = prepare_recon(photos, cache, min_face_size=32, detector=make_detector("mtcnn"))
    assert report.total == 4 and report.usable == 2
    assert sorted(Path(it.image).name for it in items) == ["group_crop.jpg", "tom.png"]
    reasons = {s["file"]: s["reason"] for s in report.skipped}
    assert reasons == {"corrupt.jpg": "unreadable", "mask.jpg": "no_face"}
    path = write_report([report], tmp_path / "data_report.json")
    saved = json.loads(path.read_text())["recon"]
    assert saved["skipped_by_reason"] == {"unreadable": 1, "no_face": 1} and saved["usable"] == 2

    class NoDetector:
        name = "mtcnn"

        def detect(self, image):
            raise AssertionError("a restart must not detect again")

    again, report2 = prepare_recon(photos, cache, min_face_size=32, detector=NoDetector())
    assert again == items and report2.details["aligned_now"] == 0 and len(report2.skipped) == 2

    cache_l = LatentCache("off", resolution=32, vae_id="x")
    ds = TrainingData({"recon": items, "edit": []}, resolution=32, crop_size=112, templates=["a photo of S*"],
                      latent_key=cache_l.item_key)
    sampler = MixSampler(sizes=ds.sizes(), recon_fraction=1.0, seed=0)
    batch = collate([ds[ref] for ref in next(sampler.micro_batches(batch_size=2))])
    assert batch["crop"].shape == (2, 3, 112, 112) and 0 <= batch["crop"].min() and batch["crop"].max() <= 1
    assert batch["pixels"][0].shape == (3, 32, 32) and -1 <= batch["pixels"][0].min() <= batch["pixels"][0].max() <= 1
    assert batch["prompt"] == ["a photo of S*"] * 2


def test_edit_manifest_keeps_only_kept_and_valid_lines(cfg, tmp_path):
    manifest = Path(cfg.edit_manifest)
    lines = manifest.read_text().splitlines()
    lines += ["not json", json.dumps({"source_crop": "missing.png", "image": "img0.png", "prompt": "S*", "kept": True}),
              json.dumps({"source_crop": "crop0.png", "image": "img0.png", "prompt": "no trigger", "kept": True}),
              json.dumps({"source_crop": "img0.png", "image": "img0.png", "prompt": "S* again", "kept": True})]
    bad = manifest.parent / "bad_manifest.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    items, report = load_edit_manifest(bad)
    assert len(items) == 4 and report.details["not_kept"] == 1
    assert [s["reason"] for s in report.skipped] == ["bad_line", "missing_file", "no_trigger", "crop_size"]
    assert all(Path(it.crop).is_absolute() and "S*" in it.prompt for it in items)


def test_sampler_mixes_deterministically_and_resumes_anywhere():
    s = MixSampler(sizes={"recon": 5, "edit": 3}, recon_fraction=0.25, seed=7, num_templates=4)
    refs = [s.ref(p) for p in range(400)]
    assert sum(r.source == "recon" for r in refs) == 100  # exactly a quarter
    assert all(sum(r.source == "recon" for r in refs[i:i + 4]) == 1 for i in range(0, 400, 4))
    recon = [r.index for r in refs if r.source == "recon"]
    assert all(sorted(recon[i:i + 5]) == list(range(5)) for i in range(0, 100, 5))  # each epoch a permutation
    assert len({tuple(recon[i:i + 5]) for i in range(0, 100, 5)}) > 1  # ... a fresh one
    assert refs == [MixSampler(sizes={"recon": 5, "edit": 3}, recon_fraction=0.25, seed=7, num_templates=4).ref(p)
                    for p in range(400)]
    # two processes split every global micro-batch; a restart at position 8 continues the same order
    r0 = s.micro_batches(batch_size=2, num_processes=2, rank=0)
    r1 = s.micro_batches(batch_size=2, num_processes=2, rank=1)
    flat = [ref for _ in range(4) for ref in next(r0) + next(r1)]
    assert flat == refs[:16]
    s.advance(8)
    assert next(s.micro_batches(batch_size=2, num_processes=2, rank=1)) == refs[10:12]
    other = MixSampler(sizes={"recon": 6, "edit": 3}, recon_fraction=0.25, seed=7, num_templates=4)
    with pytest.raises(ValueError, match="sizes"):
        other.load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="multiple"):
        next(s.micro_batches(batch_size=3))


def test_latent_cache_encodes_each_image_once(cfg, tmp_path):
    base = load_base(cfg, "cpu")
    items, _ = load_edit_manifest(cfg.edit_manifest)
    disk = LatentCache("disk", resolution=32, vae_id="v", folder=tmp_path / "lat")
    ds = TrainingData({"recon": [], "edit": items}, resolution=32, crop_size=112, templates=["S*"],
                      latent_key=disk.item_key, cached_latent=disk.load_disk)
    sampler = MixSampler(sizes=ds.sizes(), recon_fraction=0.0, seed=0)
    refs = next(sampler.micro_batches(batch_size=4))
    first = disk.latents_for(collate([ds[r] for r in refs]), base.vae, torch.device("cpu"))
    assert disk.encoded == 4 and first.shape == (4, 4, 16, 16)
    batch = collate([ds[r] for r in refs])
    assert all(p is None for p in batch["pixels"])  # the worker read the latents from disk
    assert torch.equal(disk.latents_for(batch, base.vae, torch.device("cpu")), first) and disk.encoded == 4
    memory = LatentCache("memory", resolution=32, vae_id="v")
    ds.cached_latent = None
    again = memory.latents_for(collate([ds[r] for r in refs]), base.vae, torch.device("cpu"))
    assert torch.equal(again, first)  # each image encoded alone: the same bits whichever cache
    off = LatentCache("off", resolution=32, vae_id="v").latents_for(collate([ds[r] for r in refs]), base.vae,
                                                                     torch.device("cpu"))
    assert torch.allclose(off, first, atol=1e-5)


class CountingDetector:
    """MTCNN that counts the photos it saw and can be made to die after ``fail_after`` of them."""

    name = "mtcnn"

    def __init__(self, fail_after: int | None = None) -> None:
        from dreamid_core import make_detector

        self.inner, self.fail_after, self.calls = make_detector("mtcnn"), fail_after, 0

    def detect(self, image):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")  # not an Exception: like a kill, it ends the step
        self.calls += 1
        return self.inner.detect(image)


def test_recon_alignment_shards_resume_and_report(tmp_path):
    from training.common.records import StepStore, shard_of
    from training.train.recon import ReconNotAlignedError, align_recon, collect_recon

    photos = recon_photos(tmp_path / "photos")
    (photos / "corrupt.jpg").write_bytes((insightface_images() / "t1.jpg").read_bytes()[:600])
    Image.open(insightface_images() / "mask_white.jpg").save(photos / "mask.jpg")
    cache = tmp_path / "cache"
    names = sorted(p.name for p in photos.iterdir())
    owner = {n: shard_of(n, 2) for n in names}
    assert set(owner.values()) == {0, 1}, owner  # both shards have work
    with pytest.raises(KeyboardInterrupt):  # shard 0 dies after its first photo
        align_recon(photos, cache, min_face_size=32, detector=CountingDetector(fail_after=1), shard=0, num_shards=2)
    with pytest.raises(ReconNotAlignedError, match=r"of 5 photos .* are not aligned yet.*--stop-after-step 0"):
        collect_recon(photos, cache, min_face_size=32)
    det1 = CountingDetector()
    s1 = align_recon(photos, cache, min_face_size=32, detector=det1, shard=1, num_shards=2)
    det0 = CountingDetector()
    s0 = align_recon(photos, cache, min_face_size=32, detector=det0, shard=0, num_shards=2, progress=True)
    mine = sum(v == 0 for v in owner.values())
    assert s0.photos == mine and s0.from_cache >= 1 and s0.aligned_now >= 1  # the killed run's photos are kept
    assert s0.from_cache + s0.aligned_now == mine
    assert s1.photos == len(names) - mine and s1.aligned_now == s1.photos
    records = StepStore(cache, "align").records()
    assert sorted(r["file"] for r in records.values()) == names  # every photo exactly once, by its own shard
    items, report = collect_recon(photos, cache, min_face_size=32)
    assert sorted(Path(it.image).name for it in items) == ["group_crop.jpg", "tom.png", "tom_flipped.png"]
    assert {s["file"]: s["reason"] for s in report.skipped} == {"corrupt.jpg": "unreadable", "mask.jpg": "no_face"}
    # another shard layout finds everything done
    again = CountingDetector(fail_after=0)
    assert sum(align_recon(photos, cache, min_face_size=32, detector=again, shard=i, num_shards=3).aligned_now
               for i in range(3)) == 0
