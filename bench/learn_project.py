"""bench/learn.py's figures at the real sizes: FLOPs of a step at SD1.5 512 px / SDXL 1024 px (``--project``)
and the memory accounting per memory mode (``--accounting sd15|sdxl``). Run through bench/learn.py."""

from __future__ import annotations

import torch
from learn import CLIP_G_PARAMS, GPU_TFLOPS, SD15_UNET, SDXL_UNET, build_clip, build_unet


def project(mods) -> None:
    """FLOPs per step on meta tensors at the real sizes, and 200 steps on a 4090-class GPU."""
    import comfy.ldm.modules.attention as attention
    from torch.utils.flop_counter import FlopCounterMode

    def unet_flops(config, family, res, grad):
        model = build_unet(config, family, seed=0, inference=False, device="meta")
        dm = model.model.diffusion_model.requires_grad_(False)
        lat = res // 8
        x = torch.randn(1, 4, lat, lat, device="meta")
        ctx = torch.randn(1, 77, config["context_dim"], device="meta", requires_grad=grad)
        extra = {"y": torch.randn(1, 2816, device="meta")} if family == "sdxl" else {}
        before = attention.optimized_attention
        attention.optimized_attention = attention.attention_pytorch  # SDPA: counted by FlopCounterMode
        try:
            with FlopCounterMode(display=False) as fc:
                out = dm(x, torch.tensor([500.0], device="meta"), context=ctx, **extra)
                if grad:
                    out.sum().backward()
        finally:
            attention.optimized_attention = before
        return fc.get_total_flops()

    clip = build_clip(seed=0, inference=False).cond_stage_model.clip_l.transformer
    params_l = sum(p.numel() for n, p in clip.named_parameters() if "embedding" not in n)
    text_per_param = 2 * 77 * 2  # forward + input-gradient backward, 2 FLOPs per weight and token
    rows = [("SD1.5", SD15_UNET, "sd15", 512, params_l), ("SDXL", SDXL_UNET, "sdxl", 1024, params_l + CLIP_G_PARAMS)]
    print("\nFLOPs per step at the real sizes (meta tensors), and 200 steps on a 4090-class GPU:")
    for label, config, family, res, text_params in rows:
        fwd_bwd, fwd = unet_flops(config, family, res, True), unet_flops(config, family, res, False)
        text = text_params * text_per_param
        for attn in (False, True):
            total = fwd_bwd + text + (fwd if attn else 0)
            gpu = "; ".join(f"{name}: {200 * total / (t * 1e12):.1f} s" for name, t in GPU_TFLOPS.items())
            print(f"  {label} {res} px {'attn' if attn else 'TI  '}: {total / 1e12:6.2f} TFLOP/step (UNet fwd+bwd "
                  f"{fwd_bwd / 1e12:.2f}, text {text / 1e12:.2f}{f', class forward {fwd / 1e12:.2f}' if attn else ''})"
                  f"; 200 steps {gpu}")
    print("  goal: SD1.5 512 px x 200 steps <= 20 s on a 4090-class GPU")


def accounting(mods, family: str, sizes=(128, 256), target=None) -> None:
    """Weights and what one step holds for backward, per memory mode, measured on the CPU in bf16 (what the
    GPU runs in) at two small sizes and extrapolated linearly in pixels to the real size (activations of
    convolutions, linear layers, SDPA attention and the recorded maps all grow with the pixel count)."""
    import comfy.ldm.modules.attention as attention
    import comfy.model_patcher
    import comfy.supported_models
    from comfy_tiny import init_weights_, tiny_clip

    config, res_real, ctx = (SD15_UNET, 512, 768) if family == "sd15" else (SDXL_UNET, 1024, 2048)
    cls = comfy.supported_models.SD15 if family == "sd15" else comfy.supported_models.SDXL
    cfg = cls(dict(config))
    cfg.set_inference_dtype(torch.bfloat16, None)
    with torch.inference_mode():
        model = cfg.get_model({})
        init_weights_(model.diffusion_model, 0)
        model.diffusion_model.to(torch.bfloat16)
        clip = tiny_clip("sd1" if family == "sd15" else "sdxl", 768 if family == "sd15" else (768, 1280), seed=1,
                         dtype=torch.float32)
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    unet_gib = sum(p.numel() for p in model.diffusion_model.parameters()) * 2 / 2**30
    text_params = {"sd15": 123e6, "sdxl": 123e6 + CLIP_G_PARAMS + 0.0}[family]
    before = attention.optimized_attention
    attention.optimized_attention = attention.attention_pytorch  # SDPA, as on a GPU
    rows = {}
    try:
        for mode in ({}, {"gradient_checkpointing": True}, {"offload": True},
                     {"gradient_checkpointing": True, "offload": True}):
            held = []
            for res in sizes:
                with torch.inference_mode(False), torch.enable_grad():
                    host = mods.host.ComfyHost(patcher, clip, **mode)
                    lat = res // 8
                    x0 = torch.randn(1, 4, lat, lat)
                    with host:
                        noised = host.noise(x0, torch.randn_like(x0), torch.tensor([500]))
                        context = torch.randn(1, 77, ctx, requires_grad=True)
                        pooled = torch.randn(1, 1280) if family == "sdxl" else None
                        cond = mods.core.Conditioning(context, pooled)

                        def step(host=host, noised=noised, cond=cond, x0=x0):
                            d, _ = host.denoise(noised, cond, record=False)
                            return (d.float() - x0).square().mean()

                        loss, nbytes = mods.memory.held_bytes(step)
                        loss.backward()
                held.append(nbytes)
            (r0, h0), (r1, h1) = zip(sizes, held, strict=True)
            slope = (h1 - h0) / (r1 * r1 - r0 * r0)
            rows[" + ".join(mode) or "plain"] = (h0 + slope * (res_real * res_real - r0 * r0)) / 2**30
    finally:
        attention.optimized_attention = before
    text_gib = text_params * 2 / 2**30
    print(f"\nmemory accounting, {family.upper()} at {res_real} px, batch 1, bf16 weights (measured held bytes at "
          f"{sizes} px, extrapolated in pixels):")
    print(f"  weights: UNet {unet_gib:.2f} GiB + text encoders {text_gib:.2f} GiB; offload keeps about one layer of the "
          "UNet on the device (ComfyUI streams the rest)")
    for name, gib in rows.items():
        resident = (0.0 if "offload" in name else unet_gib) + text_gib
        print(f"  {name:<36} held for backward {gib:6.2f} GiB   resident weights {resident:5.2f} GiB   "
              f"total {gib + resident:6.2f} GiB" + (f"  (goal {target} GiB)" if target else ""))


# -- main ----------------------------------------------------------------------------------------------
