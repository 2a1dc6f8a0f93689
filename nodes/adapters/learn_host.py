"""The identity learner's host on ComfyUI's own objects (MODEL, CLIP): ``dreamid_core.learning.LearnHost``.

The learning itself (batches, prompts, loss, optimiser) is ``dreamid_core.learning.IdentityLearner``;
this file only lets it call ComfyUI's models the way ComfyUI calls them:

- clones of MODEL and CLIP, loaded with ``load_models_gpu`` (``offload``: as little as possible on the
  device, ComfyUI streams the rest layer by layer, as its own trainer's offloading does);
- the model's weights are used through :class:`dreamid_core.learning.frozen.FrozenWeights`: zero-copy
  aliases that autograd may keep and that never get a gradient (ComfyUI leaves ``requires_grad`` on and
  loads weights as inference tensors); with ``offload`` the streamed layers keep nothing for backward
  (``input_grad_only``);
- ComfyUI's CLIP layers add their residuals in place (``x += ...``): while a prompt is encoded with
  gradients, the tensors autograd saves that require grad (activations, 77 tokens wide) are kept as
  copies so the in-place adds cannot change them; weights are never copied;
- the diffusion model runs through ``model.apply_model`` with the clone's transformer options (so the
  user's attention patches apply) plus two of the pack's: :class:`~.attention_patches.TrainKV`
  (per-stage key/value contexts) and :class:`~.attention_patches.AttentionRecorder` (explicit maps for
  the attention loss on the layers it records, ComfyUI's own attention everywhere else);
- noise and denoised estimates through the model's own ``model_sampling``.

Use it as a context manager: leaving it undoes everything on the shared modules, also on Cancel or error.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import comfy.model_management as mm
import comfy.model_sampling
import comfy.ops
import torch
import torch.utils.checkpoint

from ...dreamid_core.identities.families import family_name
from ...dreamid_core.learning import Conditioning, Encoded, Noised, PhotoSet, face_squares
from ...dreamid_core.learning.frozen import FrozenWeights, copy_saved_activations, input_grad_only
from ...dreamid_core.learning.host import recomputed
from ...dreamid_core.learning.prompts import PLACEHOLDER
from .attention_patches import AttentionRecorder, TrainKV, add_recorder, attention_blocks
from .comfy_tokens import part_key, text_encoder, tokenize_with_identities, tokenizer_keys
from .dit_model import dit_blocks, dit_conds, image_tokens, is_dit, model_family, patch_size
from .joint_attention import JointAttention

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher
    from comfy.sd import CLIP, VAE

    from ...dreamid_core.faces.pipeline import FaceResult

logger = logging.getLogger(__name__)


def prediction_kind(sampling: torch.nn.Module) -> str:
    """"eps", "v" or "flow" from a ComfyUI ``model_sampling`` object; other kinds are refused."""
    ms = comfy.model_sampling
    if isinstance(sampling, ms.V_PREDICTION):
        return "v"
    if isinstance(sampling, ms.CONST):
        return "flow"
    if isinstance(sampling, ms.EPS) and not any(isinstance(sampling, getattr(ms, n, ())) for n in
                                                 ("EDM", "X0", "IMG_TO_IMG", "V_PREDICTION_EDM")):
        return "eps"
    raise ValueError(f"this model predicts with {type(sampling).__name__}; learning an identity supports eps, "
                     "v-prediction and flow models")


def _unet_blocks(patcher: ModelPatcher) -> list[torch.nn.Module]:
    dm = patcher.model.diffusion_model
    return [*dm.input_blocks, dm.middle_block, *dm.output_blocks]


class ComfyHost:
    """``LearnHost`` over a MODEL and a CLIP (see the module docstring)."""

    def __init__(self, model: ModelPatcher, clip: CLIP, *, gradient_checkpointing: bool = False, offload: bool = False,
                 max_queries: int | None = 1024) -> None:
        self.mp, self.clip = model.clone(), clip.clone()
        self.sampling = self.mp.get_model_object("model_sampling")
        self.prediction = prediction_kind(self.sampling)
        self.num_timesteps = int(self.sampling.sigmas.shape[0])
        self.tokenizer_keys = tokenizer_keys(self.clip)
        self.keys = tuple(part_key(self.clip, k) for k in self.tokenizer_keys)
        self.device = self.mp.load_device
        # fp8 weights compute in ComfyUI's manual-cast dtype, layer by layer
        self.compute_dtype = getattr(self.mp.model, "manual_cast_dtype", None) or self.mp.model.get_dtype()
        self.dit = is_dit(self.mp)
        self.recorder: AttentionRecorder | JointAttention = AttentionRecorder(max_queries)
        if self.dit:  # FLUX.1 / SD3: the pooled vector always feeds the model; joint attention, no attn2
            self.recorder = JointAttention(max_queries)
            self.resolution_multiple = 8 * patch_size(self.mp)
            # SD3 reads [CLIP-L|G rows; T5 rows] as one sequence; FLUX reads T5 alone (CLIP-L only pooled)
            self.family_reads_clip_sequence = model_family(self.mp) == "sd3"
            self.uses_pooled = True
            self.kv: TrainKV | None = None
        else:
            mult = self.mp.model.model_config.unet_config.get("channel_mult", (1,))
            self.resolution_multiple = 8 * 2 ** (len(mult) - 1)
            self.uses_pooled = bool(getattr(self.mp.model, "adm_channels", 0))
            add_recorder(self.mp, self.recorder)
            self.kv = TrainKV(self.mp)
            self.mp.set_model_attn2_patch(self.kv)
        self.gradient_checkpointing, self.offload = gradient_checkpointing, offload
        self._stack: contextlib.ExitStack | None = None
        self.frozen: FrozenWeights | None = None

    @property
    def max_queries(self) -> int | None:
        return self.recorder.max_queries

    @max_queries.setter
    def max_queries(self, value: int | None) -> None:
        self.recorder.max_queries = value

    # -- lifecycle ------------------------------------------------------------------------------------

    def __enter__(self) -> ComfyHost:
        self._stack = stack = contextlib.ExitStack()
        try:
            if self.offload:
                mm.load_models_gpu([self.mp], memory_required=1e20, force_full_load=False)
            else:
                mm.load_models_gpu([self.mp, self.clip.patcher])
            self.frozen = stack.enter_context(FrozenWeights([self.mp.model.diffusion_model,
                                                             self.clip.cond_stage_model]))
            if hasattr(mm, "in_training"):  # ComfyUI's own switch to differentiable kernels (FLUX's RoPE in 0.33)
                before = mm.in_training
                mm.in_training = True
                stack.callback(setattr, mm, "in_training", before)
            if self.gradient_checkpointing:
                stack.enter_context(self._checkpointed_blocks())
            if self.offload:
                stack.enter_context(self._streamed_layers())
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The shared modules as the user gave them (for sampling a preview mid-run), then open again."""
        self.close()
        try:
            yield
        finally:
            self.__enter__()

    def close(self) -> None:
        self.recorder.recording = self.recorder.collecting = False
        self.recorder.maps.clear()
        if self.kv is not None:
            self.kv.clear()
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    @contextlib.contextmanager
    def _checkpointed_blocks(self) -> Iterator[None]:
        """Gradient checkpointing per UNet layer (ResBlock, SpatialTransformer, up/downsample): ComfyUI runs a
        block's layers one by one (``forward_timestep_embed``), so that is where ``forward`` is replaced, for the
        duration only. A transformer layer gets a snapshot of ``transformer_options``: ComfyUI advances its
        ``block`` / ``transformer_index`` entries as the forward goes on, and the backward's recomputation must
        see the values of its own forward (the attention patches are chosen by them). A DiT (FLUX.1, SD3) is
        checkpointed per transformer block (``dreamid_core.learning.host.recomputed``: its blocks add into their
        inputs in place), with the same snapshot of its ``transformer_options``."""
        layers = dit_blocks(self.mp) if self.dit else [layer for block in _unet_blocks(self.mp) for layer in block]

        def plain(*a: Any, _f: Callable[..., torch.Tensor], **k: Any) -> Any:
            if isinstance(k.get("transformer_options"), dict):
                k["transformer_options"] = dict(k["transformer_options"])
            if self.dit:
                if not torch.is_grad_enabled():
                    return _f(*a, **k)
                joint = self.recorder
                assert isinstance(joint, JointAttention)
                out, maps = recomputed(_f, *a, capture=joint.capture, **k)
                if joint.collecting:  # the block's maps, now with gradients through its recomputation
                    joint.maps.extend(maps)
                return out
            return torch.utils.checkpoint.checkpoint(_f, *a, use_reentrant=False, **k)

        def transformer(x: torch.Tensor, context: torch.Tensor | None = None,
                        transformer_options: dict[str, Any] | None = None, *a: Any, _f: Callable[..., torch.Tensor],
                        **k: Any) -> torch.Tensor:
            options = dict(transformer_options or {})
            return torch.utils.checkpoint.checkpoint(_f, x, context, options, *a, use_reentrant=False, **k)

        try:
            for layer in layers:
                wrap = transformer if hasattr(layer, "transformer_blocks") and not self.dit else plain
                layer.forward = functools.partial(wrap, _f=layer.forward)
            yield
        finally:
            for layer in layers:
                layer.__dict__.pop("forward", None)

    @contextlib.contextmanager
    def _streamed_layers(self) -> Iterator[None]:
        """Offloading: linear and conv layers keep nothing for backward; their weight is cast again there."""
        wrapped = []
        try:
            for m in self.mp.model.diffusion_model.modules():
                if isinstance(m, torch.nn.Linear):
                    kind = ("linear",)
                elif isinstance(m, torch.nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str):
                    kind = ("conv2d", m.stride, m.padding, m.dilation, m.groups)
                else:
                    continue
                inner = m.forward

                def fwd(x: torch.Tensor, _f: Callable[[torch.Tensor], torch.Tensor] = inner,
                        _m: torch.nn.Linear | torch.nn.Conv2d = m, _k: tuple = kind) -> torch.Tensor:
                    return input_grad_only(x, _f, lambda g, _m=_m: comfy.ops.cast_bias_weight(_m, g)[0], _k)

                m.forward = fwd
                wrapped.append(m)
            yield
        finally:
            for m in wrapped:
                m.__dict__.pop("forward", None)

    # -- text -----------------------------------------------------------------------------------------

    def word_embeddings(self, word: str) -> dict[str, torch.Tensor]:
        parts = {}
        for key in self.tokenizer_keys:
            tok, model = text_encoder(self.clip, key)
            ids = [t for chunk in tok.tokenize_with_weights(word, False, disable_weights=True) for t, *_ in chunk
                   if isinstance(t, int) and t not in (tok.start_token, tok.end_token, tok.pad_token)]
            if not ids:
                raise ValueError(f"the word {word!r} gives no tokens; use an ordinary word such as 'person'")
            table = model.transformer.get_input_embeddings().weight
            parts[part_key(self.clip, key)] = table[ids].detach().to("cpu", torch.float32).clone()
        return parts

    def vocabulary_norm(self) -> dict[str, float]:
        out = {}
        for key in self.tokenizer_keys:
            table = text_encoder(self.clip, key)[1].transformer.get_input_embeddings().weight
            out[part_key(self.clip, key)] = float(table.detach().float().norm(dim=-1).median())
        return out

    def encode(self, prompt: str, vectors: dict[str, torch.Tensor]) -> Encoded:
        tokens, info = tokenize_with_identities(self.clip, prompt, {PLACEHOLDER: vectors})
        with copy_saved_activations() if torch.is_grad_enabled() else contextlib.nullcontext():
            cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        positions: list[int] = []
        words: list[tuple[int, int]] = []
        for key, offset in self._segments(tokens):
            tok, _ = text_encoder(self.clip, key)
            ids = info.positions[key][PLACEHOLDER]
            positions += [offset + i for i in ids]
            for i, item in enumerate(tokens[key][0]):
                token = item[0]
                if i in ids or not isinstance(token, int) or token == tok.start_token:
                    continue
                if token == tok.end_token:
                    break
                words.append((offset + i, int(token)))
        return Encoded(cond, pooled if self.uses_pooled else None, tuple(positions), tuple(words))

    def _segments(self, tokens: dict[str, list]) -> list[tuple[str, int]]:
        """(tokenizer key, offset) of each part of the text sequence the model reads: a UNet's CLIP context,
        FLUX's T5 sequence, SD3's CLIP rows (77 per chunk) followed by its T5 rows."""
        if not self.dit:
            return [(self.tokenizer_keys[0], 0)]
        keys = set(self.tokenizer_keys)
        if "t5xxl" not in keys:
            return [(self.tokenizer_keys[0], 0)]
        clip_keys = [k for k in self.tokenizer_keys if k != "t5xxl"]
        if self.family_reads_clip_sequence and clip_keys:
            return [(clip_keys[0], 0), ("t5xxl", 77 * len(tokens[clip_keys[0]]))]
        return [("t5xxl", 0)]

    # -- diffusion ------------------------------------------------------------------------------------

    def noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> Noised:
        if self.prediction == "flow":  # the shifted schedule's table (FLUX's sigma() reads times in 0..1, SD3's 1..1000)
            sigma = self.sampling.sigmas.to(t.device)[t].to(x0.device, torch.float32)
        else:
            sigma = self.sampling.sigma(t.float()).to(x0.device, torch.float32)  # [B]
        x_t = self.sampling.noise_scaling(sigma, noise, x0, max_denoise=False)
        return Noised(x0=x0, x_t=x_t, sigma=sigma, t=t)

    def denoise(self, noised: Noised, cond: Conditioning, record: bool = False
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x_t = noised.x_t
        B = x_t.shape[0]
        to = dict(self.mp.model_options["transformer_options"])
        to["cond_or_uncond"] = [0]  # one chunk, the identity's: TrainKV applies to every row
        to["sigmas"] = noised.sigma
        if self.dit:
            return self._denoise_dit(noised, cond, to, record)
        assert self.kv is not None
        self.kv.set(cond.keys, cond.values)
        self.recorder.start(record)
        extra = {}
        if cond.pooled is not None:
            res = x_t.shape[-1] * 8
            y = self.mp.model.encode_adm(pooled_output=cond.pooled, width=res, height=res, target_width=res,
                                         target_height=res, device=x_t.device)
            if y is not None:
                extra["y"] = y.to(x_t.device)
        try:
            denoised = self.mp.model.apply_model(x_t, noised.sigma, c_crossattn=cond.context.to(x_t.device),
                                                 transformer_options=to, **extra)
        finally:
            self.recorder.collecting = False  # a checkpointed backward recomputes without recording twice
        assert denoised.shape[0] == B
        return denoised.float(), self.recorder.take()

    def _denoise_dit(self, noised: Noised, cond: Conditioning, to: dict[str, Any], record: bool
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """FLUX.1 / SD3 through :class:`~.joint_attention.JointAttention`: with ``record`` the maps of the image
        queries on the text keys; a per-stage conditioning (``keys``/``values`` ``[1, B, L, C]``, the row's stage
        already chosen) is read as two text streams ``[keys; values]``."""
        x_t = noised.x_t
        joint = self.recorder
        assert isinstance(joint, JointAttention)
        context, stream_len = cond.context, 0
        if cond.keys is not None:
            assert cond.values is not None
            if cond.keys.shape[0] != 1:
                raise ValueError(f"{family_name(model_family(self.mp))} takes per-stage keys chosen by time "
                                 f"([1, B, L, C]), not {cond.keys.shape[0]} block stages")
            stream_len = int(cond.keys.shape[2])
            context = torch.cat([cond.keys[0], cond.values[0]], dim=1)
        img_len = image_tokens(x_t, patch_size(self.mp))
        joint.start(record, txt_len=int(context.shape[1]), img_len=img_len,
                    prior=to.get("optimized_attention_override"), stream_len=stream_len)
        if record or stream_len:
            to["optimized_attention_override"] = joint
        conds = dit_conds(self.mp, context.to(x_t.device),
                          None if cond.pooled is None else cond.pooled.to(x_t.device), x_t)
        try:
            # ComfyUI's FLUX blocks add residuals in place (``x += ...``), as its CLIP does
            with copy_saved_activations() if torch.is_grad_enabled() else contextlib.nullcontext():
                denoised = self.mp.model.apply_model(x_t, noised.sigma, transformer_options=to, **conds)
        finally:
            joint.collecting = False  # a checkpointed backward recomputes without collecting twice
        if stream_len and not joint.calls:
            raise RuntimeError(f"{type(self.mp.model.diffusion_model).__name__} made no joint-attention call of "
                               f"{joint.txt_len} text + {img_len} image tokens: per-stage identities need FLUX.1's or "
                               "SD3's joint attention")
        return denoised.float(), joint.take()

    def attention_layers(self) -> list[tuple[str, int]]:
        return attention_blocks(self.mp)


def encode_photos(vae: VAE, host: ComfyHost, images: torch.Tensor, faces: Sequence[FaceResult], resolution: int,
                  cancel: Callable[[], None] | None = None) -> PhotoSet:
    """The faces' squares (``dreamid_core.learning.face_squares``, the command line's pixels too), encoded
    once, photo by photo, by ComfyUI's VAE into the model's latent space."""
    pixels, crops = face_squares(images, faces, resolution)  # [N, R, R, 3] 0..1
    latents = []
    for px in pixels:
        if cancel is not None:
            cancel()
        with torch.no_grad():
            latents.append(vae.encode(px[None]).float().cpu())  # [1, C, h, w], VAE latent space
    latents = host.mp.model.process_latent_in(torch.cat(latents))
    want = resolution // 8
    if latents.shape[-1] != want:
        raise ValueError(f"the VAE gave latents {tuple(latents.shape)} for {resolution} px photos; expected an "
                         f"8x-downscaling SD VAE ({want} px latents)")
    return PhotoSet.from_faces(latents, faces, crops, resolution)
