"""Samples/s of our training step against a straightforward reference loop, same models, same run.

    python bench/train_step.py --size tiny                 # CPU, tiny models (seconds)
    python bench/train_step.py --size sd21 --device cuda   # SD2.1-base shapes, random weights, one GPU

ours: latents cached (VAE encoded once, outside the loop), UNet and text encoder frozen in bf16
with bf16 autocast on GPU (fp32 on CPU), the face backbone frozen (no graph is built for it),
optionally channels_last, then the loss of training/train/loss.py, backward, grad clipping, AdamW.
reference: what a textual-inversion example script does: everything fp32, the VAE encodes the
images on every step, no caching, the same loss, backward, clipping and AdamW.

Models are built from config in this script (no download). FLOPs per sample are counted with
torch.utils.flop_counter on one step of each loop and compared with the physical anchor for
SD2.1-base at 512 px: ~1.7 TFLOP per sample with cached latents (UNet forward+backward and the
text encoder), ~230 samples/s on one H100 at 40 % utilisation of its ~989 TFLOP/s (bf16, dense).
Data loading is not timed (images and crops are random tensors already on the device).

Also printed per loop: tokens/s (UNet latent positions, (R/8)^2 per sample, and text tokens, 77 per
sample and text encoder) and MFU against the dense bf16 peak of an H100 and of an H200 (989 TFLOP/s
each: the H200 has the H100's compute and more memory bandwidth). The effective global batch is
batch x --accumulation x --processes; steps/s at that batch assumes every process runs at the
measured rate (no communication cost counted).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gzip
import importlib.metadata as md
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamid_core import BackboneConfig, EncoderConfig, IDEncoder  # noqa: E402
from training.common.base_model import BaseModel  # noqa: E402
from training.common.diffusion import step_generator  # noqa: E402
from training.common.latents import encode_latents  # noqa: E402
from training.train.loss import diffusion_loss  # noqa: E402

ANCHOR_TFLOP_PER_SAMPLE = 1.7  # SD2.1-base, 512 px, cached latents
ANCHOR_SAMPLES_PER_S = 230.0  # one H100 at 40 % utilisation
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
TEXT_TOKENS = 77  # CLIP context per prompt and text encoder


# -- models from config ----------------------------------------------------------------------------

def _sizes(size: str) -> dict:
    if size == "tiny":
        return dict(resolution=32, text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, hidden_act="quick_gelu"),
                    unet=dict(sample_size=16, layers_per_block=1, block_out_channels=(32, 64),
                              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
                              norm_num_groups=8),
                    vae=dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, layers_per_block=1),
                    backbone=BackboneConfig(patch_size=28, width=32, depth=4, num_heads=4, num_features=24),
                    hidden=64)
    # SD2.1-base: UNet (865M), SD VAE, OpenCLIP ViT-H text tower as diffusers stores it (23 layers)
    return dict(resolution=512, text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                          num_attention_heads=16, hidden_act="gelu", projection_dim=512),
                unet=dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                          down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                          up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                          attention_head_dim=(5, 10, 20, 20)),
                vae=dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512),
                backbone=BackboneConfig(), hidden=1024)  # vit_s, the paper's encoder


class HashTokenizer:
    """Stand-in for CLIP's BPE when its vocabulary is not installed: one id per word (crc32)."""

    model_max_length, bos_token_id, eos_token_id, pad_token_id = 77, 49406, 49407, 49407

    def __call__(self, text: str, add_special_tokens: bool = False):
        ids = [1000 + zlib.crc32(w.encode()) % 48000 for w in text.lower().replace(",", " ,").split()]
        return argparse.Namespace(input_ids=ids)


def clip_tokenizer():
    """The real CLIP tokenizer from the open-clip wheel's vocabulary, else :class:`HashTokenizer`."""
    try:
        src = Path(md.distribution("open_clip_torch").locate_file("open_clip/bpe_simple_vocab_16e6.txt.gz"))
    except md.PackageNotFoundError:
        return HashTokenizer(), "hash (open-clip-torch not installed)"
    from transformers import CLIPTokenizer

    lines = gzip.open(src).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    base = [chr(c) for c in cs]
    vocab = base + [v + "</w>" for v in base] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp(prefix="bench_tok_"))
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!",
                         model_max_length=77), "CLIP BPE"


def build_base(size: str, seed: int = 0) -> tuple[BaseModel, dict, str]:
    """The frozen tiny (or SD2.1-shaped) base model built from config, its size table and tokenizer kind."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    s = _sizes(size)
    torch.manual_seed(seed)
    width = s["text"]["hidden_size"]
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407, **s["text"]))
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, cross_attention_dim=width, use_linear_projection=True,
                                **s["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.18215, **s["vae"])
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          prediction_type="epsilon", clip_sample=False, steps_offset=1)
    tokenizer, tok_kind = clip_tokenizer()
    base = BaseModel(family="sd2", unet=unet, vae=vae, text_encoders=[text], tokenizers=[tokenizer],
                     noise_scheduler=sched, source=f"bench-{size}").freeze()
    return base, s, tok_kind


def build(size: str, device: torch.device, seed: int = 0):
    base, s, tok_kind = build_base(size, seed)
    width = s["text"]["hidden_size"]
    enc_cfg = EncoderConfig(backbone=s["backbone"], target="sd2", token_widths=(("clip_h", width),),
                            tap_layers=s["backbone"].default_taps(), hidden_dim=s["hidden"])
    encoder = IDEncoder(enc_cfg)
    encoder.freeze_backbone()
    return base.to(device), encoder.to(device).train(), s["resolution"], tok_kind


# -- the two loops -----------------------------------------------------------------------------------

PROMPTS = ["a photo of S*", "a portrait of S*", "S* as a chef, looking at the camera", "oil painting style, S* face"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(base, encoder, *, ours: bool, pixels: torch.Tensor, crops: torch.Tensor, device: torch.device,
              channels_last: bool, compile_unet: bool = False):
    """One training step (returns the loss as a float, like the trainer's logging does). The loop gets
    its own copy of the UNet and text encoder in its dtype and memory format; the VAE (fp32) is shared."""
    bf16 = ours and device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    base = dataclasses.replace(base, unet=copy.deepcopy(base.unet).to(dtype=dtype, memory_format=fmt),
                               text_encoders=[copy.deepcopy(base.text_encoders[0]).to(dtype=dtype)])
    if compile_unet:
        base = dataclasses.replace(base, unet=torch.compile(base.unet))
    params = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01, fused=device.type == "cuda" or None)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(pixels.shape[0])]
    cached = encode_latents(base.vae, pixels) if ours else None  # once, outside the loop
    counter = {"n": 0}

    def step() -> float:
        counter["n"] += 1
        if ours:
            latents = cached
        else:
            with torch.no_grad():
                latents = base.vae.encode(pixels).latent_dist.sample() * base.vae.config.scaling_factor
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            parts = diffusion_loss(base, encoder, encoder.split, latents, crops, prompts,
                                   generator=step_generator(0, counter["n"]), reg_weight=1e-4)
        parts.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(parts.loss.detach())

    return step


def count_flops(step, *, batch: int, warmup: int) -> float:
    """Warm up, then count one step's FLOPs (forward + backward) per sample."""
    from torch.utils.flop_counter import FlopCounterMode

    for _ in range(warmup):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / batch


def time_steps(step, *, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` steps."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - t0


def measure(loops: dict, *, batch: int, steps: int, warmup: int, rounds: int, device: torch.device) -> dict:
    """Rounds alternate the loops (a busy machine slows them alike); each loop keeps its best round."""
    flops = {}
    for name, step in loops.items():
        if "compiled" in name:  # FlopCounterMode does not see inside compiled graphs: same maths as uncompiled
            for _ in range(warmup):
                step()
            flops[name] = flops[name.replace(" compiled", "")]
        else:
            flops[name] = count_flops(step, batch=batch, warmup=warmup)
    best = {name: float("inf") for name in loops}
    peak = {}
    for _ in range(rounds):
        for name, step in loops.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            best[name] = min(best[name], time_steps(step, steps=steps, device=device))
            peak[name] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    out = {}
    for name in loops:
        rate = batch * steps / best[name]
        out[name] = {"samples_per_s": rate, "tflop_per_sample": flops[name] / 1e12,
                     "tflops": rate * flops[name] / 1e12, "peak_gib": peak[name]}
    return out


def profile(step, device: torch.device, steps: int = 3) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("tiny", "sd21"), default="tiny")
    p.add_argument("--batch", type=int, help="per step (default: tiny 4, sd21 8)")
    p.add_argument("--steps", type=int, help="timed steps per round (default: tiny 5, sd21 10)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds; the best of each loop counts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="UNet memory format for ours; auto measures both on CUDA and keeps the faster")
    p.add_argument("--force", action="store_true", help="run --size sd21 on a CPU anyway (very slow)")
    p.add_argument("--compile", action="store_true", help="also time ours with torch.compile(unet)")
    p.add_argument("--profile", action="store_true", help="after timing, print the top operators of ours (torch.profiler)")
    p.add_argument("--processes", type=int, default=1, help="processes of the run to project (the paper: 8)")
    p.add_argument("--accumulation", type=int, default=1, help="gradient accumulation steps of that run")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.size == "sd21" and device.type == "cpu" and not args.force:
        print("refusing --size sd21 on CPU: one SD2.1-base step is ~1.7 TFLOP per sample (minutes per step here). "
              "Use --device cuda, or --force to run it anyway.", file=sys.stderr)
        return 2
    batch = args.batch or (4 if args.size == "tiny" else 8)
    steps = args.steps or (5 if args.size == "tiny" else 10)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference is plain fp32, as the example scripts run
    base, encoder, res, tok_kind = build(args.size, device)
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(batch, 3, res, res, generator=g) * 2 - 1).to(device)
    crops = torch.rand(batch, 3, 112, 112, generator=g).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    n_unet = sum(p.numel() for p in base.unet.parameters()) / 1e6
    n_text = sum(p.numel() for p in base.text_encoders[0].parameters()) / 1e6
    print(f"device {name} | torch {torch.__version__} | size {args.size} ({res} px, UNet {n_unet:.1f}M, text "
          f"encoder {n_text:.1f}M params) | batch {batch} | best of {args.rounds} rounds of {steps} steps | "
          f"tokenizer {tok_kind}")

    loops = {"reference": make_step(base, encoder, ours=False, pixels=pixels, crops=crops, device=device,
                                    channels_last=False)}
    layouts = {"auto": [False, True] if device.type == "cuda" else [False], "on": [True], "off": [False]}
    for cl in layouts[args.channels_last]:
        loops[f"ours{' channels_last' if cl else ''}"] = make_step(base, encoder, ours=True, pixels=pixels,
                                                                    crops=crops, device=device, channels_last=cl)
    if args.compile:
        cl = layouts[args.channels_last][-1]
        loops[f"ours{' channels_last' if cl else ''} compiled"] = make_step(
            base, encoder, ours=True, pixels=pixels, crops=crops, device=device, channels_last=cl, compile_unet=True)
    results = measure(loops, batch=batch, steps=steps, warmup=args.warmup, rounds=args.rounds, device=device)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    latent_tokens = (res // 8) ** 2  # UNet positions at full latent resolution, per sample
    print(f"{'loop':<30}{'samples/s':>12}{'TFLOP/sample':>14}{'TFLOP/s':>10}{'util':>8}{'MFU H100':>10}"
          f"{'MFU H200':>10}{'latent tok/s':>14}{'text tok/s':>12}{'peak GiB':>10}")
    for label, r in results.items():
        util = f"{100 * r['tflops'] / peak:.1f}%" if peak else "n/a"
        mfu = {gpu: f"{100 * r['tflops'] / PEAK_BF16_TFLOPS[gpu]:.3g}%" for gpu in ("H100", "H200")}
        print(f"{label:<30}{r['samples_per_s']:>12.2f}{r['tflop_per_sample']:>14.4g}{r['tflops']:>10.4g}{util:>8}"
              f"{mfu['H100']:>10}{mfu['H200']:>10}{r['samples_per_s'] * latent_tokens:>14.4g}"
              f"{r['samples_per_s'] * TEXT_TOKENS:>12.4g}{r['peak_gib']:>10.1f}")
    if device.type != "cuda":
        print("note: measured on the CPU; the MFU columns compare CPU throughput with a GPU's peak (format only)")
    best_label = max((k for k in results if k.startswith("ours")), key=lambda k: results[k]["samples_per_s"])
    ratio = results[best_label]["samples_per_s"] / results["reference"]["samples_per_s"]
    print(f"speed-up: {best_label} / reference = {ratio:.2f}x")
    best = results[best_label]
    print(f"anchor (SD2.1-base 512 px, cached latents): {ANCHOR_TFLOP_PER_SAMPLE} TFLOP/sample, "
          f"{ANCHOR_SAMPLES_PER_S:.0f} samples/s on one H100 at 40% of {PEAK_BF16_TFLOPS['H100']:.0f} TFLOP/s; "
          f"counted here {best['tflop_per_sample']:.4g} TFLOP/sample, {best['samples_per_s']:.1f} samples/s "
          f"({best['samples_per_s'] / ANCHOR_SAMPLES_PER_S:.1%} of the anchor rate)")
    global_batch = batch * args.accumulation * args.processes
    per_process = best["samples_per_s"]
    print(f"effective global batch: {batch} per step x {args.accumulation} accumulation x {args.processes} "
          f"process(es) = {global_batch}; at {per_process:.2f} samples/s per process that is "
          f"{per_process * args.processes / global_batch:.3g} optimizer steps/s "
          f"({per_process * args.processes:.1f} samples/s, communication not counted)")
    if args.profile:
        profile(loops[best_label], device)
    if args.size == "tiny":
        print("note: tiny models are dominated by per-op overhead; the anchor applies to --size sd21 on a GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
