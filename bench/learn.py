"""Steps/s and peak memory of our identity-learning step against a straightforward textual-inversion
loop, same models, same run.

    python bench/learn.py --size tiny                  # CPU, tiny models (seconds)
    python bench/learn.py --size sd21 --device cuda    # SD2.1-base shapes, random weights, 512 px, one GPU

reference: what a textual-inversion example script does: everything fp32, the VAE encodes the photo
on every step (``latent_dist.sample()``), no caching, k word vectors injected into the prompt
(training/common/prompt_encoding.py), the diffusion MSE, backward, AdamW.
ours: :meth:`training.learn_identity.loop.IdentityLearner.step` as the command line runs it —
latents encoded once, UNet and text encoder frozen in bf16 on a GPU (fp32 on a CPU), augmentation
and face mask per step; measured as plain TI (``--attn-weight 0``), with the attention loss (its
extra no-grad reference forward and explicit attention maps), per-stage, and with gradient
checkpointing.

Memory: on CUDA each loop's peak as if it ran alone: the growth of ``max_memory_allocated`` over
what was allocated before its steps, plus the weights it uses (every loop keeps its own copies on the
device, so the raw peak would count the others'). Everywhere, the activations one step keeps for
backward (unique storages passed to autograd's saved-tensor hooks, model weights excluded) — exact
and deterministic even for tiny models, and what caching, checkpointing and the attention maps
change. ``--rss`` adds the peak resident growth on a CPU, each loop in a fresh child process (Linux
``/proc/self/clear_refs``; slow: every child imports diffusers). Batch 1 (an artist's card) by default.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_step as ts  # noqa: E402  (the shared model shapes and tokenizer of bench/train_step.py)

from dreamid_core.learned_identity import IdentityConfig  # noqa: E402
from training.common.base_model import BaseModel  # noqa: E402
from training.common.diffusion import step_generator  # noqa: E402
from training.common.latents import encode_latents  # noqa: E402
from training.common.prompt_encoding import encode_prompts  # noqa: E402
from training.learn_identity.data import PhotoLatents  # noqa: E402
from training.learn_identity.loop import IdentityLearner, RunOptions  # noqa: E402

LOOPS = ("reference", "ours TI", "ours attn", "ours per_stage attn", "ours per_stage attn ckpt")
GOALS_GIB = {"sd21": 10.0}  # the goal at batch 1 with gradient checkpointing, 512 px


def build(size: str, device: torch.device) -> tuple[BaseModel, int]:
    base, s, _ = ts.build_base(size, seed=0)  # the same base model as bench/train_step.py
    return base.to(device), s["resolution"]


def photo(res: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(1, 3, res, res, generator=g) * 2 - 1).to(device)


def reference_step(base: BaseModel, pixels: torch.Tensor, batch: int, device: torch.device):
    """Plain fp32 textual inversion: VAE every step, nothing cached."""
    width = base.text_encoders[0].get_input_embeddings().weight.shape[1]
    table = base.text_encoders[0].get_input_embeddings().weight.detach()
    ids = base.tokenizers[0]("person", add_special_tokens=False).input_ids
    vec = torch.nn.Parameter(table[ids].mean(0, keepdim=True).repeat(2, 1).float().clone())  # [2, D]
    opt = torch.optim.AdamW([vec], lr=5e-3, weight_decay=0.0)
    sched = base.noise_scheduler
    counter = {"n": 0}
    prompts = ["a photo of S*"] * batch
    assert vec.shape[1] == width

    def step() -> float:
        counter["n"] += 1
        gen = step_generator(0, counter["n"])
        with torch.no_grad():
            latents = base.vae.encode(pixels.expand(batch, -1, -1, -1)).latent_dist.sample() * base.vae_scale
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        ctx, _ = encode_prompts("sd2", base.text_encoders, base.tokenizers, prompts,
                                {"clip_h": vec[None].expand(batch, -1, -1)}, trigger="S*", k=2)
        pred = base.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step.models = [base.unet, base.vae, *base.text_encoders]
    return step


def our_step(base: BaseModel, pixels: torch.Tensor, batch: int, device: torch.device, *, layout: str, attn: float,
             ckpt: bool):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mine = dataclasses.replace(base, unet=copy.deepcopy(base.unet).to(dtype=dtype),
                               text_encoders=[copy.deepcopy(base.text_encoders[0]).to(dtype=dtype)])
    lat = encode_latents(base.vae, pixels).cpu()  # once
    h, w = lat.shape[-2:]
    box = (w * 0.3, h * 0.25, w * 0.7, h * 0.75)
    marks = np.array([[0.4 * w, 0.4 * h], [0.6 * w, 0.4 * h], [0.5 * w, 0.5 * h], [0.42 * w, 0.62 * h],
                      [0.58 * w, 0.62 * h]])
    photos = PhotoLatents(lat, [box], [marks], pixels.shape[-1])
    table = mine.text_encoders[0].get_input_embeddings().weight.detach().float().cpu()
    ids = mine.tokenizers[0]("person", add_special_tokens=False).input_ids
    words = table[ids].mean(0, keepdim=True).repeat(2, 1)
    init = {"clip_h": words if layout == "words" else words[None, None].expand(5, 2, -1, -1).clone()}
    cfg = IdentityConfig(layout=layout, num_tokens=2, steps=10**6, lr=5e-3, attn_weight=attn, target="sd2")
    learner = IdentityLearner(mine, photos, cfg, init, RunOptions(batch_size=batch, gradient_checkpointing=ckpt,
                                                                  log_every=0), device=device)
    counter = {"n": 0}

    def step() -> float:
        counter["n"] += 1
        return learner.step(counter["n"]).loss

    step.models = [mine.unet, *mine.text_encoders]  # its own weight copies (the VAE is not used in the loop)
    return step


def make(name: str, base, pixels, batch, device):
    if name == "reference":
        return reference_step(base, pixels, batch, device)
    layout = "per_stage" if "per_stage" in name else "words"
    return our_step(base, pixels, batch, device, layout=layout, attn=0.003 if "attn" in name else 0.0,
                    ckpt="ckpt" in name)


def saved_mib(step, models) -> float:
    """MiB of activations one step saves for backward (weights of ``models`` excluded)."""
    weights = {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values()) / 2**20


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child_memory(args: argparse.Namespace) -> int:
    """Internal: one loop in this (fresh) process; prints its peak resident growth in MiB as JSON."""
    device = torch.device("cpu")
    base, res = build(args.size, device)
    step = make(args.child, base, photo(res, device), args.batch, device)
    step()  # warm-up: lazy allocations, optimizer state
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    before = _proc_kib("VmRSS")
    for _ in range(2):
        step()
    print(json.dumps({"peak_mib": (_proc_kib("VmHWM") - before) / 1024}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("tiny", "sd21"), default="tiny")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, help="timed steps per round (default: tiny 5, sd21 10)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each loop counts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--loops", default=",".join(LOOPS), help=f"comma-separated subset of {LOOPS}")
    p.add_argument("--force", action="store_true", help="run --size sd21 on a CPU anyway (very slow)")
    p.add_argument("--rss", action="store_true", help="CPU: also measure peak resident growth in child processes")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_memory(args)
    device = torch.device(args.device)
    if args.size == "sd21" and device.type == "cpu" and not args.force:
        print("refusing --size sd21 on CPU (one 512 px SD2.1 step is ~1.7 TFLOP). Use --device cuda, or --force.",
              file=sys.stderr)
        return 2
    names = [n.strip() for n in args.loops.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOOPS]
    if unknown or "reference" not in names:
        print(f"--loops: unknown {unknown} (choose from {LOOPS}; 'reference' is required)", file=sys.stderr)
        return 2
    steps = args.steps or (5 if args.size == "tiny" else 10)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference is plain fp32
    base, res = build(args.size, device)
    pixels = photo(res, device)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    n_unet = sum(q.numel() for q in base.unet.parameters()) / 1e6
    print(f"device {dev} | torch {torch.__version__} | size {args.size} ({res} px, UNet {n_unet:.1f}M) | batch "
          f"{args.batch} | best of {args.rounds} rounds of {steps} steps | threads {torch.get_num_threads()}")
    loops = {n: make(n, base, pixels, args.batch, device) for n in names}
    for step in loops.values():
        for _ in range(args.warmup):
            step()
    saved = {n: saved_mib(step, [base.unet, base.vae, *base.text_encoders, *step.models]) for n, step in loops.items()}
    best = {n: float("inf") for n in loops}
    peak = {n: float("nan") for n in loops}
    for _ in range(args.rounds):
        for n, step in loops.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            best[n] = min(best[n], ts.time_steps(step, steps=steps, device=device))
            if device.type == "cuda":
                own = sum(t.numel() * t.element_size() for m in step.models
                          for t in [*m.parameters(), *m.buffers()])
                peak[n] = (torch.cuda.max_memory_allocated(device) - before + own) / 2**20
    if args.rss and device.type == "cpu" and Path("/proc/self/clear_refs").exists():
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
        for n in loops:
            out = subprocess.run([sys.executable, __file__, "--size", args.size, "--batch", str(args.batch), "--child",
                                  n], capture_output=True, text=True, env=env, check=True)
            peak[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    mem = "peak MiB" if device.type == "cuda" else "peak RSS growth MiB"
    print(f"{'loop':<28}{'steps/s':>10}{'s/step':>10}{'saved for backward MiB':>24}{mem:>22}")
    for n in loops:
        rate = steps / best[n]
        print(f"{n:<28}{rate:>10.2f}{1 / rate:>10.3f}{saved[n]:>24.2f}{peak[n]:>22.1f}")
    ref = steps / best["reference"]
    for n in loops:
        if n != "reference":
            line = f"{n} / reference: {steps / best[n] / ref:.2f}x steps/s, {saved[n] / saved['reference']:.2f}x saved"
            if not np.isnan(peak[n]):
                line += f", {peak[n] / peak['reference']:.2f}x peak memory"
            print(line)
    if args.size in GOALS_GIB and device.type == "cuda" and "ours per_stage attn ckpt" in peak:
        print(f"goal: batch-1 peak with checkpointing <= {GOALS_GIB[args.size]} GB; measured "
              f"{peak['ours per_stage attn ckpt'] / 1024:.2f} GiB")
    if args.size == "tiny":
        print("note: tiny models are dominated by per-op overhead; the real ratio needs --size sd21 on a GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
