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
from dreamid_core.identities.learned_identity import (
    IdentityConfig,
    LearnedIdentity,
    load_learned_identity,
    save_learned_identity,
)
from dreamid_core.learning import IdentityLearner, RunOptions, start_tensors
from training.common.base_model import load_base_model
from training.common.generation import DiffusersGenerator
from training.evaluate import cli as ev
from training.evaluate import compare as evi
from training.learn_identity import cli
from training.learn_identity.data import detect_faces, encode_photos
from training.learn_identity.host import DiffusersHost
from training.learn_identity.init import from_encoder, from_word
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


def make_learner(tiny, *, layout="words", attn=0.0, steps=20, init=None, seed=0, stage_kind="time",
                 gradient_checkpointing=False, **opts):
    """(host, learner) on the tiny SD2 base; close the host when done."""
    base = tiny["base"]
    cfg = IdentityConfig(layout=layout, num_tokens=2, num_stages=5, steps=steps, lr=LR, attn_weight=attn, seed=seed,
                         target="sd2", resolution=32, stage_kind=stage_kind)
    host = DiffusersHost(base, num_stages=5, stage_kind=stage_kind, gradient_checkpointing=gradient_checkpointing)
    start = init if init is not None else from_word(host, "person", 2)
    learner = IdentityLearner(host, tiny["latents"], cfg, start,
                              RunOptions(batch_size=2, gradient_checkpointing=gradient_checkpointing, **opts))
    return host, learner


def learn(tiny, **kw):
    host, learner = make_learner(tiny, **kw)
    with host:
        return learner.run()


def state_hash(base) -> str:
    h = hashlib.sha256()
    for module in [base.unet, base.vae, *base.text_encoders]:
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("layout", ["words", "per_stage"])
def test_loss_decreases_and_a_rerun_is_identical(tiny, layout):
    result = learn(tiny, layout=layout)
    assert result.final.diffusion < 0.85 * result.initial.diffusion, (result.initial, result.final)
    again = learn(tiny, layout=layout)  # a second run with the same seed
    for key in result.identity.tensors:
        assert torch.equal(result.identity.tensors[key], again.identity.tensors[key])
    shape = (2, TINY_TEXT_WIDTH) if layout == "words" else (5, 2, 2, TINY_TEXT_WIDTH)
    assert tuple(result.identity.tensors["clip_h"].shape) == shape and len(result.history) == 20
    extra = result.identity.config.extra
    assert extra["num_photos"] == 2 and extra["batch_size"] == 2
    assert extra["final_diffusion_loss"] == result.final.diffusion


def test_frozen_model_bit_identical_and_processors_restored(tiny):
    base = tiny["base"]
    procs = {k: type(v).__name__ for k, v in base.unet.attn_processors.items()}
    digest = state_hash(base)
    grads = [p.requires_grad for m in [base.unet, *base.text_encoders] for p in m.parameters()]
    a = learn(tiny, layout="per_stage", attn=0.003, steps=3, gradient_checkpointing=True)
    assert state_hash(base) == digest
    assert {k: type(v).__name__ for k, v in base.unet.attn_processors.items()} == procs
    assert not base.unet._forward_pre_hooks and not base.unet.is_gradient_checkpointing
    assert [p.requires_grad for m in [base.unet, *base.text_encoders] for p in m.parameters()] == grads
    assert all(p.grad is None for m in [base.unet, base.vae, *base.text_encoders] for p in m.parameters())
    # checkpointing recomputes the attention (and the text encodings) in backward: the same vectors
    b = learn(tiny, layout="per_stage", attn=0.003, steps=3)
    torch.testing.assert_close(a.identity.tensors["clip_h"], b.identity.tensors["clip_h"], rtol=1e-5, atol=1e-6)
    start = start_tensors("per_stage", from_word(DiffusersHost(base), "person", 2), k=2, num_stages=5)
    assert not torch.equal(a.identity.tensors["clip_h"], start["clip_h"])


def test_attention_face_term_moves_identity_attention_into_the_face(tiny):
    # The face term alone (context and class terms off), weighted up so 20 tiny steps show the direction;
    # face mass is measured before and after on the same fixed draws.
    off = learn(tiny, attn=0.0)
    on = learn(tiny, attn=20.0, attn_terms=(0.0, 0.0, 1.0))
    assert off.initial.face_mass == on.initial.face_mass
    assert on.final.face_mass > on.initial.face_mass + 0.01, (on.initial, on.final)
    assert on.final.face_mass > off.final.face_mass, (on.final, off.final)


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


def test_encoder_init_starts_where_word_init_arrives(tiny, tmp_path):
    # wiring check: an encoder that gives a good S* (learned here, then put in an encoder file) must
    # start, through load_encoder -> encode_identity -> init, where 20 word-init steps arrive
    word = learn(tiny, seed=1)
    good = word.identity.tensors
    path = _constant_encoder(tmp_path, good)
    start = from_encoder(path, tiny["arrays"], tiny["pipeline"], {"clip_h": TINY_TEXT_WIDTH})
    torch.testing.assert_close(start["clip_h"], good["clip_h"])
    from_enc = learn(tiny, seed=1, init=start, steps=1)
    assert from_enc.initial.diffusion == pytest.approx(word.final.diffusion, rel=1e-5)
    assert from_enc.initial.diffusion < word.initial.diffusion


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
    assert ident.config.target == "sd2" and ident.config.extra["num_photos"] == 2
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
    for flag, value, message in [("--steps", "0", "steps=0: learning needs at least 1 step"),
                                 ("--lr", "nan", "learning_rate=NaN is not a positive finite number"),
                                 ("--attn-weight", "-1", "attention_loss_weight=-1.0 must be a finite number >= 0"),
                                 ("--resolution", "36", "resolution=36 must be a positive multiple of 8")]:
        with pytest.raises(ValueError, match=message):
            cli.run(cli.build_parser().parse_args(_cli_args(tiny, tmp_path / "x", flag, value)))
    with pytest.raises(ValueError, match="steps=0"):
        make_learner(tiny, steps=0)


def test_evaluation_compares_ti_learned_and_encoder_in_one_table(tiny, tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    face_photo("t1-1", size=96).save(faces / "ann.png")
    face_photo("tom", size=96).save(faces / "tom.png")
    ti = save_learned_identity(tmp_path / "ti.safetensors", LearnedIdentity.words(
        from_word(DiffusersHost(tiny["base"]), "person", 2), IdentityConfig(attn_weight=0.0)))
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
    for layout, kind in [("words", "time"), ("per_stage", "unet")]:
        cfg = IdentityConfig(layout=layout, steps=2, lr=LR, attn_weight=0.003, stage_kind=kind, target="sdxl",
                             resolution=32)
        with DiffusersHost(base, num_stages=5, stage_kind=kind) as host:
            start = from_word(host, "person", 2)
            ident = IdentityLearner(host, latents, cfg, start, RunOptions(batch_size=2)).run().identity
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
