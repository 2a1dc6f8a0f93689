"""The training loop on tiny seeded models (CPU): it learns, only the MLPs train, a killed run resumes
bit for bit, interrupted checkpoint writes are harmless, divergence stops the run, and the data
pipeline skips bad photos. See tests/training_fixtures.py for the tiny setup."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from training_fixtures import insightface_images, make_setup, one_thread, subprocess_env  # noqa: F401

from training.common.diffusion import step_generator
from training.common.latents import LatentCache
from training.train import RunFlags, TrainingDivergedError, train
from training.train.checkpoint import CheckpointManager, is_complete
from training.train.config import ConfigError, ExperimentConfig
from training.train.data import TrainingData, collate, load_edit_manifest, write_report
from training.train.loss import diffusion_loss
from training.train.prepare import build_encoder, load_base
from training.train.recon import prepare_recon
from training.train.sampler import MixSampler

pytest.importorskip("accelerate")


pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process run starts from a clean slate."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def setup_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def cfg(setup_root) -> ExperimentConfig:
    return make_setup(setup_root)


def flags(out: Path, **kw) -> RunFlags:
    return RunFlags(output_dir=str(out), num_workers=0, report_to=kw.pop("report_to", "none"), progress=False, **kw)


@pytest.fixture(scope="module")
def reference(cfg, setup_root):
    """The uninterrupted 20-step run every resumed run must reproduce."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    out = setup_root / "reference"
    result = train(cfg, flags(out, report_to="tensorboard", log_every=5))
    AcceleratorState._reset_state(reset_partial_state=True)
    return result


def encoder_tensors(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / f"checkpoint-{step}" / "encoder.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


# -- learning -----------------------------------------------------------------------------------

def test_twenty_steps_lower_the_loss_and_leave_a_checkpoint(reference):
    losses = reference.losses
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.05, f"loss did not fall: first 5 {first:.4f}, last 5 {last:.4f} ({losses})"
    run = reference.output_dir
    assert (run / "latest").read_text().strip() == "checkpoint-20"
    assert is_complete(run / "checkpoint-20") and is_complete(run / "checkpoint-10")
    assert ExperimentConfig.load(run / "checkpoint-20" / "config.json") == ExperimentConfig.load(run / "config.json")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert list(run.glob("logs/**/events.out.tfevents.*")), "no TensorBoard event file"
    report = json.loads((run / "data_report.json").read_text())
    assert report["edit"]["usable"] == 4 and report["edit"]["not_kept"] == 1


def test_only_the_mlps_and_norms_get_gradients(cfg):
    base = load_base(cfg, "cpu")
    encoder = build_encoder(cfg, base)
    data_items, _ = load_edit_manifest(cfg.edit_manifest)
    from training.train.data import load_crop

    crops = torch.stack([load_crop(it.crop, 112) for it in data_items[:2]])
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    parts = diffusion_loss(base, encoder, encoder.split, latents, crops, ["a photo of S*", "S* as a chef"],
                           generator=step_generator(0, 0), reg_weight=cfg.reg_weight)
    parts.loss.backward()
    for name, p in encoder.named_parameters():
        if name.startswith("backbone."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None, name
    for mlp in encoder.projections:
        assert all(p.grad.abs().sum() > 0 for p in mlp.parameters())
    assert encoder.feature_norms[0].weight.grad.abs().sum() > 0
    assert not encoder.backbone.training  # BatchNorm statistics stay as published
    for module in [base.unet, base.vae, *base.text_encoders]:
        assert not module.training
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())


def test_backbone_lr_trains_the_backbone_in_its_own_group(cfg):
    from training.train.prepare import build_optimizer

    base = load_base(cfg, "cpu")
    encoder = build_encoder(cfg.replace(backbone_lr=1e-6), base)
    opt = build_optimizer(cfg.replace(backbone_lr=1e-6), encoder)
    assert [g["name"] for g in opt.param_groups] == ["projection", "backbone"]
    assert opt.param_groups[1]["lr"] == 1e-6
    trained = {n for n, p in encoder.backbone.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in encoder.backbone.named_parameters()} - {"mask_token"}  # unused by forward


@pytest.mark.parametrize("family,prediction", [("sd2", "v_prediction"), ("sdxl", "epsilon")])
def test_other_base_models_train(setup_root, family, prediction, tmp_path):
    cfg = make_setup(setup_root, family=family, prediction_type=prediction, max_steps=3, cache_latents="off")
    result = train(cfg, flags(tmp_path / "run"))
    assert result.step == 3 and all(math.isfinite(x) for x in result.losses)


# -- resuming --------------------------------------------------------------------------------------

def test_sigkilled_run_resumes_bit_for_bit(cfg, reference, tmp_path):
    """A real `python -m training.train`, killed with SIGKILL once checkpoint-10 exists, then resumed."""
    cfg_path = cfg.save(tmp_path / "cfg.json")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "training.train", "--config", str(cfg_path), "--output-dir", str(run),
           "--num-workers", "0", "--report-to", "none", "--no-progress", "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while not (run / "latest").is_file():
            assert proc.poll() is None, f"trainer exited early:\n{proc.stdout.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    latest = CheckpointManager(run).latest()
    assert latest is not None and latest.step == 10, "the run finished before it could be killed"
    resumed = train(cfg, flags(run, resume=True))
    assert resumed.step == 20
    assert resumed.losses == reference.losses[10:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 21))  # the killed run's extra lines were dropped
    assert_same_weights(encoder_tensors(run, 20), encoder_tensors(reference.output_dir, 20))


def test_interrupted_checkpoint_write_never_becomes_latest(cfg, reference, tmp_path, monkeypatch):
    import training.train.checkpoint as ckpt_mod

    run = tmp_path / "run"
    real_save = torch.save

    def failing_save(obj, path, *a, **kw):  # disk full half-way through step 10's training state
        if str(path).endswith("training_state.pt") and ".tmp-checkpoint-10" in str(path):
            Path(path).write_bytes(b"\x80\x02half a pickle")
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        train(cfg.replace(checkpoint_every=5), flags(run))
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert (run / "latest").read_text().strip() == "checkpoint-5"
    assert (run / ".tmp-checkpoint-10").is_dir() and not (run / "checkpoint-10").exists()
    # a folder that looks like a newer checkpoint but was never completed is ignored too
    (run / "checkpoint-15").mkdir()
    (run / "checkpoint-15" / "encoder.safetensors").write_bytes(b"truncated")
    assert CheckpointManager(run).latest().step == 5

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg.replace(checkpoint_every=5), flags(run))
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = train(cfg.replace(checkpoint_every=5), flags(run, resume=True))
    assert resumed.step == 20 and not (run / ".tmp-checkpoint-10").exists()
    assert resumed.losses == reference.losses[5:]
    assert_same_weights(encoder_tensors(run, 20), encoder_tensors(reference.output_dir, 20))


def test_resume_refuses_a_different_experiment(cfg, reference, tmp_path):
    import shutil

    run = shutil.copytree(reference.output_dir, tmp_path / "run")
    with pytest.raises(ConfigError, match="reg_weight: checkpoint 0.0001 vs now 0.01"):
        train(cfg.replace(reg_weight=1e-2, max_steps=25), flags(run, resume=True))
    with pytest.raises(ConfigError, match="freezes or unfreezes the backbone"):
        train(cfg.replace(backbone_lr=1e-6, max_steps=25), flags(run, resume=True))


# -- divergence ---------------------------------------------------------------------------------------

def test_nan_loss_stops_with_the_step_and_last_checkpoint(cfg, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError) as info:
        train(cfg.replace(lr=1e30, checkpoint_every=1), flags(run))  # Adam moves every weight by ~1e30
    message = str(info.value)
    step = int(message.split("at step ")[1].split(":")[0])
    assert step >= 2 and "not finite" in message
    assert str(run / f"checkpoint-{step - 1}") in message
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == step - 1 and all(math.isfinite(m["loss"]) for m in metrics)
    # the message names the step's samples and the two resume commands (issue 8 item 6)
    positions = [f"#{p} img" for p in range((step - 1) * cfg.batch_size, step * cfg.batch_size)]
    assert all(p in message for p in positions), message
    assert f"--resume --skip-step {step}" in message and "--config NEW.json" in message


def test_resume_accepts_a_lower_lr_and_grad_clipping(cfg, reference, tmp_path):
    """What the divergence message asks for: lr and max_grad_norm may change on resume, and take effect."""
    import shutil

    run = shutil.copytree(reference.output_dir, tmp_path / "run")
    shutil.rmtree(run / "checkpoint-20")
    resumed = train(cfg.replace(lr=cfg.lr / 10, max_grad_norm=0.5, max_steps=12), flags(run, resume=True))
    assert resumed.step == 12 and resumed.losses[0] == reference.losses[10]  # same weights and data at step 11
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in metrics] == [cfg.lr] * 10 + [cfg.lr / 10] * 2
    assert all(m["grad_norm"] >= 0 for m in metrics)
    state = torch.load(run / "checkpoint-12" / "training_state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(cfg.lr / 10)
    assert ExperimentConfig.load(run / "config.json").lr == cfg.lr / 10


def test_skip_step_drops_the_batch_and_keeps_the_schedule(cfg, reference, tmp_path):
    run = tmp_path / "run"
    result = train(cfg.replace(checkpoint_every=1, max_steps=3), flags(run, skip_steps=(2,)))
    assert result.step == 3 and len(result.losses) == 2
    assert result.losses[0] == reference.losses[0]
    assert_same_weights(encoder_tensors(run, 2), encoder_tensors(run, 1))  # nothing was updated at step 2
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[1] == {"step": 2, "skipped": True}
    state = torch.load(run / "checkpoint-3" / "training_state.pt", weights_only=True)
    assert state["sampler"]["position"] == 3 * cfg.batch_size  # step 3 trained on step 3's samples


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


# -- data ----------------------------------------------------------------------------------------------

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


# -- config ----------------------------------------------------------------------------------------------

def test_config_round_trips_and_names_bad_values(cfg, tmp_path):
    assert ExperimentConfig.load(cfg.save(tmp_path / "c.json")) == cfg
    assert ExperimentConfig.from_json(cfg.to_json()).config_hash() == cfg.config_hash()
    with pytest.raises(ConfigError, match="unknown fields \\['learning_rate'\\]"):
        ExperimentConfig.from_dict({**cfg.to_dict(), "learning_rate": 1.0})
    with pytest.raises(ConfigError, match="mixed_precision = 'fp8'"):
        cfg.replace(mixed_precision="fp8")
    with pytest.raises(ConfigError, match="do not contain the trigger"):
        cfg.replace(prompt_templates=("a photo of sks",))
    with pytest.raises(ConfigError, match="recon_fraction = 0.5 but edit_manifest is null"):
        cfg.replace(recon_fraction=0.5, recon_dir="x", edit_manifest=None).check_data()
    with pytest.raises(ConfigError, match="random_backbone"):
        ExperimentConfig(base_model="x")


def test_shipped_paper_config_is_valid():
    """training/configs/sd21_base_paper.json parses and keeps the paper's recipe."""
    from training.train.config import ExperimentConfig

    cfg = ExperimentConfig.load(Path(__file__).resolve().parents[1] / "training" / "configs" / "sd21_base_paper.json")
    assert (cfg.lr, cfg.reg_weight, cfg.num_tokens, cfg.max_steps) == (5e-5, 1e-4, 2, 60_000)


# -- the shipped recipe's prompts and data mix (issue 8 item 1) ----------------------------------------

def _shipped_prompts() -> dict[str, str]:
    """Every prompt the shipped recipe can put through a tokenizer with the trigger: label -> prompt."""
    from training.build_dataset.edit_prompts import EDIT_TEMPLATES, training_prompt
    from training.evaluate import load_prompts
    from training.train.config import DEFAULT_TEMPLATES

    prompts = {f"config.DEFAULT_TEMPLATES[{i}]": t for i, t in enumerate(DEFAULT_TEMPLATES)}
    for path in sorted((REPO / "training" / "configs").glob("*.json")):
        shipped = ExperimentConfig.load(path)
        prompts.update({f"{path.name}[{i}]": t for i, t in enumerate(shipped.prompt_templates)})
    prompts.update({f"edit_prompts.{tid}": training_prompt(t) for tid, t in EDIT_TEMPLATES.items()})
    for path in sorted((REPO / "training" / "data").glob("*prompts*.txt")):
        prompts.update({f"{path.name}:{i}": p for i, p in enumerate(load_prompts(path))})
    return prompts


def _family_tokenizers(family: str):
    from tiny_diffusers import clip_tokenizer

    # the real CLIP BPE; SD2 and SDXL's second tokenizer pad with "!" as the published ones do
    return {"sd1": [clip_tokenizer()], "sd2": [clip_tokenizer("!")],
            "sdxl": [clip_tokenizer(), clip_tokenizer("!")]}[family]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_shipped_prompt_tokenizes_with_the_trigger(family):
    from tiny_diffusers import bpe_vocab_path

    from training.common.prompt_encoding import tokenize_with_trigger

    if bpe_vocab_path() is None:
        pytest.skip("needs the CLIP BPE vocabulary of the open-clip-torch wheel")

    prompts = _shipped_prompts()
    assert len(prompts) >= 8 + 9 + 2  # templates, edit prompts, example evaluation prompts
    failed = {}
    for tokenizer in _family_tokenizers(family):
        for label, prompt in prompts.items():
            try:
                tok = tokenize_with_trigger(tokenizer, [prompt], "S*", 2)
            except Exception as exc:  # noqa: BLE001 - every failure is listed below
                failed[label] = f"{prompt!r}: {type(exc).__name__}: {exc}"
                continue
            if len(tok.positions[0]) != 2 * prompt.count("S*"):
                failed[label] = f"{prompt!r}: S* slots at {tok.positions[0]}"
    assert not failed, f"{family}: prompts without the trigger after tokenizing:\n" + "\n".join(
        f"  {k}: {v}" for k, v in failed.items())


def recon_photos(folder: Path) -> Path:
    """Three face photos (the insightface samples) for reconstruction samples."""
    images = insightface_images()
    folder.mkdir(parents=True, exist_ok=True)
    tom = Image.open(images / "Tom_Hanks_54745.png").convert("RGB")
    tom.save(folder / "tom.png")
    tom.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "tom_flipped.png")
    Image.open(images / "t1.jpg").convert("RGB").crop((380, 180, 660, 500)).save(folder / "group_crop.jpg")
    return folder


def test_shipped_data_mix_trains(setup_root, tmp_path):
    """The paper config's data mix (its recon_fraction and every one of its templates), on tiny models."""
    shipped = ExperimentConfig.load(REPO / "training" / "configs" / "sd21_base_paper.json")
    assert 0 < shipped.recon_fraction < 1
    photos = recon_photos(setup_root / "recon")
    steps = 2 * len(shipped.prompt_templates)  # batch 2 at a 50 % mix: each template is drawn in ~that many steps
    cfg = make_setup(setup_root, recon_dir=str(photos), recon_fraction=shipped.recon_fraction,
                     prompt_templates=shipped.prompt_templates, min_face_size=32, max_steps=steps,
                     checkpoint_every=steps, cache_latents="memory")
    result = train(cfg, flags(tmp_path / "run"))
    assert result.step == steps and all(math.isfinite(x) for x in result.losses)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["recon"]["usable"] == 3 and report["edit"]["usable"] == 4


# -- resuming with another launch (issue 8 item 3) -------------------------------------------------------

def rewrite_training_state(ckpt_dir: Path, **changes) -> None:
    """Edit a checkpoint's training_state.pt in place and keep complete.json's sizes true."""
    state = torch.load(ckpt_dir / "training_state.pt", weights_only=True)
    state.update(changes)
    torch.save(state, ckpt_dir / "training_state.pt")
    manifest = json.loads((ckpt_dir / "complete.json").read_text())
    manifest["files"]["training_state.pt"] = (ckpt_dir / "training_state.pt").stat().st_size
    (ckpt_dir / "complete.json").write_text(json.dumps(manifest))


def test_resume_with_another_global_batch_is_refused_with_the_right_command(cfg, reference, tmp_path):
    import shutil

    from training.train.launch import BatchChangeError

    run = shutil.copytree(reference.output_dir, tmp_path / "run")
    state = torch.load(run / "checkpoint-20" / "training_state.pt", weights_only=True)
    assert state["num_processes"] == 1 and state["global_batch"] == cfg.batch_size
    # as if it had been trained by 2 processes: global batch 2 x 2 x 1 = 4, this launch gives 2
    rewrite_training_state(run / "checkpoint-20", num_processes=2, global_batch=4,
                           launch="accelerate launch --multi_gpu --num_processes 2 -m training.train")
    with pytest.raises(BatchChangeError) as info:
        train(cfg.replace(max_steps=22), flags(run, resume=True))
    message = str(info.value)
    assert "from 4 (2 processes x batch_size 2 x gradient_accumulation_steps 1) to 2 (1 processes" in message
    assert f"--num_processes 2 -m training.train --output-dir {run} --resume" in message
    assert "gradient_accumulation_steps to 2" in message and "--allow-batch-change" in message
    # the same global batch on one process (accumulating 2 micro-batches) is the same recipe: accepted
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    same = train(cfg.replace(max_steps=22, gradient_accumulation_steps=2), flags(run, resume=True))
    assert same.step == 22
    assert torch.load(run / "checkpoint-22" / "training_state.pt", weights_only=True)["global_batch"] == 4


def test_allow_batch_change_resumes_with_the_new_batch(cfg, reference, tmp_path):
    import shutil

    run = shutil.copytree(reference.output_dir, tmp_path / "run")
    rewrite_training_state(run / "checkpoint-20", num_processes=2, global_batch=4)
    result = train(cfg.replace(max_steps=21), flags(run, resume=True, allow_batch_change=True))
    assert result.step == 21
    state = torch.load(run / "checkpoint-21" / "training_state.pt", weights_only=True)
    assert state["global_batch"] == 2 and state["sampler"]["position"] == 20 * 2 + 2


def test_launch_checks_name_the_working_command():
    from training.train.launch import LaunchError, check_launch, launch_command

    assert launch_command(1, {}) == "python -m training.train"
    assert launch_command(8, {"ACCELERATE_MIXED_PRECISION": "bf16", "TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "8"}) \
        == "accelerate launch --multi_gpu --num_processes 8 -m training.train"
    assert launch_command(16, {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "8"}).startswith(
        "torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d")
    check_launch(1, {})
    check_launch(2, {"WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2"):
        check_launch(1, {"WORLD_SIZE": "2", "RANK": "0"})  # torchrun on CPU without the CPU flag
    simple = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}
    check_launch(1, simple)  # accelerate launch --cpu, one process asked for
    check_launch(1, {"ACCELERATE_USE_CPU": "1", "MASTER_ADDR": "10.0.0.1"})  # a cluster's exported MASTER_ADDR
    with pytest.raises(LaunchError, match="runs a single process"):
        check_launch(1, {**simple, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})


# -- one trainer per run folder (issue 8 item 5) ---------------------------------------------------------

def test_a_second_trainer_on_the_same_folder_is_refused_naming_the_first(cfg, tmp_path):
    import socket

    from training.common.locking import RunFolderBusyError

    run = tmp_path / "run"
    code = ("import sys, time\nfrom training.common.locking import RunLock\nlock = RunLock(sys.argv[1]).__enter__()\n"
            "print('locked', flush=True)\ntime.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=REPO, env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(RunFolderBusyError) as info:
            train(cfg.replace(max_steps=2), flags(run))
        message = str(info.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message and "--output-dir" in message
        assert not (run / "metrics.jsonl").exists() and not (run / "config.json").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait(timeout=30)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    assert train(cfg.replace(max_steps=2), flags(run)).step == 2


# -- face alignment of the recon folder: its own sharded, resumable step (issue 8 item 2) ----------------

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


def test_stop_after_step_zero_prepares_only(setup_root, tmp_path, monkeypatch):
    import training.train.recon as recon

    photos = recon_photos(setup_root / "recon")
    cfg = make_setup(setup_root, recon_dir=str(photos), recon_fraction=0.5, min_face_size=32, max_steps=2,
                     checkpoint_every=2, cache_latents="memory", prompt_templates=("a photo of S*",))
    run = tmp_path / "run"
    result = train(cfg, flags(run, stop_after_step=0))
    assert result.step == 0 and result.checkpoint is None and not list(run.glob("checkpoint-*"))
    assert json.loads((run / "data_report.json").read_text())["recon"]["usable"] == 3
    assert list((run / "cache" / "faces" / "align" / "parts").glob("align.part-000-of-001.jsonl"))
    assert not (run / "metrics.jsonl").exists()

    def no_detector(*a, **kw):
        raise AssertionError("the faces were aligned by the prepare-only run")

    monkeypatch.setattr(recon, "make_detector", no_detector)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    assert train(cfg, flags(run)).step == 2


def test_process_group_timeout_is_explicit():
    from datetime import timedelta

    from training.train.cli import build_parser
    from training.train.run import process_group_kwargs

    args = build_parser().parse_args(["--output-dir", "x", "--process-group-timeout", "240"])
    assert process_group_kwargs(flags(Path("x"), process_group_timeout_min=args.process_group_timeout)).timeout \
        == timedelta(minutes=240)
    assert process_group_kwargs(flags(Path("x"))).timeout == timedelta(hours=3)


# -- a trained backbone is never dropped from checkpoints (issue 8 item 4) --------------------------------

def test_trained_backbone_must_be_checkpointed(cfg, tmp_path):
    with pytest.raises(ConfigError, match="backbone_lr = 1e-06 .* checkpoint_backbone is false"):
        cfg.replace(backbone_lr=1e-6, checkpoint_backbone=False)
    cfg.replace(backbone_lr=None, checkpoint_backbone=False)  # a frozen backbone need not be stored
    run = tmp_path / "run"
    train(cfg.replace(backbone_lr=1e-2, max_steps=1, checkpoint_every=1), flags(run))
    original = torch.load(cfg.backbone_path, weights_only=True)
    saved = {k.removeprefix("backbone."): v for k, v in encoder_tensors(run, 1).items() if k.startswith("backbone.")}
    changed = [k for k in saved if k in original and not torch.equal(saved[k], original[k])]
    assert changed, "the checkpoint holds the original backbone, not the trained one"


# -- a torn metrics.jsonl (issue 8 item 7) ------------------------------------------------------------------

def test_resume_tolerates_a_torn_metrics_line(cfg, reference, tmp_path):
    import shutil

    run = shutil.copytree(reference.output_dir, tmp_path / "run")
    shutil.rmtree(run / "checkpoint-20")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 21, "loss": 0.4')  # the disk filled up mid-line
    resumed = train(cfg, flags(run, resume=True))
    assert resumed.step == 20 and resumed.losses == reference.losses[10:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 21))


# -- a launcher whose processes would train independently (issue 8 item 9) -----------------------------------

def test_accelerate_launch_cpu_with_two_processes_is_stopped(cfg, tmp_path):
    """`accelerate launch --num_processes 2 --cpu` starts ONE process; it stops instead of training alone."""
    cfg_path = cfg.save(tmp_path / "cfg.json")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "-m",
           "training.train", "--config", str(cfg_path), "--output-dir", str(run), "--num-workers", "0",
           "--report-to", "none", "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "runs a single process" in proc.stderr and "ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N" in \
        proc.stderr, proc.stderr[-3000:]
    assert not (run / "config.json").exists()


def test_torchrun_without_the_cpu_flag_is_stopped(cfg, tmp_path):
    """A real 2-process torchrun on CPU: accelerate gives each process num_processes 1, so both would train
    the same folder independently; both stop with the command that works, before writing anything."""
    cfg_path = cfg.save(tmp_path / "cfg.json")
    run = tmp_path / "run"
    env = subprocess_env()
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.train", "--config", str(cfg_path), "--output-dir", str(run), "--num-workers", "0",
           "--report-to", "none", "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m training.train") >= 2, \
        proc.stderr[-3000:]
    assert not (run / "config.json").exists() and not (run / "metrics.jsonl").exists()


# -- model families (issue 8 item 11) -------------------------------------------------------------------------

@pytest.mark.parametrize("pipeline,component", [("StableDiffusion3Pipeline", "transformer"),
                                                ("FluxPipeline", "transformer")])
def test_an_unsupported_model_family_is_named_with_the_supported_ones(tmp_path, pipeline, component):
    from dreamid_core import ModelFilesError
    from training.common.base_model import load_base_model

    folder = tmp_path / "model"
    (folder / component).mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline, component: ["diffusers", "X"],
                                                         "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(ModelFilesError, match=f"is a {pipeline} model .*sd1 .*sd2 .*sdxl"):
        load_base_model(folder)
    with pytest.raises(ConfigError, match="SD3, Flux"):
        ExperimentConfig(base_model=str(folder), family="sd3", random_backbone=True)


def test_resolution_defaults_to_the_family_native_size(setup_root, tmp_path):
    sd2 = make_setup(setup_root, resolution=None)
    sdxl = make_setup(setup_root, family="sdxl", resolution=None)
    assert sd2.resolution is None and sd2.resolved().resolution == 512
    assert sdxl.resolved().resolution == 1024
    assert sdxl.replace(resolution=256).resolved().resolution == 256  # an explicit value is kept
    result = train(sd2.replace(recon_fraction=0.0), flags(tmp_path / "run", stop_after_step=0))
    assert result.step == 0 and ExperimentConfig.load(tmp_path / "run" / "config.json").resolution == 512


def test_shipped_configs_for_each_family():
    configs = {p.name: ExperimentConfig.load(p) for p in sorted((REPO / "training" / "configs").glob("*.json"))}
    assert set(configs) >= {"sd15_paper.json", "sd21_base_paper.json", "sdxl_base_paper.json"}
    from training.train.launch import global_batch

    for name, shipped in configs.items():
        assert (shipped.lr, shipped.reg_weight, shipped.num_tokens) == (5e-5, 1e-4, 2), name
        assert global_batch(8, shipped.batch_size, shipped.gradient_accumulation_steps) == 64, name  # 8 GPUs
    assert configs["sdxl_base_paper.json"].resolution == 1024
    assert configs["sd15_paper.json"].resolution == configs["sd21_base_paper.json"].resolution == 512


# -- a real 2-process run (issue 8 items 2 and 3) --------------------------------------------------------------

def test_two_process_run_shards_the_alignment_and_its_resume_keeps_the_batch(setup_root, tmp_path):
    """ACCELERATE_USE_CPU=1 torchrun with 2 processes (gloo): each rank aligns its shard of the recon folder,
    the checkpoint records 2 processes and their launcher, and a 1-process resume is refused with it."""
    from training.common.records import read_jsonl, shard_of
    from training.train.launch import BatchChangeError

    photos = recon_photos(tmp_path / "photos")
    Image.open(photos / "tom_flipped.png").rotate(5).save(photos / "tom_b.png")
    assert {shard_of(p.name, 2) for p in photos.iterdir()} == {0, 1}  # both ranks have photos to align
    cfg = make_setup(setup_root, recon_dir=str(photos), recon_fraction=0.5, min_face_size=32, max_steps=2,
                     checkpoint_every=2, cache_latents="memory", prompt_templates=("a photo of S*",))
    cfg_path = cfg.save(tmp_path / "cfg.json")
    run = tmp_path / "run"
    env = {**subprocess_env(), "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.train", "--config", str(cfg_path), "--output-dir", str(run), "--num-workers", "0",
           "--report-to", "none", "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    parts = sorted((run / "cache" / "faces" / "align" / "parts").iterdir())
    assert [p.name for p in parts] == ["align.part-000-of-002.jsonl", "align.part-001-of-002.jsonl"]
    for rank, part in enumerate(parts):  # each rank aligned exactly its own shard
        assert sorted(r["file"] for r in read_jsonl(part)) == sorted(
            p.name for p in photos.iterdir() if shard_of(p.name, 2) == rank)
    assert json.loads((run / "data_report.json").read_text())["recon"]["usable"] == 4
    state = torch.load(run / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert state["num_processes"] == 2 and state["global_batch"] == 2 * cfg.batch_size
    assert state["launch"] == "ACCELERATE_USE_CPU=1 torchrun --nnodes 1 --nproc_per_node 2 -m training.train"
    with pytest.raises(BatchChangeError, match="ACCELERATE_USE_CPU=1 torchrun --nnodes 1 --nproc_per_node 2 "
                                               f"-m training.train --output-dir {run} --resume"):
        train(cfg.replace(max_steps=3), flags(run, resume=True))
