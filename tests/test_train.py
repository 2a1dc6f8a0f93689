"""The training loop on tiny seeded models (CPU): only the MLPs train (the backbone in its own group when
asked), every base family trains, divergence stops the run, the shipped data mix trains, and a prepared-only
run aligns without a step. Shared setup: tests/training_fixtures.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from training_fixtures import (
    encoder_tensors,
    flags,
    make_setup,
    one_thread,  # noqa: F401  (a fixture)
    recon_photos,
)

from training.common.diffusion import step_generator
from training.train import TrainingDivergedError, train
from training.train.config import ConfigError, ExperimentConfig
from training.train.data import load_edit_manifest
from training.train.loss import diffusion_loss
from training.train.prepare import build_encoder, load_base

pytest.importorskip("accelerate")


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")
REPO = Path(__file__).resolve().parents[1]


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
