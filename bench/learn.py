"""The identity-learning step an artist runs (DreamID_LearnIdentity's learner on ComfyUI's own MODEL and
CLIP) against a plain textual-inversion step on the same architecture, side by side in one run.

    COMFYUI_PATH=~/ComfyUI python bench/learn.py                    # SD1.5 shapes, random weights, 128 px, CPU
    COMFYUI_PATH=~/ComfyUI python bench/learn.py --device cuda --res 512
    COMFYUI_PATH=~/ComfyUI python bench/learn.py --rss --fixed-cost --project
    COMFYUI_PATH=~/ComfyUI python bench/learn.py --flux [--project --accounting]   # FLUX.1: bench/learn_flux.py

Models: ComfyUI's SD1.5 UNet (860 M) and CLIP-L text model (123 M) built from config with random weights,
loaded under ``torch.inference_mode()`` as CheckpointLoaderSimple loads them (inference-tensor weights,
``requires_grad`` left on). The photo is a random latent with a face box (the VAE is not in the loop).

reference: textual inversion in the plainest way on the same architecture: its own copy of the weights
as normal tensors with ``requires_grad_(False)`` (made once, not timed), the prompt with S* through
``clip.encode_from_tokens``, ``diffusion_model(x, t, context)``, the eps MSE, backward, Adam; with the
attention loss on, plus the one no-grad class-word forward the attention loss needs.
node: ``dreamid_core.learning.IdentityLearner.step`` on ``nodes.adapters.learn_host.ComfyHost`` (what the node runs).

Printed per loop: CPU seconds per step (process time, one torch thread; on CUDA wall time after a sync),
the bytes one step holds between forward and backward (glibc heap counters, CPU) or its peak
(``max_memory_allocated``, CUDA), FLOPs per step (``torch.utils.flop_counter``), and the ratios to the
reference. ``--rss``: resident growth during the steps, each loop in a child process. ``--fixed-cost``:
the node's per-call costs (face detection, VAE encode with SD's real VAE shape, the before/after
measurement, the loss plot) against a default run of 200 steps. ``--project``: FLOPs of a step at SD1.5
512 px and SDXL 1024 px counted on meta tensors (UNet forward + input-gradient backward, the no-grad
reference forward of the attention loss, the text encoders), and the time of 200 steps on a 4090-class
GPU at an assumed sustained throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from comfy_env import find_comfyui, import_comfyui, load_pack, skip_reason  # noqa: E402

SD15_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
             "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
             "num_head_channels": -1, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "use_temporal_attention": False, "use_temporal_resblock": False}
SDXL_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
             "context_dim": 2048, "num_head_channels": 64, "num_heads": -1,
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
             "use_temporal_resblock": False}
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
CLIP_G_PARAMS = 694_659_840  # OpenCLIP bigG text tower (32 layers, 1280 wide): SDXL's second encoder
GPU_TFLOPS = {"4090 (bf16 dense 165 TFLOP/s at 40 %)": 165.0 * 0.40}
LOOPS = ("reference TI", "node TI", "reference TI + class forward", "node attn", "node per_stage attn",
         "node attn ckpt", "node attn offload")


# -- models --------------------------------------------------------------------------------------------

def build_unet(config: dict, family: str, *, seed: int, inference: bool, device: str = "cpu"):
    import comfy.model_patcher
    import comfy.supported_models
    from comfy_tiny import init_weights_

    cls = comfy.supported_models.SD15 if family == "sd15" else comfy.supported_models.SDXL
    cfg = cls(dict(config))
    cfg.set_inference_dtype(torch.float32, None)
    with torch.inference_mode() if inference else contextlib.nullcontext():
        model = cfg.get_model({}, device=device)
        if device != "meta":
            init_weights_(model.diffusion_model, seed)
    dev = torch.device(device)
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=dev)


def build_clip(*, seed: int, inference: bool):
    from comfy_tiny import tiny_clip

    with torch.inference_mode() if inference else contextlib.nullcontext():
        return tiny_clip("sd1", 768, layers=12, intermediate=3072, seed=seed, dtype=torch.float32)


def photo_set(core, res: int, channels: int = 4):
    """One random latent photo (``channels``: 4 for SD, 16 for FLUX.1/SD3) with a face box and landmarks."""
    g = torch.Generator().manual_seed(0)
    lat = res // 8
    box = (lat * 0.3, lat * 0.25, lat * 0.7, lat * 0.75)
    marks = np.array([[0.4, 0.4], [0.6, 0.4], [0.5, 0.5], [0.42, 0.62], [0.58, 0.62]]) * lat
    return core.PhotoSet(torch.randn(1, channels, lat, lat, generator=g), [box], [marks], res)


# -- the loops -----------------------------------------------------------------------------------------

def draw(core, photos, step: int, num_timesteps: int):
    """A reference step's photo, noise and timestep ``[1]``, from the learner's per-step generator."""
    gen = core.step_generator(0, step)
    x0 = photos.latents[torch.randint(0, len(photos), (1,), generator=gen)]
    noise = torch.randn(x0.shape, generator=gen)
    return x0, noise, torch.randint(0, num_timesteps, (1,), generator=gen)


class Reference:
    """Plain textual inversion on a normal-tensor copy of the weights (see the module docstring)."""

    def __init__(self, mods, model, clip, photos, *, attn: bool):
        self.mods, self.photos, self.attn = mods, photos, attn
        self.dm = model.model.diffusion_model
        self.clip = clip
        self.sampling = model.get_model_object("model_sampling")
        table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight
        self.vec = torch.nn.Parameter(table[[2533, 2533]].detach().clone().float())  # "person" twice
        self.opt = torch.optim.Adam([self.vec], lr=5e-3)
        tokens = mods.tokens.tokenize_with_identities(clip, "a photo of S*", {"S*": {"clip_l": table[[2533]]}})[0]
        with torch.no_grad():
            self.class_cond = clip.encode_from_tokens(tokens)
        self.i = 0

    def open(self):
        return contextlib.nullcontext()

    def loss(self):
        self.i += 1
        x0, noise, t = draw(self.mods.core, self.photos, self.i, 1000)
        s = self.sampling.sigma(t.float()).reshape(-1, 1, 1, 1)
        x_in = (x0 + noise * s) / torch.sqrt(1 + s * s)
        tokens = self.mods.tokens.tokenize_with_identities(self.clip, "a photo of S*", {"S*": {"clip_l": self.vec}})[0]
        with self.mods.frozen.copy_saved_activations():
            cond = self.clip.encode_from_tokens(tokens)
        if self.attn:
            with torch.no_grad():
                self.dm(x_in, t.float(), context=self.class_cond)
        eps = self.dm(x_in, t.float(), context=cond)
        return torch.nn.functional.mse_loss(eps.float(), noise)

    def step(self):
        loss = self.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


class Node:
    """The node's learner on the node's host."""

    def __init__(self, mods, model, clip, photos, *, layout: str, attn: float, ckpt=False, offload=False):
        self.mods = mods
        self.modes = [torch.inference_mode(False), torch.enable_grad()]
        for m in self.modes:
            m.__enter__()
        self.host = mods.host.ComfyHost(model, clip, gradient_checkpointing=ckpt, offload=offload)
        self.recomputes = ckpt or offload
        cfg = mods.identity.IdentityConfig(layout=layout, steps=10**6, lr=5e-3, attn_weight=attn,
                                           resolution=photos.resolution, num_stages=5)
        with self.host:
            start = mods.core.from_word_rows(self.host.word_embeddings("person"), 2)
            self.learner = mods.core.IdentityLearner(self.host, photos, cfg, start,
                                                     mods.core.RunOptions(gradient_checkpointing=ckpt))
        self.i = 0

    def open(self):
        return self.host

    def loss(self):
        self.i += 1
        return self.learner.loss(self.i)[0]

    def step(self):
        self.i += 1
        self.learner.step(self.i)


def make_loop(name, mods, models, photos):
    if name.startswith("reference"):
        return Reference(mods, models["ref_model"], models["ref_clip"], photos, attn="class" in name)
    return Node(mods, models["model"], models["clip"], photos, layout="per_stage" if "per_stage" in name else "words",
                attn=0.003 if "attn" in name else 0.0, ckpt="ckpt" in name, offload="offload" in name)


# -- measurements --------------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(loop, steps: int, device) -> float:
    with loop.open():
        loop.step()  # warm-up in this round (host opened, caches)
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            loop.step()
        _sync(device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return (cpu if device.type == "cpu" else wall) / steps


def held(loop, mods, device) -> float:
    """MiB one step holds between forward and backward (CPU heap) or its peak (CUDA)."""
    with loop.open():
        loop.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            loss = loop.loss()
            loss.backward()
            torch.cuda.synchronize(device)
            return (torch.cuda.max_memory_allocated(device) - base) / 2**20
        loss, nbytes = mods.memory.held_bytes(loop.loss)
        loss.backward()
        return float("nan") if nbytes is None else nbytes / 2**20


def flops(loop) -> float:
    """FLOPs of one step; NaN where torch's counter cannot trace it (recomputed regions under checkpointing:
    the same maths as without, plus one forward of each recomputed block)."""
    from torch.utils.flop_counter import FlopCounterMode

    if getattr(loop, "recomputes", False):
        return float("nan")
    with loop.open(), FlopCounterMode(display=False) as fc:
        loss = loop.loss()
        loss.backward()
    return fc.get_total_flops()


def _cell(value: float | None, width: int) -> str:
    """One table cell: the figure, or '-' where it was not measured."""
    if value is None or math.isnan(value):
        return f"{'-':>{width}}"
    return f"{value:>{width}.1f}"


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child_rss(args, mods, models, photos) -> int:
    """Internal (``--child NAME``): resident growth of NAME's steps in this fresh process, as JSON."""
    loop = make_loop(args.child, mods, models, photos)
    with loop.open():
        loop.step()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _proc_kib("VmRSS")
        for _ in range(args.steps):
            loop.step()
    print(json.dumps({"growth_mib": (_proc_kib("VmHWM") - before) / 1024}))
    return 0


# -- fixed costs and the projection ---------------------------------------------------------------------

def fixed_cost(mods, models, res: int, step_s: float, steps: int = 200) -> None:
    import comfy.sd
    from diffusers import AutoencoderKL
    from face_photos import face_photo
    from PIL import Image

    image = torch.from_numpy(np.asarray(face_photo("tom", size=640), dtype=np.float32) / 255.0)[None]
    pipeline = mods.faces.FacePipeline(mods.detectors.make_detector("mtcnn"))
    torch.manual_seed(0)
    vae = comfy.sd.VAE(sd=AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                        down_block_types=("DownEncoderBlock2D",) * 4,
                                        up_block_types=("UpDecoderBlock2D",) * 4).state_dict())
    node = Node(mods, models["model"], models["clip"], photo_set(mods.core, res), layout="words", attn=0.003)
    costs = {}
    c0 = time.process_time()
    faces = pipeline.process(image).faces
    costs["face detection (640 px photo)"] = time.process_time() - c0
    c0 = time.process_time()
    with torch.inference_mode(False):
        photos = mods.host.encode_photos(vae, node.host, image, faces, res)
    costs[f"VAE encode ({res} px, SD VAE shape)"] = time.process_time() - c0
    node.learner.photos = photos
    with node.host:
        c0 = time.process_time()
        node.learner.measure()
        node.learner.measure()
        costs["before/after measurement"] = time.process_time() - c0
    c0 = time.process_time()
    mods.plot.loss_curve_image([{"loss": 1.0 / (i + 1), "diffusion": 1.0, "attention": 0.5} for i in range(steps)])
    costs["loss plot"] = time.process_time() - c0
    previews = mods.watch.Previews(models["model"], models["clip"], vae, "a portrait photo of S*", every=50, seed=0,
                                   resolution=res)
    ident = node.learner.identity()
    previews.render(ident, 0)  # first call: the negative prompt's encoding
    c0 = time.process_time()
    previews.render(ident, 50)
    one = time.process_time() - c0
    count = steps // 50
    costs[f"previews ({count} at the default interval 50, {one:.2f} s each)"] = one * count
    run = step_s * steps
    total = sum(costs.values())
    print(f"\nper-call fixed cost against a default run ({steps} steps x {step_s:.2f} s = {run:.0f} CPU s at {res} px):")
    for k, v in costs.items():
        print(f"  {k:<58}{v:8.2f} s  {100 * v / run:6.2f} %" + ("   (goal < 15 %)" if k.startswith("previews") else ""))
    fixed = total - sum(v for k, v in costs.items() if k.startswith("previews"))
    print(f"  {'total without previews':<58}{fixed:8.2f} s  {100 * fixed / run:6.2f} %   (goal < 10 %)")
    del Image


class Mods:
    def __init__(self, nodes):
        root = nodes["DreamID_LearnIdentity"].__module__.split(".nodes.")[0]

        def get(name):
            return sys.modules[f"{root}.{name}"]

        self.core, self.host = get("dreamid_core.learning"), get("nodes.adapters.learn_host")
        self.identity, self.tokens = get("dreamid_core.identities.learned_identity"), get("nodes.adapters.comfy_tokens")
        self.frozen, self.memory = get("dreamid_core.learning.frozen"), get("dreamid_core.learning.memory")
        self.faces, self.detectors = get("dreamid_core.faces.pipeline"), get("dreamid_core.faces.detectors")
        self.plot, self.watch = get("nodes.adapters.loss_plot"), get("nodes.adapters.learn_watch")
        self.joint = get("nodes.adapters.joint_attention")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--flux" in argv:  # FLUX.1's shapes, ratios, FLOP projection and 16 GB accounting
        import learn_flux

        return learn_flux.main([a for a in argv if a != "--flux"])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="--flux: the same for FLUX.1 (bench/learn_flux.py; its options follow)")
    p.add_argument("--res", type=int, default=128, help="training size in px (128 on a CPU, 512 on a GPU)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; each loop keeps its best")
    p.add_argument("--device", default="cpu")
    p.add_argument("--loops", default=",".join(LOOPS), help=f"comma-separated subset of {LOOPS}")
    p.add_argument("--rss", action="store_true", help="CPU: resident growth during steps, one child process per loop")
    p.add_argument("--fixed-cost", action="store_true", help="the node's per-call costs against a 200-step run")
    p.add_argument("--project", action="store_true", help="FLOPs at SD1.5 512 px / SDXL 1024 px and GPU times")
    p.add_argument("--accounting", choices=("sd15", "sdxl"), help="only the memory accounting of that model per mode")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    path = find_comfyui()
    if path is None:
        print(skip_reason(), file=sys.stderr)
        return 2
    env = import_comfyui(path)
    mods = Mods(load_pack(env.nodes, REPO))
    device = torch.device(args.device)
    if device.type == "cuda":
        env.args.cpu = False  # pragma: no cover - a GPU machine imports ComfyUI with its device
    if args.accounting:
        from learn_project import accounting

        accounting(mods, args.accounting, target={"sd15": 6, "sdxl": 12}[args.accounting])
        return 0
    names = [n.strip() for n in args.loops.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOOPS]
    if unknown:
        print(f"--loops: unknown {unknown}; choose from {LOOPS}", file=sys.stderr)
        return 2
    models = {"model": build_unet(SD15_UNET, "sd15", seed=0, inference=True, device=args.device),
              "clip": build_clip(seed=1, inference=True),
              "ref_model": build_unet(SD15_UNET, "sd15", seed=0, inference=False, device=args.device),
              "ref_clip": build_clip(seed=1, inference=False)}
    for m in (models["ref_model"].model, models["ref_clip"].cond_stage_model):
        m.requires_grad_(False)
    photos = photo_set(mods.core, args.res)
    if args.child:
        return child_rss(args, mods, models, photos)
    loops = {n: make_loop(n, mods, models, photos) for n in names}
    print(f"ComfyUI {path.name} | torch {torch.__version__} | device {args.device} | SD1.5 UNet "
          f"{sum(q.numel() for q in models['model'].model.diffusion_model.parameters()) / 1e6:.0f} M + CLIP-L, random "
          f"weights | {args.res} px, batch 1 | {torch.get_num_threads()} thread | best of {args.rounds} rounds of "
          f"{args.steps} steps")
    best = {n: float("inf") for n in loops}
    for _ in range(args.rounds):
        for n, loop in loops.items():
            best[n] = min(best[n], time_steps(loop, args.steps, device))
    mem = {n: held(loop, mods, device) for n, loop in loops.items()}
    fl = {n: flops(loop) for n, loop in loops.items()}
    rss = {}
    if args.rss and device.type == "cpu" and Path("/proc/self/clear_refs").exists():
        env_vars = dict(os.environ, OMP_NUM_THREADS="1", COMFYUI_PATH=str(path))
        for n in loops:
            out = subprocess.run([sys.executable, __file__, "--res", str(args.res), "--steps", str(args.steps),
                                  "--child", n], capture_output=True, text=True, env=env_vars, check=True)
            rss[n] = json.loads(out.stdout.strip().splitlines()[-1])["growth_mib"]
    unit = "CPU s/step" if device.type == "cpu" else "s/step"
    held_label = "held MiB (fwd->bwd)" if device.type == "cpu" else "peak MiB"
    print(f"{'loop':<30}{unit:>12}{held_label:>22}{'GFLOP/step':>12}{'RSS growth MiB':>16}")
    for n in loops:
        print(f"{n:<30}{best[n]:>12.2f}{_cell(mem[n], 22)}{_cell(fl[n] / 1e9, 12)}{_cell(rss.get(n), 16)}")
    if math.isnan(sum(fl.values())):
        print("  GFLOP '-': torch's counter cannot trace recomputed (checkpointed) regions")
    if not rss:
        print("  RSS growth '-': not measured; pass --rss (CPU, Linux) for one child process per loop")
    pairs = [("node TI", "reference TI")] + [(n, "reference TI + class forward") for n in loops
                                              if n.startswith("node") and n != "node TI"]
    print("ratios to the reference (goal: time <= 1.15x, memory growth <= 1.1x):")
    for ours, ref in pairs:
        if ours in loops and ref in loops:
            line = f"  {ours} / {ref}: time {best[ours] / best[ref]:.2f}x, held {mem[ours] / mem[ref]:.2f}x"
            if not math.isnan(fl[ours]):
                line += f", FLOPs {fl[ours] / fl[ref]:.2f}x"
            if ours in rss and ref in rss and rss[ref] > 0:
                line += f", RSS growth {rss[ours] / rss[ref]:.2f}x"
            print(line)
    if args.fixed_cost and "node attn" in best:
        fixed_cost(mods, models, args.res, best["node attn"])
    if args.project:
        from learn_project import project

        project(mods)
    return 0


if __name__ == "__main__":
    sys.exit(main())
