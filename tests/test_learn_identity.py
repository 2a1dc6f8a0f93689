"""training.learn_identity on a tiny diffusers SD2 model built from config (CPU, seeded): the loss goes
down, the frozen model is untouched, the attention loss moves the identity's attention into the face,
the encoder init starts ahead, per-stage with every K and V = S* is the words pipeline exactly, the
command line writes loadable files, bad input fails clearly; and the evaluation scores both layouts
next to the encoder in one table."""

from __future__ import annotations

import csv
import hashlib
import logging

import numpy as np
import pytest
import torch
from face_photos import HAVE_PHOTOS, face_photo
from PIL import Image
from tiny_diffusers import (
    TINY_TEXT_WIDTH,
    make_tiny_arcface,
    make_tiny_clip_model,
    make_tiny_sd,
    tiny_backbone_config,
)
from training_fixtures import make_text_sensitive, one_thread  # noqa: F401  (fixture)

from dreamid_core import (
    EncoderConfig,
    FaceNotFoundError,
    FacePipeline,
    IDEncoder,
    make_detector,
    save_encoder,
)
from dreamid_core.learned_identity import (
    IdentityConfig,
    LearnedIdentity,
    load_learned_identity,
    save_learned_identity,
)
from training.common.base_model import load_base_model
from training.common.generation import DiffusersGenerator
from training.evaluate import cli as ev
from training.evaluate import compare as evi
from training.learn_identity import cli
from training.learn_identity.data import detect_faces, encode_photos
from training.learn_identity.init import as_layout, from_encoder, from_word
from training.learn_identity.loop import IdentityLearner, RunOptions
from training.learn_identity.sampling import IdentityGenerator

pytestmark = [pytest.mark.skipif(not HAVE_PHOTOS, reason="needs the insightface sample photos and facenet-pytorch"),
              pytest.mark.usefixtures("one_thread")]

LR = 5e-2  # word-embedding space of the tiny text encoder: a few steps must move it visibly


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("learn_identity")
    base_dir = make_text_sensitive(make_tiny_sd(root / "sd2", "sd2"))
    photos = root / "photos"
    photos.mkdir()
    face_photo("t1-1", size=96).save(photos / "p0.png")
    face_photo("t1-1", size=96, jitter=6).save(photos / "p1.png")
    no_face = root / "none.png"
    face_photo("none", size=96).save(no_face)
    pipeline = FacePipeline(make_detector("mtcnn"))
    base = load_base_model(base_dir)
    arrays, faces = detect_faces(sorted(photos.iterdir()), pipeline)
    latents = encode_photos(arrays, faces, base.vae, resolution=32)
    return {"root": root, "base_dir": base_dir, "photos": photos, "no_face": no_face, "base": base,
            "latents": latents, "arrays": arrays, "pipeline": pipeline}


def make_learner(tiny, *, layout="words", attn=0.0, steps=20, init=None, seed=0, **opts):
    base = tiny["base"]
    cfg = IdentityConfig(layout=layout, num_tokens=2, num_stages=5, steps=steps, lr=LR, attn_weight=attn, seed=seed,
                         target="sd2", resolution=32, stage_kind=opts.pop("stage_kind", "time"))
    start = init if init is not None else from_word(base, "person", 2)
    return IdentityLearner(base, tiny["latents"], cfg, as_layout(layout, start, "words", k=2, num_stages=5),
                           RunOptions(batch_size=2, log_every=0, **opts))


def state_hash(base) -> str:
    h = hashlib.sha256()
    for module in [base.unet, base.vae, *base.text_encoders]:
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("layout", ["words", "per_stage"])
def test_loss_decreases_and_a_rerun_is_identical(tiny, layout):
    learner = make_learner(tiny, layout=layout)
    before = learner.probe()
    result = learner.run(close=False)
    final = learner.probe()
    learner.close()
    assert final.mse < 0.85 * before.mse, (before, final)
    again = make_learner(tiny, layout=layout).run()  # a second run with the same seed
    for key in result.identity.tensors:
        assert torch.equal(result.identity.tensors[key], again.identity.tensors[key])
    shape = (2, TINY_TEXT_WIDTH) if layout == "words" else (5, 2, 2, TINY_TEXT_WIDTH)
    assert tuple(result.identity.tensors["clip_h"].shape) == shape and len(result.history) == 20


def test_frozen_model_bit_identical_and_processors_restored(tiny):
    base = tiny["base"]
    procs = {k: type(v).__name__ for k, v in base.unet.attn_processors.items()}
    digest = state_hash(base)
    a = make_learner(tiny, layout="per_stage", attn=0.003, steps=3, gradient_checkpointing=True).run()
    assert state_hash(base) == digest
    assert {k: type(v).__name__ for k, v in base.unet.attn_processors.items()} == procs
    assert not base.unet._forward_pre_hooks and not base.unet.is_gradient_checkpointing
    assert all(not p.requires_grad for m in [base.unet, base.vae, *base.text_encoders] for p in m.parameters())
    # checkpointing recomputes the attention in backward: same tokens as without it
    b = make_learner(tiny, layout="per_stage", attn=0.003, steps=3).run()
    torch.testing.assert_close(a.identity.tensors["clip_h"], b.identity.tensors["clip_h"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(a.identity.tensors["clip_h"], make_learner(tiny, layout="per_stage").params["clip_h"].data)


def test_attention_loss_moves_identity_attention_into_the_face(tiny):
    # The authors' form (context + class + face terms). On a tiny random UNet the MSE dwarfs the
    # attention term at 0.003 over 20 steps, so the weight is raised to make the comparison visible.
    p = {}
    for weight in (0.0, 100.0):  # the final tokens probed through the same processor, on the same draws
        learner = make_learner(tiny, attn=weight)
        learner.run(close=False)
        p[weight] = learner.probe()
        learner.close()
    p_off, p_on = p[0.0], p[100.0]
    assert p_on.attn < p_off.attn, (p_on, p_off)
    assert p_on.face_mass > p_off.face_mass, (p_on, p_off)


def _constant_encoder(tmp_path, parts):
    """A tiny encoder whose S* is ``parts`` for any face (its MLPs' last layers: weight 0, bias S*)."""
    torch.manual_seed(0)
    cfg = EncoderConfig(backbone=tiny_backbone_config(), target="sd2", token_widths=(("clip_h", TINY_TEXT_WIDTH),),
                        num_tokens=2, tap_layers=(1, 2, 3, 4), hidden_dim=16)
    enc = IDEncoder(cfg)
    with torch.no_grad():
        for i, mlp in enumerate(enc.projections):
            mlp.out.weight.zero_()
            mlp.out.bias.copy_(parts["clip_h"][i])
    return save_encoder(enc, tmp_path / "enc.safetensors")


def _steps_to_reach(learner, threshold, every=5, most=20):
    for step in range(most + 1):
        if step % every == 0 and learner.probe().mse <= threshold:
            learner.close()
            return step
        if step < most:
            learner.step(step)
    learner.close()
    return most + 1


def test_encoder_init_reaches_the_loss_in_fewer_steps_than_a_word(tiny, tmp_path):
    # wiring check: an encoder that gives a good S* (learned here, then put in an encoder file) must
    # reach through load_encoder -> encode_identity -> init what 20 word-init steps reach
    good = make_learner(tiny, seed=1).run().identity.tensors
    path = _constant_encoder(tmp_path, good)
    start = from_encoder(path, tiny["arrays"], tiny["pipeline"], {"clip_h": TINY_TEXT_WIDTH})
    torch.testing.assert_close(start["clip_h"], good["clip_h"])
    word_final = make_learner(tiny)
    word_final.run(close=False)
    threshold = word_final.probe().mse  # where 20 word-init steps get to
    word_final.close()
    from_enc, from_word_ = (_steps_to_reach(make_learner(tiny, init=start), threshold),
                            _steps_to_reach(make_learner(tiny), threshold))
    assert from_enc < from_word_, (from_enc, from_word_)


@pytest.mark.parametrize("stage_kind", ["time", "unet"])
def test_per_stage_with_every_key_and_value_equal_is_the_words_pipeline(tiny, stage_kind):
    base = tiny["base"]
    torch.manual_seed(3)
    words = {"clip_h": torch.randn(2, TINY_TEXT_WIDTH) * 0.5}
    prompts, seeds = ["a photo of S*", "S* as a chef, looking at the camera"], [11, 12]
    plain = DiffusersGenerator(base, steps=4, guidance=7.5).batch(
        prompts, seeds, parts={k: v[None].expand(2, -1, -1) for k, v in words.items()})
    ident = LearnedIdentity.per_stage_from_words(words, IdentityConfig(num_stages=5, stage_kind=stage_kind))
    gen = IdentityGenerator(base, num_stages=5, stage_kind=stage_kind, steps=4, guidance=7.5)
    staged = gen.batch(prompts, seeds, parts={k: v[None].expand(2, *v.shape) for k, v in ident.tensors.items()})
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, staged, strict=True))
    changed = {k: v.clone() for k, v in ident.tensors.items()}
    changed["clip_h"][1, 0] = torch.randn(2, TINY_TEXT_WIDTH)  # stage 1's keys: t 200..399 / the middle block
    other = gen.batch(prompts, seeds, parts={k: v[None].expand(2, *v.shape) for k, v in changed.items()})
    assert not np.array_equal(np.asarray(plain[0]), np.asarray(other[0]))
    # without classifier-free guidance the UNet sees only the prompts' rows
    plain1 = DiffusersGenerator(base, steps=2, guidance=1.0).batch(
        prompts, seeds, parts={k: v[None].expand(2, -1, -1) for k, v in words.items()})
    staged1 = IdentityGenerator(base, num_stages=5, stage_kind=stage_kind, steps=2, guidance=1.0).batch(
        prompts, seeds, parts={k: v[None].expand(2, *v.shape) for k, v in ident.tensors.items()})
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain1, staged1, strict=True))


def _cli_args(tiny, out, *extra):
    return ["--base-model", str(tiny["base_dir"]), "--photos", str(tiny["photos"]), "--out", str(out),
            "--resolution", "32", "--steps", "3", "--device", "cpu", "--lr", str(LR), "--log-every", "0", *extra]


def test_cli_writes_loadable_identities_of_both_layouts(tiny, tmp_path):
    out = tmp_path / "me.safetensors"
    assert cli.main(_cli_args(tiny, out, "--attn-weight", "0", "--loss-csv", str(tmp_path / "loss.csv"))) == 0
    ident = load_learned_identity(out, single_key="clip_h")  # tiny widths (32) do not name the encoder
    assert ident.layout == "words" and tuple(ident.tensors["clip_h"].shape) == (2, TINY_TEXT_WIDTH)
    assert ident.config.init == "word:person" and ident.config.steps == 3 and ident.config.attn_weight == 0.0
    assert ident.config.target == "sd2" and ident.config.extra["photos"] == 2
    ti = ev.EmbeddingIdentity(out, "sd2", {"clip_h": TINY_TEXT_WIDTH})  # a standard textual-inversion file
    assert torch.equal(ti.parts(None)["clip_h"], ident.tensors["clip_h"])
    with open(tmp_path / "loss.csv", newline="") as fh:
        assert [r["step"] for r in csv.DictReader(fh)] == ["0", "1", "2"]
    staged = tmp_path / "staged.safetensors"
    assert cli.main(_cli_args(tiny, staged, "--layout", "per_stage", "--init-file", str(out))) == 0
    ps = load_learned_identity(staged, single_key="clip_h")
    assert ps.layout == "per_stage" and tuple(ps.tensors["clip_h"].shape) == (5, 2, 2, TINY_TEXT_WIDTH)
    assert ps.config.init == "file:me.safetensors" and ps.config.stage_kind == "time"
    assert cli.main(_cli_args(tiny, out)) == 2  # exists: refused without --overwrite (a user error: exit 2)
    enc = _constant_encoder(tmp_path, {"clip_h": torch.randn(2, TINY_TEXT_WIDTH)})
    assert cli.main(_cli_args(tiny, out, "--encoder", str(enc), "--overwrite", "--steps", "1")) == 0
    assert load_learned_identity(out, single_key="clip_h").config.init == "encoder"


def test_bad_input_fails_clearly(tiny, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert cli.main(_cli_args(tiny, tmp_path / "x", "--photos", str(tiny["no_face"]))) == 2
    assert "No face found" in caplog.text and not (tmp_path / "x.safetensors").exists()
    args = cli.build_parser().parse_args(_cli_args(tiny, tmp_path / "x", "--photos", str(tiny["no_face"])))
    with pytest.raises(FaceNotFoundError, match=r"none\.png: No face found"):
        cli.run(args)
    for flag, value, message in [("--steps", "0", "steps must be an integer >= 1, got 0"),
                                 ("--lr", "nan", "learning rate must be a finite number > 0, got nan"),
                                 ("--attn-weight", "-1", "attention-loss weight must be finite and >= 0"),
                                 ("--resolution", "36", "resolution must be a positive multiple of 8")]:
        with pytest.raises(ValueError, match=message):
            cli.run(cli.build_parser().parse_args(_cli_args(tiny, tmp_path / "x", flag, value)))
    with pytest.raises(ValueError, match="steps must be"):
        make_learner(tiny, steps=0)


def test_evaluation_compares_ti_learned_and_encoder_in_one_table(tiny, tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    face_photo("t1-1", size=96).save(faces / "ann.png")
    face_photo("tom", size=96).save(faces / "tom.png")
    ti = save_learned_identity(tmp_path / "ti.safetensors", LearnedIdentity.words(
        from_word(tiny["base"], "person", 2), IdentityConfig(attn_weight=0.0)))
    per_face = tmp_path / "learned"
    for name in ("ann", "tom"):
        save_learned_identity(per_face / f"{name}.safetensors", LearnedIdentity.per_stage_from_words(
            {"clip_h": torch.randn(2, TINY_TEXT_WIDTH)}, IdentityConfig(extra={"seconds": 2.0})))
    enc = _constant_encoder(tmp_path, {"clip_h": torch.randn(2, TINY_TEXT_WIDTH)})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of S*\n")
    out = tmp_path / "eval"
    argv = ["--base-model", str(tiny["base_dir"]), "--faces", str(faces), "--prompts", str(prompts), "--out", str(out),
            "--face-model", str(make_tiny_arcface(tmp_path / "arc.pt")), "--clip-model",
            str(make_tiny_clip_model(tmp_path / "clip")), "--images-per-prompt", "1", "--steps", "2", "--device", "cpu",
            "--no-detect-retry", "--method", f"TI=identity:{ti}", "--method", f"learned=identity:{per_face}",
            "--method", f"encoder=encoder:{enc}"]
    assert evi.main(argv) == 0
    md = (out / "comparison.md").read_text()
    assert "| TI | learned identity (words, k=2, the same for every face) | 2 |" in md
    assert "| learned | learned identity (per_stage, k=2, 5 time stages, one per test face) | 2 |" in md
    assert "| encoder | DreamIdentity encoder | 2 |" in md and "2.0 s learning" in md
    with open(out / "comparison.csv", newline="") as fh:
        assert [r["method"] for r in csv.DictReader(fh)] == ["TI", "learned", "encoder"]
    for name in ("TI", "learned", "encoder"):
        assert (out / name / "summary.csv").is_file() and (out / name / "grid.png").is_file()
    (per_face / "tom.safetensors").unlink()
    assert evi.main(argv) == 2  # a face without its identity is named, not skipped


def test_sdxl_learns_both_text_encoders_and_per_stage_equals_words(tiny, tmp_path):
    base = load_base_model(make_tiny_sd(tmp_path / "sdxl", "sdxl"))
    latents = encode_photos(tiny["arrays"][:1], [tiny["pipeline"].process_one(tiny["arrays"][0])], base.vae,
                            resolution=32)
    start = from_word(base, "person", 2)
    for layout, kind in [("words", "time"), ("per_stage", "unet")]:
        cfg = IdentityConfig(layout=layout, steps=2, lr=LR, attn_weight=0.003, stage_kind=kind, target="sdxl")
        learner = IdentityLearner(base, latents, cfg, as_layout(layout, start, "words", k=2, num_stages=5),
                                  RunOptions(batch_size=2, log_every=0))
        ident = learner.run().identity
        for key, width in (("clip_l", TINY_TEXT_WIDTH), ("clip_g", 48)):
            t = ident.tensors[key]
            assert t.shape[-1] == width and not torch.equal(t.reshape(-1, width)[:2], start[key])
    words = {k: v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(5)) for k, v in start.items()}
    a = DiffusersGenerator(base, steps=3).batch(["a photo of S*"], [1], parts={k: v[None] for k, v in words.items()})
    staged = LearnedIdentity.per_stage_from_words(words, IdentityConfig(num_stages=5))
    b = IdentityGenerator(base, steps=3, num_stages=5).batch(["a photo of S*"], [1],
                                                             parts={k: v[None] for k, v in staged.tensors.items()})
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_training_evaluate_scores_a_per_stage_identity_through_the_processor(tiny, tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    face_photo("t1-1", size=96).save(faces / "ann.png")
    words = {"clip_h": torch.randn(2, TINY_TEXT_WIDTH, generator=torch.Generator().manual_seed(7))}
    ti = save_learned_identity(tmp_path / "ti.safetensors", LearnedIdentity.words(words))
    staged = save_learned_identity(tmp_path / "staged.safetensors", LearnedIdentity.per_stage_from_words(words))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of S*\n")
    common = ["--base-model", str(tiny["base_dir"]), "--faces", str(faces), "--prompts", str(prompts),
              "--face-model", str(make_tiny_arcface(tmp_path / "arc.pt")), "--clip-model",
              str(make_tiny_clip_model(tmp_path / "clip")), "--images-per-prompt", "1", "--steps", "3", "--device",
              "cpu", "--no-detect-retry"]
    assert ev.main([*common, "--out", str(tmp_path / "ti"), "--embedding", str(ti)]) == 0
    assert ev.main([*common, "--out", str(tmp_path / "ps"), "--identity", str(staged)]) == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "images" / "ann" / "000-0.png")) for d in ("ti", "ps"))
    assert np.array_equal(a, b)  # every stage's K and V = S*: the words image, so the processor ran exactly
    changed = {"clip_h": LearnedIdentity.per_stage_from_words(words).tensors["clip_h"].clone()}
    changed["clip_h"][1, 1] = torch.randn(2, TINY_TEXT_WIDTH)  # stage 1's values (t 200..399)
    other = save_learned_identity(tmp_path / "other.safetensors", LearnedIdentity(
        IdentityConfig(layout="per_stage"), changed))
    assert ev.main([*common, "--out", str(tmp_path / "other"), "--identity", str(other)]) == 0
    c = np.asarray(Image.open(tmp_path / "other" / "images" / "ann" / "000-0.png"))
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="folder of per-face identities"):
        evi.LearnedIdentitySource(tmp_path / "faces", {"clip_h": TINY_TEXT_WIDTH})
