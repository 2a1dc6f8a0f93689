"""Identity learning on FLUX.1 (what DreamID_LearnIdentity runs on a FLUX MODEL/CLIP) against a plain
flow-matching textual-inversion step on the same modules, side by side in one run; the FLOPs of a real
FLUX.1-dev step; and the memory of a 16 GB run.

    COMFYUI_PATH=~/ComfyUI python bench/learn_flux.py                    # reduced depth, real widths, CPU
    COMFYUI_PATH=~/ComfyUI python bench/learn_flux.py --project --accounting

Models (random weights, ComfyUI's own classes, loaded under ``torch.inference_mode()`` as its loaders do):
FLUX.1-dev's transformer at its real widths (3072 hidden, 24 heads, MLP 4x, T5 4096 in, CLIP-L 768 pooled,
guidance embedding) with ``--double``/``--single`` blocks instead of 19/38; ComfyUI's FLUX CLIP: CLIP-L (12
layers) and T5-XXL at its real widths (4096, 64 heads, gated FFN 10240) with ``--t5-layers`` instead of 24.
The photo is a random 16-channel latent with a face box (the VAE is not in the loop).

reference: flow-matching textual inversion the plainest way: its own copy of the weights as normal
tensors with ``requires_grad_(False)`` (made once, not timed), the prompt with S* (CLIP-L and T5 vectors)
through ``clip.encode_from_tokens``, ``diffusion_model(x_t, sigma, context, y, guidance=3.5)``, the MSE
to ``noise - x0``, backward, Adam (ComfyUI's CLIP and FLUX blocks add in place, so both keep copies of what
they save, as the node does). node: ``IdentityLearner.step`` on ``ComfyHost``, as in bench/learn.py;
``node per_stage``: 5 time stages, the step's key and value prompts read as two T5 streams (256 + 256 text
tokens beside the image's).

``--project``: FLOPs of one step of the real FLUX.1-dev (19 + 38 blocks) at 512 and 768 px on meta tensors
(transformer forward + input-gradient backward; T5-XXL and CLIP-L forward + backward counted per weight
and token) and 200 steps on a 4090-class GPU. ``--accounting``: what a 16 GB card holds at 512 / 768 px
with fp8 weights: the weights from the real parameter counts, and what one step keeps for backward,
counted tensor by tensor (what autograd saves) on the CPU at two depths and two sizes and extrapolated to
19 + 38 blocks and the real token count.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import learn as sd_bench  # noqa: E402  (bench/learn.py: the measurements and the node loop)
from comfy_env import find_comfyui, import_comfyui, load_pack, skip_reason  # noqa: E402

FLUX_DEV = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
            "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
            "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24}
T5_TOKENS, CLIP_TOKENS = 256, 77  # ComfyUI pads FLUX's T5 prompt to 256 tokens
LOOPS = ("reference TI", "node TI", "node per_stage", "node ckpt", "node offload", "node ckpt + offload",
         "reference TI + class forward", "node attn", "node attn ckpt + offload")


def build_flux(*, double: int, single: int, seed: int, inference: bool, device: str = "cpu"):
    from comfy_tiny import tiny_dit_model

    with torch.inference_mode() if inference else contextlib.nullcontext():
        if device == "meta":
            import comfy.model_patcher
            import comfy.supported_models

            cfg = comfy.supported_models.Flux({**FLUX_DEV, "depth": double, "depth_single_blocks": single,
                                               **_txt_ids()})
            cfg.set_inference_dtype(torch.float32, None)
            model = cfg.get_model({}, device="meta")
            meta = torch.device("meta")
            return comfy.model_patcher.ModelPatcher(model, load_device=meta, offload_device=meta)
        return tiny_dit_model("flux", seed=seed, **{**FLUX_DEV, "depth": double, "depth_single_blocks": single})


def _txt_ids() -> dict:
    import dataclasses

    import comfy.ldm.flux.model

    return {"txt_ids_dims": []} if "txt_ids_dims" in {f.name for f in dataclasses.fields(
        comfy.ldm.flux.model.FluxParams)} else {}


def build_clip(*, t5_layers: int, seed: int, inference: bool):
    import comfy.sd
    import comfy.supported_models_base
    from comfy.text_encoders import flux
    from comfy_tiny import init_weights_

    target = comfy.supported_models_base.ClipTarget(flux.FluxTokenizer, flux.flux_clip())
    options = {"t5xxl_model_config": {**T5_XXL, "num_layers": t5_layers}, "dtype": torch.float32}
    with torch.inference_mode() if inference else contextlib.nullcontext():
        clip = comfy.sd.CLIP(target, model_options=options)
        init_weights_(clip.cond_stage_model, seed)
    return clip


class Reference:
    """Plain flow-matching textual inversion on a normal-tensor copy of the weights (module docstring)."""

    def __init__(self, mods, model, clip, photos, *, attn: bool = False):
        self.mods, self.photos, self.clip, self.attn = mods, photos, clip, attn
        self.dm = model.model.diffusion_model
        self.sampling = model.get_model_object("model_sampling")
        cm, tok = clip.cond_stage_model, clip.tokenizer
        rows = {}
        for key, t in (("clip_l", tok.clip_l), ("t5xxl", tok.t5xxl)):  # "person", twice (k = 2)
            ids = [i for chunk in t.tokenize_with_weights("person", False) for i, _ in chunk
                   if i not in (t.start_token, t.end_token, t.pad_token)]
            rows[key] = getattr(cm, key).transformer.get_input_embeddings().weight[[ids[0], ids[0]]]
        self.vec = {k: torch.nn.Parameter(v.detach().clone().float()) for k, v in rows.items()}
        self.opt = torch.optim.Adam(list(self.vec.values()), lr=5e-3)
        tokens = mods.tokens.tokenize_with_identities(clip, "a photo of S*", {"S*": {k: v[:1] for k, v in rows.items()}})[0]
        with torch.no_grad():
            self.class_cond = clip.encode_from_tokens(tokens, return_pooled=True)
        self.i = 0

    def open(self):
        return contextlib.nullcontext()

    def loss(self):
        self.i += 1
        x0, noise, t = sd_bench.draw(self.mods.core, self.photos, self.i, self.sampling.sigmas.shape[0])
        sigma = self.sampling.sigmas[t]
        s = sigma.reshape(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        tokens = self.mods.tokens.tokenize_with_identities(self.clip, "a photo of S*", {"S*": self.vec})[0]
        guidance = torch.full((1,), 3.5)
        if self.attn:  # the one no-grad forward of the class-word prompt that the attention loss needs
            with torch.no_grad():
                self.dm(x_t, sigma, self.class_cond[0], y=self.class_cond[1], guidance=guidance)
        with self.mods.frozen.copy_saved_activations():
            cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
            v = self.dm(x_t, sigma, cond, y=pooled, guidance=guidance)
        return torch.nn.functional.mse_loss(v.float(), noise - x0)

    def step(self):
        loss = self.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def make_loop(name, mods, models, photos):
    if name.startswith("reference"):
        return Reference(mods, models["ref_model"], models["ref_clip"], photos, attn="class" in name)
    return sd_bench.Node(mods, models["model"], models["clip"], photos,
                         layout="per_stage" if "per_stage" in name else "words",
                         attn=0.003 if "attn" in name else 0.0, ckpt="ckpt" in name, offload="offload" in name)


# -- the real FLUX.1-dev ------------------------------------------------------------------------------

def _t5_params(layers: int = T5_XXL["num_layers"]) -> int:
    d, ff, inner = T5_XXL["d_model"], T5_XXL["d_ff"], T5_XXL["d_kv"] * T5_XXL["num_heads"]
    return layers * (4 * d * inner + 3 * d * ff)


@contextlib.contextmanager
def sdpa():
    """ComfyUI's attention as torch's SDPA (what a GPU runs, and what FlopCounterMode counts), also where
    FLUX's code imported ``optimized_attention`` by name."""
    import comfy.ldm.flux.math as flux_math
    import comfy.ldm.modules.attention as attention

    before = attention.optimized_attention, flux_math.optimized_attention
    attention.optimized_attention = flux_math.optimized_attention = attention.attention_pytorch
    try:
        yield
    finally:
        attention.optimized_attention, flux_math.optimized_attention = before


def dit_flops(mods, res: int, grad: bool, double: int = 19, single: int = 38, streams: int = 1) -> float:
    """FLOPs of one transformer call; ``streams=2``: a per-stage step's two text streams through the pack's
    joint attention (its sub-calls are what is counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    dm = build_flux(double=double, single=single, seed=0, inference=False, device="meta").model.diffusion_model
    dm.requires_grad_(False)
    lat = res // 8
    x = torch.randn(1, 16, lat, lat, device="meta")
    ctx = torch.randn(1, streams * T5_TOKENS, 4096, device="meta", requires_grad=grad)
    options = {}
    if streams == 2:
        joint = mods.joint.JointAttention(max_queries=None)
        joint.start(False, txt_len=2 * T5_TOKENS, img_len=(lat // 2) ** 2, prior=None, stream_len=T5_TOKENS)
        options["optimized_attention_override"] = joint
    # FLUX's blocks add in place: autograd keeps copies of what it saves (copies are not FLOPs)
    with sdpa(), FlopCounterMode(display=False) as fc, mods.frozen.copy_saved_activations():
        out = dm(x, torch.tensor([0.5], device="meta"), ctx, y=torch.randn(1, 768, device="meta"),
                 guidance=torch.full((1,), 3.5, device="meta"), transformer_options=options)
        if grad:
            out.sum().backward()
    if streams == 2 and joint.calls != double + single:
        raise RuntimeError(f"the two-stream attention served {joint.calls} of {double + single} joint calls")
    return fc.get_total_flops()


def project(mods) -> None:
    dm = build_flux(double=19, single=38, seed=0, inference=False, device="meta").model.diffusion_model
    n = sum(p.numel() for p in dm.parameters())
    text = (_t5_params() * T5_TOKENS + 123e6 * CLIP_TOKENS) * 2 * 2  # forward + input-gradient backward
    print(f"\nFLUX.1-dev ({n / 1e9:.1f} B transformer parameters), FLOPs per step (meta tensors) and 200 steps on a "
          "4090-class GPU:")
    for res in (512, 768):
        total = dit_flops(mods, res, True) + text
        gpu = "; ".join(f"{name}: {200 * total / (t * 1e12):.0f} s" for name, t in sd_bench.GPU_TFLOPS.items())
        print(f"  {res} px: {total / 1e12:6.2f} TFLOP/step (transformer fwd+bwd {(total - text) / 1e12:.2f}, T5-XXL + "
              f"CLIP-L {text / 1e12:.2f}); 200 steps {gpu}")
        staged = dit_flops(mods, res, True, streams=2) + 2 * text  # two prompts encoded: keys and values
        gpu = "; ".join(f"{name}: {200 * staged / (t * 1e12):.0f} s" for name, t in sd_bench.GPU_TFLOPS.items())
        print(f"  {res} px per_stage (two text streams): {staged / 1e12:6.2f} TFLOP/step = {staged / total:.2f}x the "
              f"words step; 200 steps {gpu}")


def accounting(mods) -> None:
    """16 GB: fp8 weights (offload streams them: about one block resident) + what a step holds (bf16)."""
    dm = build_flux(double=19, single=38, seed=0, inference=False, device="meta").model.diffusion_model
    blocks = {"double": dm.double_blocks[0], "single": dm.single_blocks[0]}
    block_gib = {k: sum(p.numel() for p in b.parameters()) / 2**30 for k, b in blocks.items()}  # fp8: 1 byte
    dit_gib = sum(p.numel() for p in dm.parameters()) / 2**30
    t5_gib = (_t5_params() + 32128 * 4096) / 2**30
    clip = build_clip(t5_layers=1, seed=1, inference=True)
    held: dict[tuple, float] = {}
    with sdpa():
        for mode in ({}, {"gradient_checkpointing": True, "offload": True}):
            for depth in ((1, 1), (2, 1), (1, 2)):
                model = build_flux(double=depth[0], single=depth[1], seed=0, inference=True)
                for res in (128, 256):
                    with torch.inference_mode(False), torch.enable_grad():
                        host = mods.host.ComfyHost(model, clip, **mode)
                        x0 = torch.randn(1, 16, res // 8, res // 8)
                        with host:
                            noised = host.noise(x0, torch.randn_like(x0), torch.tensor([5000]))
                            cond = mods.core.Conditioning(torch.randn(1, T5_TOKENS, 4096, requires_grad=True),
                                                          torch.randn(1, 768, requires_grad=True))

                            def step(host=host, noised=noised, cond=cond, x0=x0):
                                d, _ = host.denoise(noised, cond)
                                return (d.float() - x0).square().mean()

                            # what autograd keeps, counted tensor by tensor (deterministic; the heap counter's
                            # differences of differences were too noisy to extrapolate over 57 blocks)
                            weights = [*model.model.diffusion_model.parameters(),
                                       *clip.cond_stage_model.parameters()]
                            with mods.memory.SavedTensors(weights) as saved:
                                loss = step()
                            loss.backward()
                    held[(tuple(sorted(mode)), depth, res)] = saved.other_bytes / 2 / 2**30  # fp32 -> bf16
    print("\nmemory of a FLUX.1-dev step, batch 1: fp8 weights; held for backward in bf16 (what autograd saves, "
          "counted in fp32 at 128 and 256 px with 1-2 blocks of each kind, halved, extrapolated linearly in tokens "
          "and per block):")
    print(f"  weights fp8: transformer {dit_gib:.2f} GiB (a double block {block_gib['double']:.2f}, a single "
          f"{block_gib['single']:.2f}), T5-XXL {t5_gib:.2f} GiB, CLIP-L 0.23 GiB (bf16)")
    for mode in ((), ("gradient_checkpointing", "offload")):
        for res in (512, 768):
            tokens = T5_TOKENS + (res // 16) ** 2
            est = {}
            for size in (128, 256):
                base = held[(mode, (1, 1), size)]
                per_d = held[(mode, (2, 1), size)] - base
                per_s = held[(mode, (1, 2), size)] - base
                est[size] = base + 18 * per_d + 37 * per_s
            t0, t1 = (T5_TOKENS + (s // 16) ** 2 for s in (128, 256))
            act = est[128] + (est[256] - est[128]) * (tokens - t0) / (t1 - t0)
            resident = (2 * max(block_gib.values()) if "offload" in mode else dit_gib + t5_gib) + 0.23
            print(f"  {' + '.join(mode) or 'plain':<36} {res} px: held {act:6.2f} GiB + resident weights "
                  f"{resident:5.2f} GiB = {act + resident:6.2f} GiB  (goal 16 GiB)")
    t0, t1, t512 = (T5_TOKENS + (s // 16) ** 2 for s in (128, 256, 512))
    d0, d1 = (held[((), (2, 1), size)] - held[((), (1, 1), size)] for size in (128, 256))  # a double block, plain
    per_block = d0 + (d1 - d0) * (t512 - t0) / (t1 - t0)
    print(f"  + while a checkpointed block is recomputed in backward: its activations, about {per_block:.2f} GiB "
          "at 512 px (a double block, bf16)")
    for res in (512,):
        img = (res // 16) ** 2
        maps = 57 * 24 * img * T5_TOKENS * 4 / 2**30
        print(f"  + with the attention loss at {res} px: the maps kept to the loss, 57 layers x 24 heads x {img} x "
              f"{T5_TOKENS} in fp32 = {maps:.2f} GiB, and one no-grad forward of the class-word prompt per step")
    print("  offload: ComfyUI streams the transformer and T5 layer by layer (two blocks counted resident); a GPU "
          "run's max_memory_allocated is the check this estimate stands in for")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--res", type=int, default=128)
    p.add_argument("--steps", type=int, default=2, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--double", type=int, default=1, help="double-stream blocks (FLUX.1-dev: 19)")
    p.add_argument("--single", type=int, default=1, help="single-stream blocks (FLUX.1-dev: 38)")
    p.add_argument("--t5-layers", type=int, default=1, help="T5-XXL layers (24)")
    p.add_argument("--loops", default=",".join(LOOPS))
    p.add_argument("--project", action="store_true", help="FLOPs of the real FLUX.1-dev and 4090 times")
    p.add_argument("--accounting", action="store_true", help="the 16 GB accounting (slow: 12 CPU steps)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    path = find_comfyui()
    if path is None:
        print(skip_reason(), file=sys.stderr)
        return 2
    env = import_comfyui(path)
    mods = sd_bench.Mods(load_pack(env.nodes, BENCH.parent))
    names = [n.strip() for n in args.loops.split(",") if n.strip()]
    if unknown := [n for n in names if n not in LOOPS]:
        print(f"--loops: unknown {unknown}; choose from {LOOPS}", file=sys.stderr)
        return 2
    device = torch.device("cpu")
    if names:
        models = {"model": build_flux(double=args.double, single=args.single, seed=0, inference=True),
                  "clip": build_clip(t5_layers=args.t5_layers, seed=1, inference=True),
                  "ref_model": build_flux(double=args.double, single=args.single, seed=0, inference=False),
                  "ref_clip": build_clip(t5_layers=args.t5_layers, seed=1, inference=False)}
        for m in (models["ref_model"].model, models["ref_clip"].cond_stage_model):
            m.requires_grad_(False)
        photos = sd_bench.photo_set(mods.core, args.res, channels=16)
        loops = {n: make_loop(n, mods, models, photos) for n in names}
        n_dm = sum(q.numel() for q in models["model"].model.diffusion_model.parameters())
        print(f"ComfyUI {path.name} | torch {torch.__version__} | FLUX.1 real widths, {args.double} double + "
              f"{args.single} single blocks ({n_dm / 1e6:.0f} M), CLIP-L + T5-XXL with {args.t5_layers} layer(s), "
              f"random weights | {args.res} px, batch 1 | 1 thread | best of {args.rounds} rounds of {args.steps} steps")
        best = {n: float("inf") for n in loops}
        for _ in range(args.rounds):
            for n, loop in loops.items():
                best[n] = min(best[n], sd_bench.time_steps(loop, args.steps, device))
        mem = {n: sd_bench.held(loop, mods, device) for n, loop in loops.items()}
        fl = {n: sd_bench.flops(loop) for n, loop in loops.items()}
        print(f"{'loop':<24}{'CPU s/step':>12}{'held MiB (fwd->bwd)':>22}{'GFLOP/step':>12}")
        for n in loops:
            print(f"{n:<24}{best[n]:>12.2f}{sd_bench._cell(mem[n], 22)}{sd_bench._cell(fl[n] / 1e9, 12)}")
        if any(np.isnan(v) for v in fl.values()):
            print("  GFLOP '-': torch's counter cannot trace recomputed (checkpointed, streamed) regions")
        print("ratios to the reference (goal: time <= 1.15x, memory <= 1.1x; the attention loss's against the "
              "reference + its class-word forward):")
        for n in loops:
            ref = "reference TI + class forward" if "attn" in n else "reference TI"
            if not n.startswith("reference") and ref in loops:
                line = f"  {n} / {ref}: time {best[n] / best[ref]:.2f}x, held {mem[n] / mem[ref]:.2f}x"
                if not np.isnan(fl[n]):
                    line += f", FLOPs {fl[n] / fl[ref]:.2f}x"
                if "per_stage" in n:
                    line += " (a second text stream and prompt: the method's own work; --project: 512/768 px)"
                print(line)
    if args.project:
        project(mods)
    if args.accounting:
        accounting(mods)
    return 0


if __name__ == "__main__":
    sys.exit(main())
