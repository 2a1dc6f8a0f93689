"""The experiment config and the shipped recipes: round trips, bad values named, every shipped config valid
for its family, every shipped prompt tokenizes with the trigger, resolution defaults, unsupported families."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from training_fixtures import (
    flags,
    make_setup,
    one_thread,  # noqa: F401  (a fixture)
)

from training.train import train
from training.train.config import ConfigError, ExperimentConfig

pytest.importorskip("accelerate")


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")
REPO = Path(__file__).resolve().parents[1]


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


def test_resolution_defaults_to_the_base_model_own_size(setup_root, tmp_path):
    """null resolution: the UNet's sample size x the VAE's factor (the tiny models: 16 x 2 = 32 px)."""
    sd2 = make_setup(setup_root, resolution=None)
    sdxl = make_setup(setup_root, family="sdxl", resolution=None)
    assert sd2.resolution is None and sd2.resolved().resolution == 32
    assert sdxl.resolved().resolution == 32
    assert sdxl.replace(resolution=256).resolved().resolution == 256  # an explicit value is kept
    result = train(sd2.replace(recon_fraction=0.0), flags(tmp_path / "run", stop_after_step=0))
    assert result.step == 0 and ExperimentConfig.load(tmp_path / "run" / "config.json").resolution == 32


def sd_configs(folder: Path, *, pipeline: str = "StableDiffusionPipeline", text_width: int = 1024,
               sample_size: int = 64, in_channels: int = 4) -> Path:
    """The config files of a real SD model (no weights): what family and size are read from."""
    for sub, config in {"text_encoder": {"hidden_size": text_width}, "unet": {
            "sample_size": sample_size, "in_channels": in_channels, "use_linear_projection": text_width == 1024},
            "vae": {"block_out_channels": [128, 256, 512, 512]}}.items():
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / "config.json").write_text(json.dumps(config))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline, "unet": ["diffusers", "U"]}))
    return folder


def test_sd2_768_trains_at_768_and_sd2_base_at_512(tmp_path):
    base = dict(random_backbone=True, resolution=None, edit_manifest="m.jsonl")
    v768 = sd_configs(tmp_path / "stable-diffusion-2-1", sample_size=96)  # the 768 px v-prediction model
    assert ExperimentConfig(base_model=str(v768), **base).resolved().resolution == 768
    sd21_base = sd_configs(tmp_path / "stable-diffusion-2-1-base", sample_size=64)
    assert ExperimentConfig(base_model=str(sd21_base), **base).resolved().resolution == 512
    single = tmp_path / "v2-1_768-ema-pruned.safetensors"  # a single file takes its size from its config folder
    single.write_bytes(b"")
    assert ExperimentConfig(base_model=str(single), base_config=str(v768), **base).resolved().resolution == 768


@pytest.mark.parametrize("pipeline,in_channels", [("StableDiffusionInpaintPipeline", 9),
                                                  ("StableDiffusionXLInpaintPipeline", 9),
                                                  ("StableDiffusionPipeline", 9)])  # a converted inpainting model
def test_an_inpainting_model_is_refused_by_name(tmp_path, pipeline, in_channels):
    from dreamid_core import ModelFilesError
    from training.common.base_model import load_base_model

    folder = sd_configs(tmp_path / "stable-diffusion-2-inpainting", pipeline=pipeline, in_channels=in_channels)
    with pytest.raises(ModelFilesError, match=f"is an inpainting model \\({pipeline}, its UNet takes 9 input "
                                              "channels.*text-to-image base model"):
        load_base_model(folder)
    with pytest.raises(ModelFilesError, match="an inpainting model"):
        ExperimentConfig(base_model=str(folder), random_backbone=True, edit_manifest="m.jsonl").resolved()


def test_shipped_configs_for_each_family():
    configs = {p.name: ExperimentConfig.load(p) for p in sorted((REPO / "training" / "configs").glob("*.json"))}
    assert set(configs) >= {"sd15_paper.json", "sd21_base_paper.json", "sdxl_base_paper.json"}
    from training.train.launch import global_batch

    for name, shipped in configs.items():
        assert (shipped.lr, shipped.reg_weight, shipped.num_tokens) == (5e-5, 1e-4, 2), name
        assert global_batch(8, shipped.batch_size, shipped.gradient_accumulation_steps) == 64, name  # 8 GPUs
    assert configs["sdxl_base_paper.json"].resolution == 1024
    assert configs["sd15_paper.json"].resolution == configs["sd21_base_paper.json"].resolution == 512
