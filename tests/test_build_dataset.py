"""The self-augmented editing data builder: names, sources, edits, filter; resumable and sharded.

Face-dependent steps run on real photos (tests/face_photos.PhotoGenerator) with the real MTCNN,
a tiny arcface-style ViT and a tiny CLIP; the real tiny diffusers pipeline checks the wiring.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
from face_photos import HAVE_PHOTOS, PhotoGenerator, needs_photos
from tiny_diffusers import make_tiny_arcface, make_tiny_clip_model, make_tiny_sd

from dreamid_core import FacePipeline, make_detector
from training.build_dataset import cli as build_dataset
from training.build_dataset.edit_prompts import EDIT_TEMPLATES, EXAMPLE_NAMES, load_names, parse_names
from training.build_dataset.selection import combine_scores, keep_count, select_top
from training.build_dataset.steps import (
    MANIFEST,
    BuildConfig,
    build_manifest,
    edit_items,
    generate_edits,
    generate_sources,
    read_manifest,
    register_names,
    score_edits,
)
from training.common.records import StepStore, read_jsonl, shard_of
from training.common.scorers import ClipScorer, IdentityScorer

PEOPLE = {"Ann Example": "t1-0", "Bo Example": "t1-3", "Cy Example": "tom", "Dee Example": "none",
          "Eve Example": "t1-4"}
NAMES_TEXT = "\n".join(PEOPLE) + "\n"
FOUR = ("chef", "oil_painting", "pencil", "hat")
#: one source per name: Ann, Bo, Cy kept; Dee has no face; Eve's face is too small
SOURCE_OUTCOMES = {"kept": 3, "rejected:no_face": 1, "rejected:face_too_small": 1}


def _cfg(out: Path, **kw) -> BuildConfig:
    kw.setdefault("images_per_name", 1)
    kw.setdefault("min_face", 40.0)
    return BuildConfig(out=out, **kw)


def _names(cfg: BuildConfig) -> None:
    register_names(cfg, parse_names(NAMES_TEXT))


def _gen(**kw) -> PhotoGenerator:
    return PhotoGenerator(PEOPLE, small=("Eve Example",), **kw)


def _built_cfg(out: Path) -> BuildConfig:
    return _cfg(out, templates=FOUR, edits_per_prompt=2)


@pytest.fixture(scope="module")
def pipeline() -> FacePipeline:
    return FacePipeline(make_detector("mtcnn"), retry=False)


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scorers")
    arcface = make_tiny_arcface(folder / "arcface.pt")
    clip = make_tiny_clip_model(folder / "clip")
    return IdentityScorer(arcface), ClipScorer(clip), arcface, clip


@pytest.fixture(scope="module")
def built(tmp_path_factory, pipeline):
    """names + sources + edits (3 kept sources x 4 templates x 2 edits = 24), made once; copy before changing."""
    if not HAVE_PHOTOS:
        pytest.skip("needs the insightface sample photos and facenet-pytorch")
    out = tmp_path_factory.mktemp("built")
    cfg = _built_cfg(out)
    _names(cfg)
    assert generate_sources(cfg, _gen(), pipeline).outcomes == SOURCE_OUTCOMES
    assert generate_edits(cfg, _gen()).new == 24
    return out


def _copy(built: Path, tmp_path: Path, steps=("names", "sources", "edits")) -> Path:
    out = tmp_path / "data"
    for step in steps:
        shutil.copytree(built / step, out / step)
    return out


# -- names and prompts -----------------------------------------------------------------------------

def test_names_are_validated_and_deduplicated():
    names = parse_names("# comment\nAnn  Example\n\nann example  # again\nBo Example\n")
    assert [n.text for n in names] == ["Ann Example", "Bo Example"]
    assert len({n.slug for n in names}) == 2 and all("/" not in n.slug for n in names)
    with pytest.raises(ValueError, match=r"line 2 .*trigger word 'S\*'"):
        parse_names("Ann\nS* person\n")
    with pytest.raises(ValueError, match="line 1 .*characters long"):
        parse_names("x" * 200)
    with pytest.raises(ValueError, match="holds no names"):
        parse_names("# only a comment\n")
    example = load_names(EXAMPLE_NAMES)
    assert 8 <= len(example) <= 12


def test_edit_prompts_replace_the_name_by_the_trigger(built):
    items = edit_items(_cfg(built))  # every template of the paper
    assert len(items) == 3 * len(EDIT_TEMPLATES) and {it["template"] for it in items} == set(EDIT_TEMPLATES)
    assert {it["prompt"] for it in items} == {t.format(name="S*") for t in EDIT_TEMPLATES.values()}
    for it in items:
        assert "S*" in it["prompt"] and it["name"] not in it["prompt"]
        assert it["name"] in it["gen_prompt"] and it["prompt"] == it["gen_prompt"].replace(it["name"], "S*")


# -- selection ---------------------------------------------------------------------------------------

def test_selection_keeps_the_top_fraction_per_template():
    assert [keep_count(n, n, 0.25) for n in (1, 3, 4, 5, 8, 9)] == [1, 1, 1, 2, 2, 3]
    assert keep_count(30, 30, 0.1) == 3 and keep_count(8, 1, 0.5) == 1
    ranks = combine_scores([0.1, 0.9, 0.5], [0.3, 0.1, 0.2], "rank", id_weight=1.0)
    assert ranks == [0.0, 1.0, 0.5]
    z = combine_scores([1.0, 1.0], [0.2, 0.4], "zscore", id_weight=0.5)
    assert z[0] < z[1]
    items = [{"key": f"{t}{i}", "template": t, "id_score": i / 10, "clip_score": 0.2} for t in "ab" for i in range(8)]
    items.append({"key": "a-noface", "template": "a", "id_score": None, "clip_score": 0.9})
    select_top(items, keep_fraction=0.25)
    by_t = Counter(it["template"] for it in items if it["kept"])
    assert by_t == {"a": keep_count(9, 8, 0.25), "b": keep_count(8, 8, 0.25)} == {"a": 3, "b": 2}
    assert {it["key"] for it in items if it["kept"]} == {"a5", "a6", "a7", "b6", "b7"}
    assert next(it for it in items if it["key"] == "a-noface")["combined"] is None


# -- end to end on real faces -------------------------------------------------------------------------

def test_end_to_end_manifest_top_quarter_per_template(built, tmp_path, pipeline, scorers, caplog):
    identity, clip, arcface, clip_dir = scorers
    out = _copy(built, tmp_path)
    cfg = _built_cfg(out)
    sources = StepStore(out, "sources").records()
    assert len(sources) == 5
    for r in sources.values():
        assert (out / r["image"]).is_file()
        assert (r["crop"] is not None) == (r["status"] == "kept")
        if r["status"] == "kept":
            assert r["face_short_side"] > cfg.min_face and (out / r["crop"]).is_file()
    # filter through the CLI (builds the MTCNN pipeline and both scorers from their paths)
    assert build_dataset.main(["filter", "--out", str(out), "--face-model", str(arcface), "--clip-model",
                               str(clip_dir), "--device", "cpu", "--no-detect-retry"]) == 0
    lines = read_jsonl(out / MANIFEST)
    assert len(lines) == 24
    for line in lines:
        assert {"source_crop", "image", "prompt", "kept", "template", "name", "id_score", "clip_score"} <= set(line)
        assert "S*" in line["prompt"] and line["clip_score"] is not None
        if line["id_score"] is None:
            assert line["reason"] == "no_face" and not line["kept"]
    assert any(line["id_score"] is None for line in lines), "the photo generator drops the face in some edits"
    for template in FOUR:
        group = [line for line in lines if line["template"] == template]
        scored = [line for line in group if line["combined"] is not None]
        kept = [line for line in group if line["kept"]]
        # ceil(25 % of the template's 6 edits) = 2, fewer only if fewer than 2 have a face
        assert len(group) == 6 and len(kept) == keep_count(6, len(scored), 0.25) == min(2, len(scored))
        if kept and len(scored) > len(kept):
            assert min(k["combined"] for k in kept) >= max(s["combined"] for s in scored if not s["kept"])
    summary = json.loads((out / "manifest_summary.json").read_text())
    assert summary["kept"] == sum(line["kept"] for line in lines) and summary["combine"] == "rank"
    kept_records = read_manifest(out / MANIFEST)
    assert len(kept_records) == summary["kept"] and all(Path(r["source_crop"]).is_file() for r in kept_records)

    # a second invocation of every step does nothing new
    before = (out / MANIFEST).read_bytes()
    gen = _gen()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _names(cfg)
        assert generate_sources(cfg, gen, pipeline).new == 0
        assert generate_edits(cfg, gen).new == 0
        assert score_edits(cfg, pipeline, identity, clip).new == 0
        build_manifest(cfg)
    assert gen.calls == [] and (out / MANIFEST).read_bytes() == before
    assert sum("0 new items" in r.getMessage() for r in caplog.records) == 4
    # another keep fraction re-selects from the stored scores, without rescoring
    wider = build_manifest(BuildConfig(out=out, keep_fraction=0.5))
    assert all(c["kept"] == min(3, c["scored"]) for c in wider["per_template"].values())


@needs_photos
def test_interrupted_step_resumes_without_redoing_or_losing_items(tmp_path, pipeline):
    cfg = _cfg(tmp_path)
    _names(cfg)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_sources(cfg, _gen(fail_after=2), pipeline)
    assert len(StepStore(tmp_path, "sources").records()) == 2
    # a process killed mid-write leaves half a line: readers ignore it, the shard's writer cuts it off
    part = StepStore(tmp_path, "sources").part_path(0, 1)
    with open(part, "a", encoding="utf-8") as fh:
        fh.write('{"key": "half-writ')
    assert len(StepStore(tmp_path, "sources").records()) == 2
    gen = _gen()
    summary = generate_sources(cfg, gen, pipeline)
    assert summary.done_before == 2 and summary.new == 3 and len(gen.calls) == 3
    keys = [r["key"] for r in read_jsonl(part)]
    assert len(keys) == len(set(keys)) == 5
    assert part.read_text().endswith("}\n")


@needs_photos
def test_two_shards_cover_every_item_exactly_once(tmp_path, pipeline, scorers):
    identity, clip, *_ = scorers
    cfg0, cfg1 = (_cfg(tmp_path, shard=i, num_shards=2, templates=("chef", "pencil")) for i in (0, 1))
    _names(cfg0)
    s0 = generate_sources(cfg0, _gen(), pipeline)
    assert build_dataset.status(cfg0)["sources"]["pending"] == 5 - s0.new  # shard 1's items
    s1 = generate_sources(cfg1, _gen(), pipeline)
    assert s0.new + s1.new == 5 and s0.new > 0 and s1.new > 0
    assert build_dataset.status(cfg0)["sources"]["pending"] == 0
    store = StepStore(tmp_path, "sources")
    for shard in (0, 1):
        assert all(shard_of(r["key"], 2) == shard for r in read_jsonl(store.part_path(shard, 2)))
    all_keys = [r["key"] for r in store.iter_records()]
    assert len(all_keys) == len(set(all_keys)) == 5
    for cfg in (cfg0, cfg1):
        generate_edits(cfg, _gen())
    edit_keys = [r["key"] for r in StepStore(tmp_path, "edits").iter_records()]
    assert sorted(edit_keys) == sorted(it["key"] for it in edit_items(cfg0))
    assert len(edit_keys) == len(set(edit_keys)) == 3 * 2
    score_edits(cfg0, pipeline, identity, clip)
    assert build_manifest(cfg0)["written"] is False  # shard 1 has not scored yet
    assert not (tmp_path / MANIFEST).exists()
    score_edits(cfg1, pipeline, identity, clip)
    assert build_manifest(cfg1)["edits"] == 6
    report = build_dataset.status(cfg0)
    assert all(report[step]["pending"] == 0 for step in ("names", "sources", "edits", "scores"))
    assert sum(report["scores"]["parts"].values()) == 6 and len(report["scores"]["parts"]) == 2
    # another layout (one shard) finds everything done
    assert generate_sources(_cfg(tmp_path), _gen(), pipeline).new == 0


def test_corrupt_image_is_skipped_and_reported(built, tmp_path, pipeline, scorers, caplog):
    identity, clip, *_ = scorers
    out = _copy(built, tmp_path)
    cfg = _built_cfg(out)
    edits = sorted(StepStore(out, "edits").records().values(), key=lambda r: r["key"])
    broken = out / edits[0]["image"]
    broken.write_bytes(broken.read_bytes()[:100])  # truncated PNG
    other = next(e for e in edits if e["source_crop"] != edits[0]["source_crop"])
    (out / other["source_crop"]).write_bytes(b"not an image at all")
    with caplog.at_level(logging.WARNING):
        summary = score_edits(cfg, pipeline, identity, clip)
    assert summary.new == len(edits)
    assert edits[0]["image"] in summary.corrupt and other["source_crop"] in summary.corrupt
    assert any("corrupt image file(s) skipped" in r.getMessage() for r in caplog.records)
    report = build_manifest(cfg)
    assert edits[0]["image"] in report["corrupt"] and other["source_crop"] in report["corrupt"]
    lines = {r["key"]: r for r in read_jsonl(out / MANIFEST)}
    for key in (edits[0]["key"], other["key"]):
        assert lines[key]["reason"].startswith("corrupt_image") and not lines[key]["kept"]
    assert set(build_dataset.status(cfg, verify=True)["corrupt"]) == {edits[0]["image"], other["source_crop"]}


# -- the real (tiny) diffusers pipeline, through the CLI ----------------------------------------------------

def test_cli_with_tiny_diffusion_model(built, tmp_path, caplog):
    from PIL import Image

    base = make_tiny_sd(tmp_path / "sd", "sd2")
    names = tmp_path / "names.txt"
    names.write_text("Ann Example\nBo Example\n")
    out = tmp_path / "noise"
    gen_flags = ["--base-model", str(base), "--steps", "2", "--device", "cpu", "--no-detect-retry"]
    assert build_dataset.main(["names", "--out", str(out), "--names", str(names)]) == 0
    assert build_dataset.main(["generate-sources", "--out", str(out), *gen_flags, "--min-face", "0"]) == 0
    sources = StepStore(out, "sources").records()
    assert len(sources) == 2 * 4  # --images-per-name defaults to 4
    first = next(iter(sources.values()))
    with Image.open(out / first["image"]) as im:
        assert im.size == (32, 32)  # what the tiny model draws
    # seeds come from the item keys: another folder draws the same image
    again = tmp_path / "again"
    shutil.copytree(out / "names", again / "names")
    assert build_dataset.main(["generate-sources", "--out", str(again), *gen_flags, "--images-per-name", "1"]) == 0
    assert (again / first["image"]).read_bytes() == (out / first["image"]).read_bytes()
    # edits of the photo generator's kept faces, drawn by the tiny pipeline
    faces = _copy(built, tmp_path, steps=("names", "sources"))
    edit_flags = ["generate-edits", "--out", str(faces), *gen_flags, "--templates", "chef", "--batch-size", "2"]
    assert build_dataset.main(edit_flags) == 0
    assert len(StepStore(faces, "edits").records()) == 3
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert build_dataset.main(edit_flags) == 0
        assert build_dataset.main(["status", "--out", str(faces)]) == 0
    assert any("0 new items" in r.getMessage() for r in caplog.records)
    assert build_dataset.main(["filter", "--out", str(faces), "--face-model", str(tmp_path / "missing.pt"),
                               "--clip-model", str(tmp_path)]) == 2
    assert any("missing.pt" in r.getMessage() and "not found" in r.getMessage() for r in caplog.records)


# -- at scale: one device per shard, progress, per-step help (issue 8 item 8) ---------------------------------

def test_device_auto_puts_each_shard_on_its_own_gpu(monkeypatch):
    import torch

    from training.common.generation import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [str(resolve_device("auto", shard=i)) for i in range(8)] == [f"cuda:{i % 4}" for i in range(8)]
    assert str(resolve_device("cuda:2", shard=5)) == "cuda:2"  # an explicit device is kept
    seen = []
    monkeypatch.setattr("training.common.generation.resolve_device", lambda name, shard=0: seen.append((name, shard)) or
                        torch.device("cpu"))
    args = build_dataset.build_parser().parse_args(["filter", "--out", "x", "--shard", "6", "--num-shards", "8",
                                                    "--face-model", "missing.pt", "--clip-model", "missing"])
    with pytest.raises(Exception, match="missing"):
        build_dataset.make_scorers(args)
    assert seen == [("auto", 6)]


@pytest.mark.parametrize("step", ["names", "generate-sources", "generate-edits", "filter", "merge", "status"])
def test_help_of_each_step_says_what_it_does_and_writes(step, capsys):
    with pytest.raises(SystemExit) as info:
        build_dataset.main([step, "--help"])
    assert info.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse re-wraps (also at hyphens)
    short, long = build_dataset.STEP_HELP[step]
    assert "".join(f"{short}. {long}".split()) in text and ("Writes" in long or "writes nothing" in long)
    assert "--out" in text and "--shard" in text


@needs_photos
def test_steps_show_a_progress_bar_per_shard(tmp_path, pipeline, capsys):
    cfg = _cfg(tmp_path, progress=True, shard=0, num_shards=2)
    _names(cfg)
    summary = generate_sources(cfg, _gen(), pipeline)
    err = capsys.readouterr().err
    assert "sources 1/2: 100%" in err and f"{summary.new}/{summary.new}" in err


def test_each_shard_detects_and_scores_on_its_own_gpu(tmp_path, monkeypatch):
    """The filter's ONNX face model and the insightface detector use the shard's GPU (device_id), not GPU 0."""
    import torch

    onnxruntime = pytest.importorskip("onnxruntime")
    model_zoo = pytest.importorskip("insightface.model_zoo.model_zoo")
    from dreamid_core.faces.insightface_detector import PACKS
    from training.common import scorers

    pack = tmp_path / "insightface" / "models" / "antelopev2"
    pack.mkdir(parents=True)
    for name in PACKS["antelopev2"]["files"]:
        (pack / name).write_bytes(b"onnx")
    (tmp_path / "glintr100.onnx").write_bytes(b"onnx")
    sessions = []

    class Session:
        def __init__(self, path, **kwargs):
            sessions.append(kwargs)
            self.taskname = "detection"

        def get_inputs(self):
            return [type("Input", (), {"name": "input.1", "shape": [None, 3, 112, 112]})()]

        def prepare(self, ctx_id, **kwargs):
            pass

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", Session)
    monkeypatch.setattr(model_zoo, "get_model", lambda path, **kwargs: Session(path, **kwargs))
    monkeypatch.setattr(scorers._OnnxRecognizer, "_normalisation", staticmethod(lambda path: (127.5, 127.5)))
    monkeypatch.setattr("training.common.generation.resolve_device",
                        lambda name, shard=0: torch.device("cuda", shard % 4))  # --device auto on 4 GPUs
    args = build_dataset.build_parser().parse_args([
        "filter", "--out", str(tmp_path / "data"), "--shard", "6", "--num-shards", "8", "--provider", "cuda",
        "--detector", "insightface/antelopev2", "--insightface-root", str(tmp_path / "insightface"),
        "--face-model", str(tmp_path / "glintr100.onnx"), "--clip-model", str(tmp_path)])
    build_dataset.make_face_pipeline(args)
    scorers.IdentityScorer(args.face_model, device=torch.device("cuda", 2), provider=args.provider).load()
    assert [s["provider_options"] for s in sessions] == [[{"device_id": 2}, {}], [{"device_id": 2}, {}]]
    assert all(s["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"] for s in sessions)
