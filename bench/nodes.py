"""Node costs inside a real ComfyUI (in-process): DreamID_InjectIDTokens against CLIPTextEncode on the
same prompt and CLIP in the same run (target: <= 1.1x), and DreamID_EncodeFace end to end per photo.

    COMFYUI_PATH=~/ComfyUI python bench/nodes.py [--clip full|tiny] [--repeats 20]

``--clip full`` builds an SD2 (OpenCLIP-H text, 1024 wide, 24 layers) CLIP from config with random
weights; ``tiny`` a 96-wide one, where the splicing overhead shows most. The encoder is vit_s-sized.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from comfy_env import find_comfyui, import_comfyui, load_pack, skip_reason  # noqa: E402
from timing import median_time  # noqa: E402

PROMPT = "a photo of S* as a chef, looking at the camera, detailed face, (kitchen background:1.1), soft light"


def sd2_clip(size: str):
    import comfy.sd
    import comfy.supported_models_base
    from comfy.text_encoders import sd2_clip as sd2
    from comfy_tiny import init_weights_, tiny_clip

    if size == "tiny":
        return tiny_clip("sd2")
    config = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
              "projection_dim": 1024}
    target = comfy.supported_models_base.ClipTarget(sd2.SD2Tokenizer, sd2.SD2ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_h_model_config": config})
    init_weights_(clip.cond_stage_model, 0)
    return clip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", choices=("full", "tiny"), default="full")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    path = find_comfyui()
    if path is None:
        raise SystemExit(skip_reason())
    env = import_comfyui(path)
    nodes = load_pack(env.nodes, REPO)
    pack_root = nodes["DreamID_EncodeFace"].__module__.split(".nodes.")[0]
    core = sys.modules[f"{pack_root}.dreamid_core"]
    identity = sys.modules[f"{pack_root}.dreamid_core.identities.embeds"]

    clip = sd2_clip(args.clip)
    width = clip.cond_stage_model.clip_h.transformer.get_input_embeddings().weight.shape[1]
    embeds = identity.IdentityEmbeds(parts={"clip_h": torch.randn(2, width) * 0.02}, info={"target": "sd2"})
    plain, inject = env.nodes.CLIPTextEncode(), nodes["DreamID_InjectIDTokens"]()
    t_plain = median_time(lambda: plain.encode(clip, PROMPT), args.repeats)
    t_inject = median_time(lambda: inject.encode(clip, embeds, PROMPT, "S*"), args.repeats)
    t_plain2 = median_time(lambda: plain.encode(clip, PROMPT), args.repeats)  # again: drift check
    t_plain = min(t_plain, t_plain2)
    print(f"ComfyUI {path}; torch {torch.__version__}; CPU threads {torch.get_num_threads()}; "
          f"CLIP: SD2 {args.clip} ({width} wide)")
    print(f"CLIPTextEncode         {t_plain * 1e3:8.2f} ms")
    print(f"DreamID_InjectIDTokens {t_inject * 1e3:8.2f} ms   ratio {t_inject / t_plain:.3f}x (target <= 1.1x)")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "dreamidentity"
        folder.mkdir()
        env.folder_paths.add_model_folder_path("dreamidentity", str(folder), is_default=True)
        torch.manual_seed(0)
        cfg = core.EncoderConfig.for_target("sd2", core.BackboneConfig.preset("vit_s"))
        core.save_encoder(core.IDEncoder(cfg), folder / "bench_vit_s.safetensors")
        (bundle,) = nodes["DreamID_LoadIDEncoder"]().load("bench_vit_s.safetensors", "mtcnn", "auto")
        spec = importlib.util.find_spec("insightface")
        from PIL import Image

        photo = Image.open(Path(spec.origin).parent / "data" / "images" / "t1.jpg").convert("RGB").crop((330, 120, 730, 520))
        one = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 255.0)[None]  # [1, 400, 400, 3]
        encode = nodes["DreamID_EncodeFace"]()
        for n in (1, 8):
            batch = one.repeat(n, 1, 1, 1)
            t = median_time(lambda b=batch: encode.encode(bundle, b, 1.0, "average", 0, "largest", "error"),
                            max(3, args.repeats // 5))
            print(f"DreamID_EncodeFace     {t / n * 1e3:8.1f} ms per photo (batch of {n}, 400x400 px, vit_s, "
                  "MTCNN on CPU)")


if __name__ == "__main__":
    main()
